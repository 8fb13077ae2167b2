"""The `cpu` backend: the same model files over Cython kernels (ext/ -> tinyserve._ext).

Weights stay as the checkpoint holds them: GGUF blocks stay quantized (resident memory ~ file size)
and are read directly by `tinyserve._ext.quant.matmul_q`; bf16 stays bf16; float32 goes to BLAS.
Every op has the name and shape contract of its NumPy reference (numpy_ops.py), checked by
tests/test_cpu_kernels.py. `forward` runs the model file op by op through `CpuOps`, except for a
Llama-family model whose matrices are all quantized: its layer stack then runs in one native call
(kernels.llama_layers, the same weights and maths), because at batch 1 a Python call per op per
layer costs more than the arithmetic. tests/test_cpu_backend.py holds both routes to the same logits.
"""

from __future__ import annotations

import os
import time

import numpy as np

from .._ext import default_threads
from ..batch import Batch
from .base import Backend
from .numpy_ops import NumpyOps

try:
    if os.environ.get("TINYSERVE_PURE_PYTHON") == "1":
        raise ImportError("TINYSERVE_PURE_PYTHON=1")
    from .._ext import kernels as _kernels

    _IMPORT_ERROR: str | None = None
except ImportError as e:
    _kernels, _IMPORT_ERROR = None, str(e)

try:  # the quantized matmul (ext/quant.pyx); without it quantized weights are dequantized at load
    if _kernels is None:
        raise ImportError("no native kernels")
    from .._ext import quant as _quant
except ImportError:
    _quant = None


