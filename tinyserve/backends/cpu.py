"""The `cpu` backend: the same model files over Cython kernels (ext/ -> tinyserve._ext).

Weights stay as the checkpoint holds them: GGUF blocks stay quantized (resident memory ~ file size)
and are read directly by `tinyserve._ext.kernels.matmul_q`; bf16 stays bf16; float32 is read by
`matmul_f32` (BLAS only in exact-prefill mode: its rows change with the row count).
Every op has the name and shape contract of its NumPy reference (numpy_ops.py), checked by
tests/test_cpu_kernels.py. A model whose declared spec has a lowering here (a Decoder with its
matrices quantized: cpu_decoder.py) runs its layer stack in one native call; any other runs the
model file op by op through `CpuOps`. tests/test_cpu_backend.py holds both routes to one answer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .._ext import blas_min_rows, default_threads
from ..batch import Batch
from ..loading.gguf_file import QuantTensor
from ..models.spec import Decoder
from ..step import StepMeta, as_step
from . import native
from .base import Backend, finite_rows
from .cpu_decoder import CpuDecoder
from .memory import lazy_zeros, off_file, release_file_pages, trim_heap
from .numpy_ops import NumpyOps

_kernels = native.kernels


def _pin_blas(n_threads: int):
    """Limit BLAS to our thread count so BLAS and the kernel pool never run more threads than cores."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return None
    return threadpool_limits(limits=n_threads, user_api="blas")


@dataclass(frozen=True, slots=True)
class PackedQuant(QuantTensor):
    """A QuantTensor whose rows are also packed in groups of 8 (kernels.repack): the int8
    matmul reads the groups (fewer instructions per weight, the same bits at any row count),
    embedding lookups and dequantization the row-major blocks."""

    packed: np.ndarray | None = None


