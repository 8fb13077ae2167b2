"""The main kernels at decode (1 token) and prefill (512 tokens) sizes, per implementation.

Each implementation is a backend's op set (same names and shape contracts as the NumPy reference):
`numpy` (tinyserve/backends/numpy_ops.py) and `cpu` (the Cython kernels tinyserve._ext.kernels
behind tinyserve/backends/cpu.py), skipped when not built. Shapes are those
of the default model, SmolLM2-135M: D 576, H 9, KVH 3, Dh 64, F 1536.
"""

from __future__ import annotations

import numpy as np

from . import _common

D, H, KVH, Dh, F = 576, 9, 3, 64, 1536
CONTEXT = 512  # tokens of context attention reads (decode: 1 query after 511 cached tokens)
BLOCK = 16


def _quant_weight(qtype_name: str, rows: int, cols: int, rng):
    """A QuantTensor of seeded random values, quantized by the gguf package's reference code."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    from tinyserve.loading.gguf_file import QuantTensor

    qtype = GGMLQuantizationType[qtype_name]
    w = rng.standard_normal((rows, cols), dtype=np.float32) * 0.05
    return QuantTensor(qtype, (rows, cols), quantize(w, qtype))


class Kernels:
    params = (["numpy", "cpu"], [1, 512], _common.THREADS)
    param_names = ("impl", "n_tokens", "threads")
    timeout = 120

    def setup(self, impl, n_tokens, threads):
        from tinyserve.batch import Batch

        backend = _common.backend_for(impl, threads)
        ops = self.ops = backend.ops
        rng = np.random.default_rng(0)
        N = n_tokens
        self.x = rng.standard_normal((N, D), dtype=np.float32)  # (N, D)
        self.norm_w = rng.standard_normal(D, dtype=np.float32)
        self.w_f32 = ops.weight(rng.standard_normal((F, D), dtype=np.float32) * 0.05)  # (F, D)
        self.w_q4_1 = ops.weight(_quant_weight("Q4_1", F, D, rng))
        self.w_q8_0 = ops.weight(_quant_weight("Q8_0", F, D, rng))
        self.gate = rng.standard_normal((N, F), dtype=np.float32)  # (N, F)
        self.up = rng.standard_normal((N, F), dtype=np.float32)
        self.q = rng.standard_normal((N, H, Dh), dtype=np.float32)  # (N, H, Dh)
        self.positions = np.arange(CONTEXT - N, CONTEXT, dtype=np.int64)  # (N,)
        self.inv_freq = (1e4 ** -(np.arange(0, Dh, 2) / Dh)).astype(np.float32)  # (Dh/2,)
        n_blocks = CONTEXT // BLOCK
        (pools,) = backend.allocate_kv([{"k": (KVH, Dh), "v": (KVH, Dh)}], n_blocks, BLOCK)
        k = rng.standard_normal((CONTEXT, KVH, Dh), dtype=np.float32)  # (ctx, KVH, Dh)
        v = rng.standard_normal((CONTEXT, KVH, Dh), dtype=np.float32)
        slots = np.arange(CONTEXT, dtype=np.int64)
        ops.write_kv(pools["k"], k, slots)
        ops.write_kv(pools["v"], v, slots)
        self.k_pool, self.v_pool = pools["k"], pools["v"]
        table = list(range(n_blocks))
        self.batch = Batch.build([(list(range(N)), CONTEXT - N, table)], BLOCK)
        self.scale = Dh**-0.5

    def time_matmul_f32(self, impl, n_tokens, threads):
        self.ops.matmul(self.x, self.w_f32)  # (N, D) @ (F, D).T -> (N, F)

    def time_matmul_q4_1(self, impl, n_tokens, threads):
        self.ops.matmul(self.x, self.w_q4_1)

    def time_matmul_q8_0(self, impl, n_tokens, threads):
        self.ops.matmul(self.x, self.w_q8_0)

    def time_rms_norm(self, impl, n_tokens, threads):
        self.ops.rms_norm(self.x, self.norm_w, 1e-5)

    def time_rope(self, impl, n_tokens, threads):
        self.ops.rope(self.q, self.positions, self.inv_freq)

    def time_silu_mul(self, impl, n_tokens, threads):
        self.ops.silu_mul(self.gate, self.up)

    def time_paged_attention(self, impl, n_tokens, threads):
        self.ops.paged_attention(self.q, self.k_pool, self.v_pool, self.batch, self.scale)

    def peakmem_matmul_q4_1(self, impl, n_tokens, threads):
        self.ops.matmul(self.x, self.w_q4_1)

    def peakmem_paged_attention(self, impl, n_tokens, threads):
        self.ops.paged_attention(self.q, self.k_pool, self.v_pool, self.batch, self.scale)


class AttentionGemma3:
    """Paged attention on Gemma-3-270M's shapes (H 4, KVH 1, Dh 256: one kv head for the four query
    heads, long rows): a prefill of 512 tokens (tiles of the sequence's tokens share each block of
    keys) and a decode step after 511 cached tokens (its keys split over the threads), per KV dtype."""

    params = (["numpy", "cpu"], [1, 512], ["float32", "float16"], _common.THREADS)
    param_names = ("impl", "n_tokens", "kv_dtype", "threads")
    timeout = 120

    def setup(self, impl, n_tokens, kv_dtype, threads):
        from tinyserve.batch import Batch

        H, KVH, Dh = 4, 1, 256
        self.ops = _common.backend_for(impl, threads).ops
        rng = np.random.default_rng(0)
        n_blocks = CONTEXT // BLOCK
        shape = (n_blocks, BLOCK, KVH, Dh)
        self.k_pool = rng.standard_normal(shape, dtype=np.float32).astype(kv_dtype)
        self.v_pool = rng.standard_normal(shape, dtype=np.float32).astype(kv_dtype)
        self.q = rng.standard_normal((n_tokens, H, Dh), dtype=np.float32)  # (N, H, Dh)
        table = [int(b) for b in rng.permutation(n_blocks)]
        self.batch = Batch.build([(list(range(n_tokens)), CONTEXT - n_tokens, table)], BLOCK)

    def time_paged_attention(self, impl, n_tokens, kv_dtype, threads):
        self.ops.paged_attention(self.q, self.k_pool, self.v_pool, self.batch, 1 / 16, 512)