def _pin_blas(n_threads: int):
    """Limit BLAS to our thread count so BLAS and the kernel pool never run more threads than cores."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return None
    return threadpool_limits(limits=n_threads, user_api="blas")


def _is_quant(w) -> bool:
    return hasattr(w, "qtype") and hasattr(w, "data")


def _is_bf16(w) -> bool:
    return type(w).__name__ == "BF16Array"


class CpuOps(NumpyOps):
    """NumpyOps' names and contracts over native kernels; weights held quantized / bf16 / f32."""

    def __init__(self, quantized: bool = True):
        self.quantized = quantized and _quant is not None

    # -- weights ------------------------------------------------------------------------------

    def weight(self, w):
        """QuantTensor stays ggml blocks, BF16Array stays bf16 bits, anything else float32."""
        if _is_quant(w):
            if self.quantized and _quant_supports(w.qtype):
                return w
            return w.dequantize()
        if _is_bf16(w):
            if self.quantized and hasattr(_quant, "matmul_bf16"):
                return w
            return w.dequantize()
        return np.ascontiguousarray(w, dtype=np.float32)

    # -- the ops ------------------------------------------------------------------------------

    def embedding(self, ids: np.ndarray, w) -> np.ndarray:
        """(N,), (V, D) -> (N, D): only the looked-up rows are dequantized."""
        if _is_quant(w):
            if hasattr(_quant, "dequantize_rows"):
                return _quant.dequantize_rows(w.data, int(w.qtype), w.shape[1], np.asarray(ids))
            return w.dequantize_rows(ids)
        if _is_bf16(w):
            return (w.bits[np.asarray(ids)].astype(np.uint32) << 16).view(np.float32)
        return w[ids]

    def matmul(self, x: np.ndarray, w, out=None) -> np.ndarray:
        """(N, K), (M, K) -> (N, M): x @ w.T over quantized blocks, bf16 bits or float32."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if _is_quant(w):
            return _quant.matmul_q(x, w.data, int(w.qtype), w.shape[1], out)
        if _is_bf16(w):
            return _quant.matmul_bf16(x, w.bits, out)
        if out is None:
            return x @ w.T
        return np.matmul(x, w.T, out=out)

    def rms_norm(self, x, w, eps: float):
        """(..., D), (D,) -> (..., D): x / rms(x) * w."""
        return _kernels.rms_norm(x, w, eps)

    def rope(self, x, positions, inv_freq):
        """(N, h, Dh), (N,), (R/2,) -> (N, h, Dh): NeoX half rotation of the first R dims."""
        return _kernels.rope(x, positions, inv_freq)

    def silu_mul(self, gate, up):
        """(N, F), (N, F) -> (N, F)."""
        return _kernels.silu_mul(gate, up)

    def softmax(self, x):
        """(..., K) -> (..., K)."""
        return _kernels.softmax(x)

    def write_kv(self, pool, x, slots) -> None:
        """(NB, BS, *shape), (N, *shape), (N,) -> None."""
        _kernels.write_kv(pool, x, slots)

    def paged_attention(self, q, k_pool, v_pool, batch: Batch, scale: float, sliding_window=None):
        """(N, H, Dh), (NB, BS, KVH, Dh) x2 -> (N, H, Dh): K/V read in place via block tables."""
        return _kernels.paged_attention(q, k_pool, v_pool, batch, scale, sliding_window)


def _quant_supports(qtype) -> bool:
    supported = getattr(_quant, "SUPPORTED_QTYPES", None)
    return supported is None or int(qtype) in {int(t) for t in supported}


class CpuBackend(Backend):
    """Native executor: Cython kernels on a thread pool (ext/pool.h), weights kept as GGUF blocks.

    Args:
        device: "cpu" or None.
        dtype: None or "float32" (activations are float32; weights keep their stored type).
        num_threads: kernel / BLAS threads (default: $TINYSERVE_NUM_THREADS, else all cores).
        kv_dtype: "float32" or "float16" for the KV cache (default: $TINYSERVE_KV_DTYPE, else
            float32). float16 halves the cache and the bytes attention reads, as llama.cpp's
            default f16 cache does, at half-precision rounding of the cached keys and values.
    """

    name = "cpu"

    def __init__(
        self,
        device: str | None = None,
        dtype: str | None = None,
        num_threads: int | None = None,
        kv_dtype: str | None = None,
    ):
        if device not in (None, "cpu"):
            raise ValueError(f"the cpu backend runs on the cpu only, not {device!r}")
        if dtype not in (None, "float32"):
            raise ValueError(f"the cpu backend computes in float32, not {dtype!r}")
        ok, reason = self.availability()
        if not ok:
            raise ValueError(reason)
        super().__init__(device, dtype)
        self.num_threads = default_threads() if num_threads is None else int(num_threads)
        if self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {num_threads}")
        self.kv_dtype = kv_dtype or os.environ.get("TINYSERVE_KV_DTYPE") or "float32"
        if self.kv_dtype not in ("float32", "float16"):
            raise ValueError(f"kv_dtype must be 'float32' or 'float16', got {self.kv_dtype!r}")
        self.kv_itemsize = 2 if self.kv_dtype == "float16" else 4
        self._threads_now = 0
        self._n_steps = 0
        self._set_threads(self.num_threads)
        self._blas_limits = _pin_blas(self.num_threads)
        self.ops = CpuOps()
        adapt = os.environ.get("TINYSERVE_ADAPT_THREADS", "1") != "0"
        self._step_threads = _StepThreads(self.num_threads, adapt=adapt)

    def _set_threads(self, n: int) -> None:
        if n != self._threads_now:
            _kernels.set_num_threads(n)  # tinyserve._ext.quant shares the count (one pool)
            self._threads_now = n

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        if _kernels is None:
            return False, f"native kernels not built: {_IMPORT_ERROR}"
        return True, ""

    @classmethod
    def summary(cls) -> str:
        """One line for `tinyserve backends`: native kernels active, SIMD level, threads."""
        quant = (
            "quantized matmul"
            if _quant is not None
            else "no quantized matmul (weights dequantized)"
        )
        return (
            f"native kernels active ({_kernels.simd_level()}), {quant}, "
            f"{default_threads()} threads"
        )

    def describe(self) -> str:
        return (
            f"native kernels ({_kernels.simd_level()}), {self.num_threads} threads, "
            f"{self.kv_dtype} KV cache"
        )

    # -- KV pools and the fused forward -----------------------------------------------------------

    def allocate_kv(self, layer_specs, num_blocks: int, block_size: int):
        """One (L, 2, NB, BS, KVH, Dh) array when every layer stores k and v alike, handed out as
        per-layer views, so the fused path reaches all layers through one buffer."""
        shapes = {tuple(spec.get("k", ())) for spec in layer_specs}
        if len(shapes) != 1 or any(
            set(spec) != {"k", "v"} or spec["k"] != spec["v"] for spec in layer_specs
        ):
            return super().allocate_kv(layer_specs, num_blocks, block_size)
        pools = _lazy_zeros(
            (len(layer_specs), 2, num_blocks, block_size, *shapes.pop()), np.dtype(self.kv_dtype)
        )
        self._kv_all = pools
        return [{"k": pools[i, 0], "v": pools[i, 1]} for i in range(len(layer_specs))]

    def forward(self, model, batch: Batch, kv) -> np.ndarray:
        """Logits (R, V) of batch.logits_rows; the fused layer stack when the model allows it.
        Small (decode) steps run on the thread count measured faster lately (_StepThreads)."""
        return self._timed(batch, lambda: self._forward(model, batch, kv))

    def forward_greedy(self, model, batch: Batch, kv, greedy: np.ndarray):
        """All rows greedy on the fused path with a quantized head below the BLAS row threshold:
        the head's argmax straight from the kernel (quant.matmul_q_argmax, the same integer-path
        outputs), without the (R, V) logits (3 MB a step for 16 requests)."""
        head = getattr(model, "lm_head", None)
        R = len(batch.logits_rows)
        blas_rows = _quant.get_blas_min_rows() if _quant is not None else 0
        if (
            not greedy.all()
            or not _is_quant(head)
            or not _quant_supports(head.qtype)
            or (blas_rows and R >= blas_rows)
            or self._fused_weights(model, kv) is None
        ):
            return super().forward_greedy(model, batch, kv, greedy)

        def run():
            x = self._hidden(model, batch, kv)  # (R, D)
            ids = _quant.matmul_q_argmax(x, head.data, int(head.qtype), head.shape[1])
            self._after_step(batch)
            return ids

        return self._timed(batch, run), np.zeros((0, head.shape[0]), np.float32)

    def _timed(self, batch: Batch, run):
        n = len(batch.token_ids)
        threads = self._step_threads.pick(n) if self.num_threads > 1 else 1
        self._set_threads(threads)
        t0 = time.perf_counter()
        out = run()
        self._step_threads.record(n, threads, time.perf_counter() - t0)
        return out

    def _forward(self, model, batch: Batch, kv) -> np.ndarray:
        if self._fused_weights(model, kv) is None:
            return super().forward(model, batch, kv)
        x = self._hidden(model, batch, kv)  # (R, D)
        logits = self.ops.matmul(x, model.lm_head)  # (R, V)
        self._after_step(batch)
        return np.asarray(logits, dtype=np.float32)

    def _after_step(self, batch: Batch) -> None:
        self._n_steps += 1
        if len(batch.token_ids) >= _TRIM_MIN_TOKENS or self._n_steps % _TRIM_EVERY == 0:
            _trim_heap()

    def _hidden(self, model, batch: Batch, kv) -> np.ndarray:
        """(R, D): the final-normed residual rows of batch.logits_rows, through the fused stack."""
        fused = self._fused_weights(model, kv)
        ops, cfg = self.ops, model.cfg
        seq_of = np.repeat(np.arange(len(batch.seq_lens)), np.diff(batch.query_start))  # (N,)
        rows = np.asarray(batch.logits_rows, dtype=np.int64)  # (R,)
        hidden, order = [], []  # per chunk: the residual rows we sample from, their places in rows
        n = len(batch.token_ids)
        if n == 0:
            return np.zeros((0, cfg.hidden_size), np.float32)
        # At most LAYERS_CHUNK tokens go through the stack at a time, embedded chunk by chunk: a
        # chunk writes its K/V before the next one attends to them (causal by position), so the
        # result is the same, and only the logits rows of each chunk are kept.
        for c0 in range(0, n, LAYERS_CHUNK):
            c1 = min(c0 + LAYERS_CHUNK, n)
            x = ops.embedding(batch.token_ids[c0:c1], model.embed)  # (C, D)
            x = np.ascontiguousarray(x, dtype=np.float32)
            _kernels.llama_layers(
                x,
                *fused,
                self._kv_all,
                batch.positions[c0:c1],
                batch.slots[c0:c1],
                seq_of[c0:c1],
                batch.seq_lens,
                batch.block_tables,
                model.inv_freq,
                cfg.norm_eps,
                model.scale,
                cfg.sliding_window,
                cfg.n_heads,
                cfg.intermediate_size,
                _QUANT_ISA.index(_quant.get_isa()),
            )
            at = np.flatnonzero((rows >= c0) & (rows < c1))
            keep = rows[at] - c0
            whole = len(keep) == len(x) and (keep == np.arange(len(x))).all()
            hidden.append(x if whole else x[keep])
            order.append(at)
        x = hidden[0] if len(hidden) == 1 else np.concatenate(hidden)
        if len(hidden) > 1:  # back in logits_rows' order
            x = x[np.argsort(np.concatenate(order), kind="stable")]  # (R, D)
        return ops.rms_norm(x, model.norm, cfg.norm_eps)

    def _fused_weights(self, model, kv):
        """The layer stack as pointer tables for kernels.llama_layers, or None when it does not
        apply (not the Llama family, a dense matrix, separate KV pools)."""
        if os.environ.get("TINYSERVE_CPU_FUSED") == "0":
            return None
        cache = getattr(model, "_cpu_fused", False)
        if cache is False:
            cache = _build_fused(model)
            try:
                model._cpu_fused = cache
            except AttributeError:
                return cache
        pools = getattr(self, "_kv_all", None)
        if cache is None or pools is None or len(kv) != pools.shape[0]:
            return None
        if kv[0]["k"].ctypes.data != pools.ctypes.data:  # not the views allocate_kv handed out
            return None
        return cache


class _StepThreads:
    """The thread count for small steps (<= 16 tokens: decoding), chosen by measurement.

    On a machine shared with other jobs every parallel region of a decode step waits for its
    workers to get a core another process holds: SmolLM2-135M's layer stack took 5.0 ms per
    token on 1 thread and 7.8 ms on 2 on a loaded 2-core box. On an idle machine 2 threads read
    the weights faster. So each step size keeps a moving average of the seconds per step on each
    thread count, runs the faster one, and every 64th step re-measures the other; it switches only
    when the other is clearly (5%) faster, so noise does not flip it back and forth; larger steps
    (prefill) always use every thread. No result depends on the thread count.
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


