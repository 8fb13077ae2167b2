"""The quantized matmul (tinyserve._ext.kernels.matmul_q) on the default model's shapes.

SmolLM2-135M Q4_1: q/o (576 x 576), k/v (192 x 576), gate/up (1536 x 576), down (576 x 1536),
and the tied Q8_0 output head (49152 x 576), in the file's row-major blocks (the row kernels of
`pack_weights=False`). N = 1 (decode), 16 (a batched decode step) and 512 (a prefill chunk), all
on the int8 kernels (the dequantize + sgemm route is exact prefill's, off by default). Skipped
when the extension is not built.
MatmulPacked: the packed tiles (the cpu backend's default) on Gemma-3-270M's layer matrices, one
per type of that file, per ISA level.
MatmulBF16: the same FFN shapes as bf16 weights (a bf16 safetensors checkpoint's), on the vnni
level (bf16 widened, f32 FMA) and the bf16 level (vdpbf16ps on bf16-rounded activations; skipped
on a CPU without AVX-512 BF16).
"""

from __future__ import annotations

import numpy as np

from . import _common

# name -> (rows, cols, ggml type)
SHAPES = {
    "q_proj": (576, 576, "Q4_1"),
    "k_proj": (192, 576, "Q4_1"),
    "gate_proj": (1536, 576, "Q4_1"),
    "down_proj": (576, 1536, "Q4_1"),
    "lm_head": (49152, 576, "Q8_0"),
}


def _blocks(qtype_name: str, rows: int, cols: int, rng) -> np.ndarray:
    """(rows, bytes_per_row) uint8: random ggml blocks with small finite f16 scales (the kernel's
    time does not depend on the values; quantizing 28M floats in setup would)."""
    from gguf import GGMLQuantizationType
    from gguf.constants import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[qtype_name]]
    data = rng.integers(0, 256, (rows * cols // block, size), dtype=np.uint8)
    n_f16 = 2 if qtype_name in ("Q4_1", "Q5_1") else 1  # d (and m) lead each block
    f16 = (rng.standard_normal((data.shape[0], n_f16)) * 0.01).astype(np.float16)
    data[:, : 2 * n_f16] = f16.view(np.uint8)
    return data.reshape(rows, -1)


def _kernels_at(isa: str | None, threads: int):
    """The native kernels on `threads` threads at ISA level `isa` (None: as they are), and the level
    they were at before (for teardown); NotImplementedError skips where either is missing."""
    try:
        from tinyserve._ext import kernels
    except ImportError as e:
        raise NotImplementedError(f"native kernels not built: {e}") from None
    if isa is not None and isa not in kernels.available_isas():
        raise NotImplementedError(f"no {isa} level on this CPU")
    _common.use_threads(threads)
    kernels.set_num_threads(threads)
    before = kernels.get_isa()
    if isa is not None:
        kernels.set_isa(isa)
    return kernels, before


class MatmulQ:
    params = (list(SHAPES), [1, 16, 512], _common.THREADS)
    param_names = ("weight", "n_tokens", "threads")
    timeout = 120

    def setup(self, weight, n_tokens, threads):
        from gguf import GGMLQuantizationType

        if weight == "lm_head" and n_tokens == 512:
            raise NotImplementedError("the head only sees the sampled rows")
        quant, _ = _kernels_at(None, threads)
        rows, cols, qtype_name = SHAPES[weight]
        rng = np.random.default_rng(0)
        self.quant = quant
        self.data = _blocks(qtype_name, rows, cols, rng)
        self.qtype = int(GGMLQuantizationType[qtype_name])
        self.cols = cols
        self.x = rng.standard_normal((n_tokens, cols), dtype=np.float32)  # (N, K)
        self.out = np.empty((n_tokens, rows), dtype=np.float32)  # (N, M)

    def time_matmul_q(self, weight, n_tokens, threads):
        self.quant.matmul_q(self.x, self.data, self.qtype, self.cols, self.out)  # (N, M)


class MatmulBF16:
    params = (["gate_proj", "down_proj"], [1, 16, 512], ["vnni", "bf16"], _common.THREADS)
    param_names = ("weight", "n_tokens", "isa", "threads")
    timeout = 120

    def setup(self, weight, n_tokens, isa, threads):
        self.kernels, self.before = _kernels_at(isa, threads)
        rows, cols, _ = SHAPES[weight]
        rng = np.random.default_rng(0)
        w = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
        self.bits = (w.view(np.uint32) >> 16).astype(np.uint16)  # (M, K) bf16
        self.x = rng.standard_normal((n_tokens, cols), dtype=np.float32)  # (N, K)
        self.out = np.empty((n_tokens, rows), dtype=np.float32)  # (N, M)

    def teardown(self, weight, n_tokens, isa, threads):
        self.kernels.set_isa(self.before)

    def time_matmul_bf16(self, weight, n_tokens, isa, threads):
        self.kernels.matmul_bf16(self.x, self.bits, self.out)  # (N, M)


# Gemma-3-270M Q4_K_M's layer matrices, each as its type in that file: q / gate / up (Q5_0: 640
# columns are not whole K-quant super-blocks), v (Q8_0), o (Q4_K), down (Q6_K)
PACKED_SHAPES = {
    "gate_q5_0": (2048, 640, "Q5_0"),
    "v_q8_0": (256, 640, "Q8_0"),
    "o_q4_k": (640, 1024, "Q4_K"),
    "down_q6_k": (640, 2048, "Q6_K"),
}


class MatmulPacked:
    """The packed int8 tiles (the cpu backend's default form of a GGUF matrix) at 1 row (decode),
    8 (one tile) and 128 (a prefill chunk), per ISA level this CPU has."""

    params = (list(PACKED_SHAPES), [1, 8, 128], ["avx2", "vnni"], _common.THREADS)
    param_names = ("weight", "n_tokens", "isa", "threads")
    timeout = 120

    def setup(self, weight, n_tokens, isa, threads):
        from gguf import GGMLQuantizationType

        kernels, self.before = _kernels_at(isa, threads)
        self.kernels = kernels
        rows, cols, qtype_name = PACKED_SHAPES[weight]
        rng = np.random.default_rng(0)
        qtype = int(GGMLQuantizationType[qtype_name])
        self.packed = kernels.repack(_blocks(qtype_name, rows, cols, rng), qtype, cols)
        self.code, self.cols = qtype | kernels.PACKED, cols
        self.x = rng.standard_normal((n_tokens, cols), dtype=np.float32)  # (N, K)
        self.out = np.empty((n_tokens, rows), dtype=np.float32)  # (N, M)

    def teardown(self, weight, n_tokens, isa, threads):
        self.kernels.set_isa(self.before)

    def time_matmul_packed(self, weight, n_tokens, isa, threads):
        self.kernels.matmul_q(self.x, self.packed, self.code, self.cols, self.out)  # (N, M)