def _pack(w, rows_per_piece: int = 4096):
    """w packed when its type has a packed layout and its rows split into groups of 8. Packed a
    piece at a time, read from the file (memory.off_file), each piece's row-major pages dropped
    from resident memory once copied (embedding rows are read from the file too): resident memory
    never holds a big matrix twice."""
    packable = int(w.qtype) in _kernels.PACKABLE_QTYPES and w.shape[0] % 8 == 0
    if not packable or isinstance(w, PackedQuant):
        return w
    rows, cols = w.shape
    packed = np.empty((rows // 8, _kernels.packed_bytes(int(w.qtype), cols)), np.uint8)
    for r0 in range(0, rows, rows_per_piece):
        piece = w.data[r0 : r0 + rows_per_piece]
        packed[r0 // 8 : (r0 + len(piece)) // 8] = _kernels.repack(
            off_file(piece), int(w.qtype), cols
        )
        release_file_pages(piece)
    return PackedQuant(w.qtype, w.shape, w.data, packed)


class CpuOps(NumpyOps):
    """NumpyOps' names and contracts over native kernels; weights held quantized / bf16 / f32."""

    def __init__(self, quantized: bool = True, pack: bool = True):
        self.quantized = quantized and _kernels is not None
        self.pack = pack

    # -- weights ------------------------------------------------------------------------------

    def weight(self, w):
        """QuantTensor stays ggml blocks, BF16Array stays bf16 bits, anything else float32."""
        if native.is_quant(w):
            if self.quantized and native.quant_supports(w.qtype):
                return _pack(w) if self.pack else w
            return w.dequantize()
        if native.is_bf16(w):
            if self.quantized:
                return w
            return w.dequantize()
        return np.ascontiguousarray(w, dtype=np.float32)

    # -- the ops ------------------------------------------------------------------------------

    def embedding(self, ids: np.ndarray, w) -> np.ndarray:
        """(N,), (V, D) -> (N, D): only the looked-up rows are dequantized."""
        if native.is_quant(w):
            return _kernels.dequantize_rows(w.data, int(w.qtype), w.shape[1], np.asarray(ids))
        if native.is_bf16(w):
            return (w.bits[np.asarray(ids)].astype(np.uint32) << 16).view(np.float32)
        return w[ids]

    def matmul(self, x: np.ndarray, w, out=None) -> np.ndarray:
        """(N, K), (M, K) -> (N, M): x @ w.T over quantized blocks, bf16 bits or float32."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if native.is_quant(w):
            data, qtype = native.matmul_operand(w)
            return _kernels.matmul_q(x, data, qtype, w.shape[1], out)
        if native.is_bf16(w):
            return _kernels.matmul_bf16(x, w.bits, out)
        if _kernels.get_blas_min_rows() and len(x) >= _kernels.get_blas_min_rows():
            return np.matmul(x, w.T, out=out)  # exact prefill: BLAS, rows vary with the count
        return _kernels.matmul_f32(x, w, out)

    def head_matmul(self, x, w):
        """(N, h, K), (h, M, K) -> (N, h, M): per head x[:, i] @ w[i].T, each output one
        fixed-order dot product whatever N (the kernel's; sgemm per head in exact prefill)."""
        return _kernels.head_matmul(x, w)

    def rms_norm(self, x, w, eps: float):
        """(..., D), (D,) -> (..., D): x / rms(x) * w."""
        return _kernels.rms_norm(x, w, eps)

    def rope(self, x, positions, inv_freq):
        """(N, h, Dh), (N,), (R/2,) -> (N, h, Dh): NeoX half rotation of the first R dims."""
        return _kernels.rope(x, positions, inv_freq)

    def silu_mul(self, gate, up):
        """(N, F), (N, F) -> (N, F)."""
        return _kernels.silu_mul(gate, up)

    def gelu_tanh_mul(self, gate, up):
        """(N, F), (N, F) -> (N, F)."""
        return _kernels.gelu_tanh_mul(gate, up)

    def softmax(self, x):
        """(..., K) -> (..., K)."""
        return _kernels.softmax(x)

    def write_kv(self, pool, x, slots) -> None:
        """(NB, BS, *shape), (N, *shape), (N,) -> None."""
        _kernels.write_kv(pool, x, slots)

    def paged_attention(self, q, k_pool, v_pool, step, scale: float, sliding_window=None):
        """(N, H, Dh), (NB, BS, KVH, Dh) x2 -> (N, H, Dh): K/V read in place via block tables."""
        b = as_step(step).batch
        return _kernels.paged_attention_arrays(
            q, k_pool, v_pool, b.query_start, b.seq_lens, b.positions, b.block_tables, scale,
            sliding_window,
        )  # fmt: skip


class CpuBackend(Backend):
    """Native executor: Cython kernels on a thread pool (ext/pool.h), weights kept as GGUF blocks.

    Args:
        device: "cpu" or None.
        dtype: None or "float32" (activations are float32; weights keep their stored type).
        num_threads: kernel / BLAS threads (default: every core, or what the kernels were
            initialised with).
        kv_dtype: "float32" or "float16" for the KV cache. float16 halves the cache and the bytes
            attention reads, as llama.cpp's default f16 cache does, at half-precision rounding of
            the cached keys and values.
        adapt_threads: decode steps on the thread count measured faster lately (_StepThreads);
            False: always num_threads.
        lower: run declared specs through the native decoder stack (False: op by op).
        exact_prefill: steps of many rows dequantize the weights and run float32 sgemm (and
            sgemm attention tiles) instead of the int8 kernels: float activations, for
            verification. Off (the default), every row count takes one integer path, so a
            request's tokens do not depend on what shares its step (batch invariance); on, a
            row's numerics change with the step's size.
        pack_weights: pack Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 matrices in groups of 8 rows at load
            (the faster int8 kernels, ext/quant_packed.h; a packed copy on the heap). False: the
            row kernels read the file's blocks in place (less memory, slower).
    """

    name = "cpu"
    lowerings: ClassVar[dict] = {Decoder: CpuDecoder}

    def __init__(
        self,
        device: str | None = None,
        dtype: str | None = None,
        num_threads: int | None = None,
        kv_dtype: str = "float32",
        adapt_threads: bool = True,
        lower: bool = True,
        exact_prefill: bool = False,
        pack_weights: bool = True,
    ):
        if device not in (None, "cpu"):
            raise ValueError(f"the cpu backend runs on the cpu only, not {device!r}")
        if dtype not in (None, "float32"):
            raise ValueError(f"the cpu backend computes in float32, not {dtype!r}")
        ok, reason = self.availability()
        if not ok:
            raise ValueError(reason)
        super().__init__(device, dtype, lower=lower)
        self.num_threads = default_threads() if num_threads is None else int(num_threads)
        if self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {num_threads}")
        if kv_dtype not in ("float32", "float16"):
            raise ValueError(f"kv_dtype must be 'float32' or 'float16', got {kv_dtype!r}")
        self.kv_dtype = kv_dtype
        self.kv_itemsize = 2 if kv_dtype == "float16" else 4
        self._threads_now = 0
        self._set_threads(self.num_threads)
        # the kernels' sgemm threshold is process-wide: set before each step of this backend
        self._blas_rows = blas_min_rows() if exact_prefill else 0
        self._blas_limits = _pin_blas(self.num_threads)
        self.ops = CpuOps(pack=pack_weights)
        # a backend is made after the checkpoint's metadata is parsed and the tokenizer built,
        # which free far more heap than they keep: hand it back before packing copies weights in
        trim_heap()
        self._step_threads = _StepThreads(self.num_threads, adapt=adapt_threads)
        # (L, P, NB, BS, ...) buffers behind allocate_kv's views, one per model it served (a
        # speculative draft model has its own)
        self._pools: list[np.ndarray] = []

    def _set_threads(self, n: int) -> None:
        if n != self._threads_now:
            _kernels.set_num_threads(n)
            self._threads_now = n

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        if _kernels is None:
            return False, f"native kernels not built: {native.IMPORT_ERROR}"
        return True, ""

    @classmethod
    def summary(cls) -> str:
        """One line for `tinyserve backends`: native kernels active, SIMD level, threads."""
        return (
            f"native kernels active ({_kernels.simd_level()}, {_kernels.get_isa()} quantized "
            f"matmul), {default_threads()} threads"
        )

    def describe(self) -> str:
        return (
            f"native kernels ({_kernels.simd_level()}; matmuls at the {_kernels.get_isa()} level), "
            f"{self.num_threads} threads, "
            f"{self.kv_dtype} KV cache"
        )

    # -- KV pools and the forward ---------------------------------------------------------------

    def allocate_kv(self, layer_specs, num_blocks: int, block_size: int):
        """One (L, P, NB, BS, *shape) array when every layer stores its P pools alike (k and v;
        MLA's one latent "kv"), handed out as per-layer views, so the decoder stack reaches all
        layers through one buffer."""
        names = list(layer_specs[0]) if layer_specs else []
        shapes = {tuple(shape) for spec in layer_specs for shape in spec.values()}
        if len(shapes) != 1 or any(list(spec) != names for spec in layer_specs):
            return super().allocate_kv(layer_specs, num_blocks, block_size)
        pools = lazy_zeros(
            (len(layer_specs), len(names), num_blocks, block_size, *shapes.pop()), self.kv_dtype
        )
        self._pools.append(pools)
        return [
            {name: pools[i, j] for j, name in enumerate(names)} for i in range(len(layer_specs))
        ]

    def _stack_pools(self, kv) -> np.ndarray | None:
        """The single buffer behind kv, when kv is the set of views allocate_kv handed out."""
        if not kv or not kv[0]:
            return None
        first = next(iter(kv[0].values())).ctypes.data
        for pools in self._pools:
            if pools.ctypes.data == first and len(kv) == pools.shape[0]:
                return pools
        return None

    def _native(self, model, kv) -> tuple[CpuDecoder, np.ndarray] | None:
        lowered = self.lowered(model)
        pools = None if lowered is None else self._stack_pools(kv)
        return None if pools is None else (lowered, pools)

    def forward(self, model, batch: Batch, kv) -> np.ndarray:
        """Logits (R, V) of batch.logits_rows; small (decode) steps run on the thread count
        measured faster lately (_StepThreads)."""
        step = self.step_meta(batch)
        fast = self._native(model, kv)
        if fast is None:
            return self._timed(step, lambda: _as_f32(model.forward(step, kv)))
        lowered, pools = fast

        def run():
            logits = lowered.logits(lowered.hidden(step, pools))
            lowered.after_step(step.n_tokens)
            return logits

        return self._timed(step, run)

    def forward_greedy(self, model, batch: Batch, kv, greedy: np.ndarray):
        """All rows greedy on the native stack with a quantized head below the BLAS row threshold:
        the head's argmax straight from the kernel (kernels.matmul_q_argmax, the same integer-path
        outputs), without the (R, V) logits."""
        fast = self._native(model, kv)
        R = len(batch.logits_rows)
        blas_rows = self._blas_rows
        if (
            fast is None
            or not greedy.all()
            or not fast[0].argmax_head
            or (blas_rows and R >= blas_rows)
        ):
            return super().forward_greedy(model, batch, kv, greedy)
        lowered, pools = fast
        step = self.step_meta(batch)

        def run():
            hidden = lowered.hidden(step, pools)  # (R, D) final-normed
            ids = lowered.argmax(hidden)
            lowered.after_step(step.n_tokens)
            # the head's scales were checked at load: finite rows give finite logits
            return ids, finite_rows(hidden)

        ids, finite = self._timed(step, run)
        return ids, np.zeros((0, model.cfg.vocab_size), np.float32), finite

    def _timed(self, step: StepMeta, run):
        n = step.n_tokens
        threads = self._step_threads.pick(n) if self.num_threads > 1 else 1
        self._set_threads(threads)
        if _kernels.get_blas_min_rows() != self._blas_rows:
            _kernels.set_blas_min_rows(self._blas_rows)
        t0 = time.perf_counter()
        out = run()
        self._step_threads.record(n, threads, time.perf_counter() - t0)
        return out


def _as_f32(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)


class _StepThreads:
    """The thread count for small steps (<= 16 tokens: decoding), chosen by measurement.

    On a machine shared with other jobs every parallel region of a decode step waits for its
    workers to get a core another process holds, so one thread can beat two; on an idle machine
    two threads read the weights faster. So each step size keeps a moving average of the seconds
    per step on each thread count, runs the faster one, and every 64th step re-measures the
    other; it switches only when the other is clearly (5%) faster, so noise does not flip it back
    and forth; larger steps (prefill) always use every thread. No result depends on the count.
    """

    EXPLORE_EVERY = 64
    MAX_TOKENS = 16
    SWITCH_MARGIN = 0.95  # the other count must take < 95% of the current one's time

    def __init__(self, max_threads: int, adapt: bool = True):
        self.options = (max_threads, 1) if max_threads > 1 and adapt else (max_threads,)
        self.avg: dict[tuple[int, int], float] = {}  # (step size bucket, threads) -> seconds
        self.steps: dict[int, int] = {}
        self.current: dict[int, int] = {}  # step size bucket -> thread count in use

    @staticmethod
    def _bucket(n: int) -> int:
        return 1 if n <= 1 else 4 if n <= 4 else 16

    def pick(self, n_tokens: int) -> int:
        """Threads for a step of n_tokens."""
        if len(self.options) == 1 or n_tokens > self.MAX_TOKENS:
            return self.options[0]
        b = self._bucket(n_tokens)
        k = self.steps[b] = self.steps.get(b, 0) + 1
        untried = [t for t in self.options if (b, t) not in self.avg]
        if untried:
            return untried[0]
        best = self.current.get(b) or min(self.options, key=lambda t: self.avg[(b, t)])
        other = next(t for t in self.options if t != best)
        if self.avg[(b, other)] < self.SWITCH_MARGIN * self.avg[(b, best)]:
            best = other
        self.current[b] = best
        if k % self.EXPLORE_EVERY == 0:
            return next(t for t in self.options if t != best)
        return best

    def record(self, n_tokens: int, threads: int, seconds: float) -> None:
        """One step's wall time on `threads` threads."""
        if len(self.options) == 1 or n_tokens > self.MAX_TOKENS:
            return
        key = (self._bucket(n_tokens), threads)
        old = self.avg.get(key)
        self.avg[key] = seconds if old is None else 0.5 * (old + seconds)