# Tokens per pass through the fused layer stack: bounds a prefill's activations (~19 KB a row
# for SmolLM2: ~5 MB at 256 rows). 512 prefilled ~8% faster but added ~5 MiB to peak RSS.
LAYERS_CHUNK = 256

# A step of this many tokens frees megabytes of activations; glibc keeps freed heap memory
# resident (its mmap threshold rises to the biggest array freed), so the step hands it back.
# Decode steps free smaller pieces (logits, batch arrays, outputs) that added up to ~7 MiB over
# 64 steps of 16 requests: every _TRIM_EVERY-th step hands those back too.
_TRIM_MIN_TOKENS = 256
_TRIM_EVERY = 16
_malloc_trim = False


def _trim_heap() -> None:
    """Return free heap pages to the OS (glibc malloc_trim, ~0.1 ms; a no-op elsewhere)."""
    global _malloc_trim
    if _malloc_trim is False:
        try:
            import ctypes

            _malloc_trim = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = None
    if _malloc_trim is not None:
        _malloc_trim(0)


_FLOAT32 = np.dtype(np.float32)


def _lazy_zeros(shape, dtype: np.dtype = _FLOAT32) -> np.ndarray:
    """Zeros whose pages become resident only when written, in 4 KB pages: with
    transparent huge pages, a sequence's first KV block in each of the 60 (layer, k|v) pools
    faulted in a whole 2 MB page (one 128-token prompt made 124 of the 147 MB pool resident)."""
    import mmap

    nbytes = int(np.prod(shape)) * dtype.itemsize
    if nbytes == 0 or not hasattr(mmap, "MADV_NOHUGEPAGE"):
        return np.zeros(shape, dtype=dtype)
    buf = mmap.mmap(-1, nbytes)  # anonymous: zero pages, faulted in on first write
    buf.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(buf, dtype=dtype).reshape(shape)


_QUANT_ISA = ["scalar", "avx2", "vnni"]
_MATRICES = ("q", "k", "v", "o", "gate", "up", "down")


def _build_fused(model):
    """(wptr, wstride, wtype, norms, biases, qk norms) tables for a Llama model with every matrix
    quantized in a type the matmul kernel reads; None otherwise."""
    from ..models.llama import LlamaModel

    if _quant is None or not isinstance(model, LlamaModel):
        return None
    L, D = len(model.layers), model.cfg.hidden_size
    wptr = np.zeros((L, 7), np.int64)
    wstride = np.zeros((L, 7), np.int64)
    wtype = np.zeros((L, 7), np.int32)
    for i, w in enumerate(model.layers):
        for j, name in enumerate(_MATRICES):
            lin = getattr(w, name)
            if (
                not _is_quant(lin.w)
                or not _quant_supports(lin.w.qtype)
                or lin.w.data.strides[1] != 1
            ):
                return None
            if name in ("o", "gate", "up", "down") and lin.b is not None:
                return None
            wptr[i, j] = lin.w.data.ctypes.data
            wstride[i, j] = lin.w.data.strides[0]
            wtype[i, j] = int(lin.w.qtype)

    def stack(values, width):
        if all(v is None for v in values):
            return np.zeros((0, 0), np.float32)
        if any(v is None for v in values):
            raise _NotFusable
        return np.ascontiguousarray(
            np.stack([np.asarray(v, np.float32).reshape(width) for v in values])
        )

    H, KVH, Dh = model.cfg.n_heads, model.cfg.n_kv_heads, model.cfg.head_dim
    try:
        tables = (
            wptr,
            wstride,
            wtype,
            stack([w.attn_norm for w in model.layers], D),
            stack([w.ffn_norm for w in model.layers], D),
            stack([w.q.b for w in model.layers], H * Dh),
            stack([w.k.b for w in model.layers], KVH * Dh),
            stack([w.v.b for w in model.layers], KVH * Dh),
            stack([w.q_norm for w in model.layers], Dh),
            stack([w.k_norm for w in model.layers], Dh),
        )
    except _NotFusable:
        return None
    if tables[5].shape[0] != tables[6].shape[0] or tables[8].shape[0] != tables[9].shape[0]:
        return None
    return tables


class _NotFusable(Exception):
    """Some layers have an optional weight that others lack."""
