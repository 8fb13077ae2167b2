# cython: language_level=3, cdivision=True
"""The native kernels, one module: twins of tinyserve.backends.numpy_ops (and of
sampling.filtered_probs), the quantized / bf16 matmuls over ggml blocks (quant.pxi, ext/quant.h),
and the decoder layer stack the cpu backend lowers specs to. One thread pool (ext/pool.h), one
BLAS and instruction-set state.

Each `def` has the name, arguments and shape contract of its NumPy reference; it coerces inputs
(float32, C-contiguous, 2-D views) and calls a `cdef ... noexcept nogil` kernel on typed
memoryviews, parallel over rows / heads / sequences on the kernel thread pool.
tests/test_cpu_kernels.py and tests/test_quant_kernels.py run every twin against its reference.
"""

import numpy as np

from tinyserve._ext import (
    blas_min_rows,
    default_threads,
    find_blas_local_threads,
    find_sgemm,
    quant_isa,
)

cimport cython
cimport numpy as cnp
from libc.math cimport INFINITY, cos, exp, expf, sin, sqrtf
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset

cnp.import_array()


cdef extern from "kernels_simd.h" nogil:
    float ts_dot(const float *a, const float *b, int64_t n)
    void ts_scale_axpy(float *y, float c, float a, const float *x, int64_t n)
    void ts_axpy(float *y, float a, const float *x, int64_t n)
    float ts_sumsq(const float *x, int64_t n)
    void ts_scale_mul(float *y, const float *x, float r, const float *w, int64_t n)
    void ts_silu_mul(float *y, const float *g, const float *u, int64_t n)
    void ts_gelu_tanh_mul(float *y, const float *g, const float *u, int64_t n)
    const char *ts_simd_level()


cdef extern from "pool.h" nogil:
    ctypedef void (*ts_task_fn)(void *ctx, int64_t task)
    void ts_parallel_for(int nthreads, int64_t n_tasks, ts_task_fn fn, void *ctx)
    void *ts_pool_get(int workers)
    int ts_threads()
    void ts_set_threads(int n)

cdef extern from "kernels_simd.h" nogil:
    void ts_float_to_half_row(const float *src, uint16_t *dst, int64_t n)

cdef extern from "kernels_attn.h" nogil:
    ctypedef struct ts_attn_job:
        const float *q
        const void *k
        const void *v
        int64_t v_block, v_row
        int kv_f16, wide
        const int64_t *seq_of
        const int64_t *seq_lens
        const int64_t *positions
        const int32_t *block_tables
        int64_t max_blocks, H, Dh, Dv, BS, KVH, window, n_spans
        float scale
        float *out
        float *part
        const int64_t *tokens
        const int64_t *tile_start
    void ts_attn_task(void *ctx, int64_t item)
    void ts_attn_merge_task(void *ctx, int64_t th)
    int64_t ts_attn_max_pieces(int64_t max_len)
    int TS_ATTN_QTILE, TS_ATTN_WIDE


cdef extern from "kernels_sample.h" nogil:
    ctypedef struct ts_prob_idx:
        double p
        int64_t i
    double ts_kth_largest(double *x, int64_t n, int64_t k)
    void ts_sort_prob_desc(ts_prob_idx *v, int64_t n)


def set_num_threads(int n):
    """Threads for every parallel kernel (one pool, one count; the pool grows to n - 1 workers).
    Default: TINYSERVE_NUM_THREADS (tinyserve.settings), else os.cpu_count()."""
    if n < 1:
        raise ValueError(f"thread count must be >= 1, got {n}")
    ts_set_threads(n)


def get_num_threads() -> int:
    return ts_threads()


if ts_pool_get(0) == NULL:  # made at import, under the GIL: one pool per process
    raise MemoryError("cannot allocate the kernel thread pool")
ts_set_threads(default_threads())


def simd_level() -> str:
    """The vector instruction set the kernels were compiled for ("avx2+fma" or "scalar")."""
    return ts_simd_level().decode()


cdef inline int _threads_for(int64_t work) noexcept nogil:
    """Small problems stay on one thread: waking a team costs more than it saves."""
    if work < 32768:
        return 1
    return ts_threads()


def _f32_rows(x, int width):
    """Any (..., width) array -> C-contiguous float32 (rows, width) view or copy."""
    a = np.ascontiguousarray(x, dtype=np.float32)
    return a.reshape(-1, width)


# -- elementwise / row ops -----------------------------------------------------------------------


# Row ops run on the kernel thread pool (ext/pool.h) in tasks of ROWS rows; a small problem
# (_threads_for) stays on the calling thread.
DEF ROWS = 16


cdef struct _RowJob:
    const float *a  # (N, D) input
    const float *b  # (N, D) second input / (D,) weight / (N, 2 * half) cos|sin table
    float *out  # (N, D)
    Py_ssize_t N, D, nh, half
    Py_ssize_t ld  # row stride, where rows are not D apart (_rms_ld_task)
    float eps


cdef inline void _rows_run(_RowJob *job, int64_t work, ts_task_fn fn) noexcept nogil:
    ts_parallel_for(_threads_for(work), (job.N + ROWS - 1) // ROWS, fn, job)


cdef void _rms_task(void *ctx, int64_t t) noexcept nogil:
    cdef _RowJob *j = <_RowJob *>ctx
    cdef Py_ssize_t n, D = j.D
    cdef float r
    for n in range(t * ROWS, min(t * ROWS + ROWS, j.N)):
        r = 1.0 / sqrtf(ts_sumsq(j.a + n * D, D) / D + j.eps)
        ts_scale_mul(j.out + n * D, j.a + n * D, r, j.b, D)


cdef void _rms_ld_task(void *ctx, int64_t t) noexcept nogil:
    """In place: rows of D numbers, ld apart (a slice of wider rows)."""
    cdef _RowJob *j = <_RowJob *>ctx
    cdef Py_ssize_t n, D = j.D
    cdef float r
    cdef float *row
    for n in range(t * ROWS, min(t * ROWS + ROWS, j.N)):
        row = j.out + n * j.ld
        r = 1.0 / sqrtf(ts_sumsq(row, D) / D + j.eps)
        ts_scale_mul(row, row, r, j.b, D)


@cython.boundscheck(False)
@cython.wraparound(False)
cdef void _rms_norm(const float[:, ::1] x, const float[::1] w, float eps, float[:, ::1] out) noexcept nogil:
    cdef _RowJob job
    job.a, job.b, job.out = &x[0, 0], &w[0], &out[0, 0]
    job.N, job.D, job.eps = x.shape[0], x.shape[1], eps
    _rows_run(&job, job.N * job.D, _rms_task)


def rms_norm(x, w, float eps, out=None):
    """(..., D), (D,) -> (..., D): x / rms(x) * w."""
    x = np.asarray(x)
    D = x.shape[-1]
    w = np.ascontiguousarray(w, dtype=np.float32)
    if w.shape != (D,):
        raise ValueError(f"rms_norm weight has shape {w.shape}, expected ({D},)")
    x2 = _f32_rows(x, D)
    if out is None:
        out = np.empty(x.shape, dtype=np.float32)
    if x2.shape[0]:
        _rms_norm(x2, w, eps, out.reshape(-1, D))
    return out


cdef void _rope_task(void *ctx, int64_t t) noexcept nogil:
    cdef _RowJob *j = <_RowJob *>ctx
    cdef Py_ssize_t n, h, i, half = j.half, nh = j.nh
    cdef float c, s, x1, x2
    cdef float *x
    cdef const float *cs
    for n in range(t * ROWS, min(t * ROWS + ROWS, j.N)):
        cs = j.b + n * 2 * half
        for h in range(nh):
            x = j.out + (n * nh + h) * j.D
            for i in range(half):
                c, s = cs[i], cs[half + i]
                x1 = x[i]
                x2 = x[i + half]
                x[i] = x1 * c - x2 * s
                x[i + half] = x2 * c + x1 * s


@cython.boundscheck(False)
@cython.wraparound(False)
cdef void _rope_cs(float[:, :, ::1] x, const float[:, ::1] cs) noexcept nogil:
    """x (N, h, Dh) rotated in place by the (N, 2 * half) table of cos | sin (rope_table)."""
    cdef _RowJob job
    job.b, job.out = &cs[0, 0], &x[0, 0, 0]
    job.N, job.nh, job.D, job.half = x.shape[0], x.shape[1], x.shape[2], cs.shape[1] // 2
    _rows_run(&job, job.N * job.nh * job.half * 4, _rope_task)


def rope_table(positions, inv_freq):
    """(N,), (half,) -> (N, 2 * half) float32: cos | sin of each position's angles, computed in
    float64 as the reference does; one table serves every layer of a forward."""
    angles = np.asarray(positions, dtype=np.float64)[:, None] * np.asarray(inv_freq, np.float32).astype(np.float64)
    return np.ascontiguousarray(np.concatenate([np.cos(angles), np.sin(angles)], axis=1), dtype=np.float32)


def rope_(x, positions, inv_freq):
    """(N, h, Dh) float32 C-contiguous, (N,), (R/2,) -> None: rope in place."""
    inv_freq = np.ascontiguousarray(inv_freq, dtype=np.float32)
    positions = np.ascontiguousarray(positions, dtype=np.int64)
    if x.ndim != 3 or x.dtype != np.float32 or not x.flags.c_contiguous:
        raise ValueError("rope_ needs a C-contiguous float32 (N, h, Dh) array")
    if 2 * inv_freq.shape[0] > x.shape[2]:
        raise ValueError(f"{inv_freq.shape[0]} frequencies rotate more than head dim {x.shape[2]}")
    if positions.shape[0] != x.shape[0]:
        raise ValueError(f"{positions.shape[0]} positions for {x.shape[0]} tokens")
    if x.shape[0] and x.shape[1] and inv_freq.shape[0]:
        _rope_cs(x, rope_table(positions, inv_freq))


def rope(x, positions, inv_freq):
    """(N, h, Dh), (N,), (R/2,) -> (N, h, Dh): rotate the first R dims in halves (NeoX / HF layout)."""
    out = np.array(x, dtype=np.float32, order="C", copy=True)
    rope_(out, positions, inv_freq)
    return out


cdef void _silu_task(void *ctx, int64_t t) noexcept nogil:
    cdef _RowJob *j = <_RowJob *>ctx
    cdef Py_ssize_t n, F = j.D
    for n in range(t * ROWS, min(t * ROWS + ROWS, j.N)):
        ts_silu_mul(j.out + n * F, j.a + n * F, j.b + n * F, F)


@cython.boundscheck(False)
@cython.wraparound(False)
cdef void _silu_mul(const float[:, ::1] g, const float[:, ::1] u, float[:, ::1] out) noexcept nogil:
    cdef _RowJob job
    job.a, job.b, job.out = &g[0, 0], &u[0, 0], &out[0, 0]
    job.N, job.D = g.shape[0], g.shape[1]
    _rows_run(&job, job.N * job.D * 4, _silu_task)


def silu_mul(gate, up, out=None):
    """(N, F), (N, F) -> (N, F): silu(gate) * up, the SwiGLU feed-forward's middle."""
    gate, up = np.asarray(gate), np.asarray(up)
    if gate.shape != up.shape:
        raise ValueError(f"silu_mul shapes differ: {gate.shape} vs {up.shape}")
    F = gate.shape[-1]
    if out is None:
        out = np.empty(gate.shape, dtype=np.float32)
    if gate.size:
        _silu_mul(_f32_rows(gate, F), _f32_rows(up, F), out.reshape(-1, F))
    return out


cdef void _softmax_task(void *ctx, int64_t t) noexcept nogil:
    cdef _RowJob *j = <_RowJob *>ctx
    cdef Py_ssize_t n, i, K = j.D
    cdef float m, total
    cdef float *x
    for n in range(t * ROWS, min(t * ROWS + ROWS, j.N)):
        x = j.out + n * K
        m = -INFINITY
        for i in range(K):
            if x[i] > m:
                m = x[i]
        total = 0  # subtract the max for stability
        for i in range(K):
            x[i] = expf(x[i] - m)
            total = total + x[i]
        for i in range(K):
            x[i] = x[i] / total


@cython.boundscheck(False)
@cython.wraparound(False)
cdef void _softmax(float[:, ::1] x) noexcept nogil:
    cdef _RowJob job
    job.out = &x[0, 0]
    job.N, job.D = x.shape[0], x.shape[1]
    _rows_run(&job, job.N * job.D * 4, _softmax_task)


def softmax(x):
    """(..., K) -> (..., K) over the last axis."""
    out = np.array(x, dtype=np.float32, order="C", copy=True)
    if out.size:
        _softmax(out.reshape(-1, out.shape[-1]))
    return out


def head_matmul(x, w):
    """(N, h, K), (h, M, K) float32 -> (N, h, M): per head x[:, i] @ w[i].T, each output one
    fixed-order dot product whatever N (ext/head_matmul.h; sgemm per head in exact prefill)."""
    xc = np.ascontiguousarray(x, dtype=np.float32)
    wc = np.ascontiguousarray(w, dtype=np.float32)
    if xc.ndim != 3 or wc.ndim != 3 or xc.shape[1] != wc.shape[0] or xc.shape[2] != wc.shape[2]:
        raise ValueError(f"head_matmul needs (N, h, K) and (h, M, K), got {xc.shape}, {wc.shape}")
    cdef Py_ssize_t N = xc.shape[0], H = xc.shape[1], K = xc.shape[2], M = wc.shape[1]
    out = np.empty((N, H, M), np.float32)
    if out.size == 0:
        return out
    cdef size_t xp = xc.ctypes.data, wp = wc.ctypes.data, op = out.ctypes.data
    cdef int threads = _threads_for(N * H * M * K)
    with nogil:
        ts_head_matmul(<const float *>xp, N, H, K, <const float *>wp, M, <float *>op, threads)
    return out


# -- paged KV cache ------------------------------------------------------------------------------


cdef void _write_kv(void *pool, int f16, const float[:, ::1] x, const int64_t[::1] slots) noexcept nogil:
    """Row n of x to slot slots[n] of a (n_slots, W) pool: float32, or IEEE half if f16."""
    cdef Py_ssize_t n, W = x.shape[1]
    for n in range(x.shape[0]):
        if f16:
            ts_float_to_half_row(&x[n, 0], <uint16_t *>pool + slots[n] * W, W)
        else:
            memcpy(<float *>pool + slots[n] * W, &x[n, 0], W * sizeof(float))


def write_kv(pool, x, slots):
    """(NB, BS, *shape), (N, *shape), (N,) -> None: store token n at slot = block * BS + offset
    (rounded to half precision in a float16 pool)."""
    if pool.dtype not in (np.float32, np.float16) or not pool.flags.c_contiguous:
        raise ValueError("write_kv needs a C-contiguous float32 or float16 pool")
    width = int(np.prod(pool.shape[2:]))
    n_slots = pool.shape[0] * pool.shape[1]
    slots = np.ascontiguousarray(slots, dtype=np.int64)
    x2 = _f32_rows(x, width)
    if x2.shape[0] != slots.shape[0]:
        raise ValueError(f"{x2.shape[0]} tokens but {slots.shape[0]} slots")
    if slots.shape[0] and (slots.min() < 0 or slots.max() >= n_slots):
        raise IndexError(f"KV slot out of range [0, {n_slots}): {slots.min()}..{slots.max()}")
    cdef size_t p = pool.ctypes.data
    _write_kv(<void *>p, pool.dtype == np.float16, x2, slots)


DEF ATTN_GEMM_MIN_TOKENS = 32  # a sequence's run of new tokens from which attention uses sgemm
DEF ATTN_TILE_TOKENS = 16  # a prefill's tokens per attention task (<= TS_ATTN_QTILE)


@cython.boundscheck(False)
@cython.wraparound(False)
cdef int _paged_attention(
    const float[:, :, ::1] q,  # (N, H, Dh)
    const void *k_pool,  # (NB, BS, KVH, Dh), C-contiguous: float32, or IEEE half if kv_f16
    const void *v_pool,  # (NB, BS, KVH, Dv)
    int kv_f16, Py_ssize_t BS, Py_ssize_t KVH, Py_ssize_t Dv,
    int64_t v_block, int64_t v_row,  # elements between v's blocks / rows (contiguous: BS*KVH*Dv, KVH*Dv)
    const int64_t[::1] seq_of,  # (N,) sequence of each token
    const int64_t[::1] seq_lens,  # (S,)
    const int64_t[::1] positions,  # (N,)
    const int32_t[:, ::1] block_tables,  # (S, max_blocks)
    float scale,
    int64_t window,  # 0: none
    int64_t n_spans,  # pieces each token's keys are cut into (the threads share a sequence)
    float[:, :, ::1] out,  # (N, H, Dv); may be q itself (Dv == Dh)
    int isa,  # the kernels' ISA level (TS_ISA_*): from vnni on, attention's AVX-512 twins
) noexcept nogil:
    """0, or -1: out of memory."""
    cdef Py_ssize_t N = q.shape[0], H = q.shape[1], Dh = q.shape[2]
    cdef ts_attn_job job
    job.q = &q[0, 0, 0]
    job.k, job.v, job.kv_f16 = k_pool, v_pool, kv_f16
    job.wide = TS_ATTN_WIDE and isa >= TS_ISA_VNNI
    job.v_block, job.v_row = v_block, v_row
    job.seq_of = &seq_of[0]
    job.seq_lens = &seq_lens[0]
    job.positions = &positions[0]
    job.block_tables = &block_tables[0, 0]
    job.max_blocks = block_tables.shape[1]
    job.H, job.Dh, job.Dv, job.BS, job.KVH = H, Dh, Dv, BS, KVH
    job.window, job.scale, job.n_spans = window, scale, n_spans
    job.out = &out[0, 0, 0]
    job.part = NULL
    job.tokens = NULL
    job.tile_start = NULL
    cdef int threads = _threads_for(N * H * 4096)
    cdef Py_ssize_t n_rest = N
    cdef ts_attn_gemm_job gemm
    cdef int rc = 0
    cdef int64_t *tile_start = NULL
    cdef int64_t n_items = N * KVH * n_spans
    if not kv_f16 and n_spans == 1 and Dv <= Dh and N >= ATTN_GEMM_MIN_TOKENS and ts_attn_gemm_ready():
        # long runs of one sequence's new tokens (prefill) through sgemm, in tiles; the rest
        # (decodes batched with them) through the per-token online softmax below
        gemm.a, gemm.failed = &job, 0
        gemm.tiles = <int64_t *>malloc((2 * N + 2) * sizeof(int64_t))
        job.tokens = <int64_t *>malloc((N + 1) * sizeof(int64_t))
        if gemm.tiles == NULL or job.tokens == NULL:
            free(<void *>gemm.tiles)
            free(<void *>job.tokens)
            return -1
        gemm.n_tiles = _gemm_tiles(seq_of, <int64_t *>gemm.tiles, <int64_t *>job.tokens, &n_rest)
        if gemm.n_tiles:
            rc = ts_attn_gemm(&gemm, ts_threads())
        free(<void *>gemm.tiles)
        n_items = n_rest * KVH * n_spans
    if rc == 0 and n_rest:
        if n_spans > 1:
            job.part = <float *>malloc(N * H * n_spans * (Dv + 2) * sizeof(float))
            if job.part == NULL:
                rc = -1
        if rc == 0 and n_spans == 1:
            # the tiles' size only balances the threads: a token's bits do not depend on it
            tile_start = <int64_t *>malloc((n_rest + 1) * sizeof(int64_t))
            if tile_start == NULL:
                rc = -1
            else:
                job.tile_start = tile_start
                n_items = _attn_tiles(seq_of, job.tokens, n_rest,
                                      max(1, min(ATTN_TILE_TOKENS, n_rest * KVH // (4 * threads))),
                                      tile_start) * KVH
        if rc == 0:
            ts_parallel_for(threads, n_items, ts_attn_task, &job)
            if n_spans > 1:
                ts_parallel_for(threads if n_rest * H >= 64 else 1, n_rest * H, ts_attn_merge_task,
                                &job)
        free(job.part)
        free(tile_start)
    free(<void *>job.tokens)
    return rc


@cython.boundscheck(False)
@cython.wraparound(False)
cdef int64_t _gemm_tiles(const int64_t[::1] seq_of, int64_t *tiles, int64_t *rest,
                         Py_ssize_t *n_rest) noexcept nogil:
    """Cut the runs of equal seq_of (one sequence's new tokens) of >= ATTN_GEMM_MIN_TOKENS into
    tiles of <= TS_ATTN_TILE tokens ((first, end) pairs in tiles); the other tokens go to rest.
    -> the number of tiles."""
    cdef Py_ssize_t N = seq_of.shape[0], a = 0, b, t
    cdef int64_t n_tiles = 0
    n_rest[0] = 0
    while a < N:
        b = a + 1
        while b < N and seq_of[b] == seq_of[a]:
            b += 1
        if b - a >= ATTN_GEMM_MIN_TOKENS:
            t = a
            while t < b:
                tiles[2 * n_tiles] = t
                tiles[2 * n_tiles + 1] = min(t + TS_ATTN_TILE, b)
                n_tiles += 1
                t += TS_ATTN_TILE
        else:
            for t in range(a, b):
                rest[n_rest[0]] = t
                n_rest[0] += 1
        a = b
    return n_tiles


@cython.boundscheck(False)
@cython.wraparound(False)
cdef int64_t _attn_tiles(const int64_t[::1] seq_of, const int64_t *tokens, Py_ssize_t n,
                         Py_ssize_t size, int64_t *starts) noexcept nogil:
    """Cut the token list (tokens, or 0 .. n - 1 if NULL) into tiles of <= size consecutive
    entries of one sequence, tile i = entries starts[i] .. starts[i + 1]. -> the number of tiles."""
    cdef Py_ssize_t i = 0, a
    cdef int64_t n_tiles = 0
    while i < n:
        starts[n_tiles] = i
        n_tiles += 1
        a = i
        i += 1
        while (i < n and i - a < size
               and seq_of[tokens[i] if tokens else i] == seq_of[tokens[a] if tokens else a]):
            i += 1
    starts[n_tiles] = n
    return n_tiles


def _attn_spans(N, KVH, max_len):
    """Item slots per (token, kv head): 1 when tokens x kv heads already give every thread a few
    work items (prefill, big batches: each item runs its token's key pieces in turn); else one
    slot per possible piece (ts_attn_max_pieces), so a decode step of one long sequence still
    spreads over the threads. Either way the pieces and their merge are the same (kernels_attn.h):
    this picks who computes them, never the result."""
    pieces = ts_attn_max_pieces(max_len)
    if N * KVH >= 4 * ts_threads() or pieces == 1:
        return 1
    return pieces


def paged_attention_arrays(q, k_pool, v_pool, query_start, seq_lens, positions, block_tables,
                           float scale, sliding_window=None, out=None):
    """(N, H, Dh), (NB, BS, KVH, Dh) x2 + Batch fields -> (N, H, Dv): causal attention over the
    paged cache, reading K/V blocks in place through the block tables (online softmax)."""
    q = np.ascontiguousarray(q, dtype=np.float32)
    N, H, Dh = q.shape
    if k_pool.dtype not in (np.float32, np.float16) or v_pool.dtype != k_pool.dtype:
        raise ValueError("paged_attention needs float32 or float16 pools of one dtype")
    k_pool = np.ascontiguousarray(k_pool)
    KVH, Dv, item = k_pool.shape[2], v_pool.shape[3], k_pool.itemsize
    v_steps = [st // item for st in v_pool.strides]
    # values may be a strided view (MLA: the latent part of the key rows): read in place when its
    # rows are contiguous values and its heads Dv apart, else copied once
    if (v_pool.ndim != 4 or any(st % item for st in v_pool.strides) or v_steps[3] != 1
            or (KVH > 1 and v_steps[2] != Dv) or v_pool.shape[:3] != k_pool.shape[:3]):
        v_pool = np.ascontiguousarray(v_pool)
        v_steps = [st // item for st in v_pool.strides]
    if H % KVH or k_pool.shape[3] != Dh:
        raise ValueError(f"q {q.shape} does not fit the key pool {k_pool.shape}")
    query_start = np.asarray(query_start, dtype=np.int64)
    seq_lens = np.ascontiguousarray(seq_lens, dtype=np.int64)
    block_tables = np.ascontiguousarray(block_tables, dtype=np.int32)
    positions = np.ascontiguousarray(positions, dtype=np.int64)
    S = seq_lens.shape[0]
    if query_start.shape[0] != S + 1 or query_start[-1] != N or positions.shape[0] != N:
        raise ValueError(f"batch metadata does not describe {N} tokens over {S} sequences")
    BS = k_pool.shape[1]
    if S and (-(-int(seq_lens.max()) // BS) > block_tables.shape[1]):
        raise ValueError("a sequence is longer than its block table")
    if block_tables.size and (block_tables.min() < 0 or block_tables.max() >= k_pool.shape[0]):
        raise IndexError(f"block id out of range [0, {k_pool.shape[0]})")
    seq_of = np.repeat(np.arange(S, dtype=np.int64), np.diff(query_start))  # (N,)
    if out is None:
        out = np.empty((N, H, Dv), dtype=np.float32)
    cdef size_t kp = k_pool.ctypes.data, vp = v_pool.ctypes.data
    if N and _paged_attention(q, <const void *>kp, <const void *>vp, k_pool.dtype == np.float16,
                              k_pool.shape[1], KVH, Dv, v_steps[0], v_steps[1], seq_of, seq_lens,
                              positions, block_tables,
                              scale, int(sliding_window or 0),
                              _attn_spans(N, KVH, int(seq_lens.max())), out, _isa):
        raise MemoryError("paged_attention: out of memory")
    return out


def paged_attention(q, k_pool, v_pool, batch, float scale, sliding_window=None):
    """(N, H, Dh), (NB, BS, KVH, Dh) x2 -> (N, H, Dh): causal attention of each sequence's new
    tokens over its whole context, read through its block table."""
    return paged_attention_arrays(q, k_pool, v_pool, batch.query_start, batch.seq_lens,
                                  batch.positions, batch.block_tables, scale, sliding_window)


# -- sampling ------------------------------------------------------------------------------------


@cython.boundscheck(False)
@cython.wraparound(False)
cdef int _filtered_probs(double[::1] z, double top_p, double min_p, int64_t top_k,
                         double[::1] probs) noexcept nogil:
    """z already divided by the temperature; fills probs. Returns -1 when out of memory."""
    cdef Py_ssize_t i, V = z.shape[0], n_cand = 0
    cdef double zmax = -INFINITY, kth = -INFINITY, total = 0, pmax = 0, t, mass, cum
    cdef double *tmp
    cdef ts_prob_idx *cand
    cdef int rounds
    if top_k > 0 and top_k < V:
        tmp = <double *>malloc(V * sizeof(double))
        if tmp == NULL:
            return -1
        memcpy(tmp, &z[0], V * sizeof(double))
        kth = ts_kth_largest(tmp, V, top_k)
        free(tmp)
    for i in range(V):
        if z[i] > zmax:
            zmax = z[i]
    for i in range(V):
        probs[i] = exp(z[i] - zmax) if z[i] >= kth else 0.0
        total += probs[i]
    for i in range(V):
        probs[i] /= total
    if top_p < 1.0:
        # only tokens at or above a threshold t can survive once the mass strictly above t
        # reaches top_p: find such a t cheaply, then sort just those tokens
        for i in range(V):
            if probs[i] > pmax:
                pmax = probs[i]
        t = pmax
        for rounds in range(64):
            t = t * 0.25
            mass = 0
            for i in range(V):
                if probs[i] > t:
                    mass += probs[i]
            if mass >= top_p * (1 + 1e-9) + 1e-12:
                break
        else:
            t = 0
        cand = <ts_prob_idx *>malloc(V * sizeof(ts_prob_idx))
        if cand == NULL:
            return -1
        for i in range(V):
            if probs[i] > 0 and probs[i] >= t:
                cand[n_cand].p = probs[i]
                cand[n_cand].i = i
                n_cand += 1
            probs[i] = 0
        ts_sort_prob_desc(cand, n_cand)
        cum = 0  # a token stays if the mass before it is below p
        for i in range(n_cand):
            cum += cand[i].p
            if cum - cand[i].p < top_p:
                probs[cand[i].i] = cand[i].p
        free(cand)
    pmax = 0
    for i in range(V):
        if probs[i] > pmax:
            pmax = probs[i]
    if min_p > 0:
        for i in range(V):
            if probs[i] < min_p * pmax:
                probs[i] = 0
    total = 0
    for i in range(V):
        total += probs[i]
    for i in range(V):
        probs[i] /= total
    return 0


def filtered_probs(logits, p):
    """(V,) -> (V,) probabilities after temperature, top-k, top-p and min-p (zeros elsewhere)."""
    z = np.ascontiguousarray(logits, dtype=np.float64) / float(p.temperature)
    if z.ndim != 1:
        raise ValueError(f"filtered_probs takes one row of logits, got shape {z.shape}")
    probs = np.empty_like(z)
    if _filtered_probs(z, float(p.top_p), float(p.min_p), int(p.top_k or 0), probs) != 0:
        raise MemoryError("filtered_probs: out of memory")
    return probs


# -- quantized matmuls over ggml blocks (ext/quant.h) ------------------------------------------

cdef extern from "quant.h" nogil:
    int TS_ISA_SCALAR, TS_ISA_AVX2, TS_ISA_VNNI, TS_ISA_BF16
    int ts_block_size(int qtype)
    int ts_type_size(int qtype)
    int ts_best_isa()
    int ts_matmul_q_multi(const float *x, int64_t n, int64_t k, int64_t x_stride, int nw,
                          const uint8_t *const *w, const int64_t *m, const int64_t *w_stride,
                          const int *qtype, float *const *out, int nthreads, int isa)
    int ts_matmul_q_strided(const float *x, int64_t n, int64_t k, int64_t x_stride,
                            const uint8_t *w, int64_t m, int64_t w_stride, int qtype, float *out,
                            int nthreads, int isa)
    int ts_matmul_q_argmax(const float *x, int64_t n, int64_t k, int64_t x_stride,
                           const uint8_t *w, int64_t m, int64_t w_stride, int qtype, int64_t *ids,
                           int nthreads, int isa)
    int ts_matmul_bf16_strided(const float *x, int64_t n, int64_t k, int64_t x_stride,
                               const uint16_t *w, int64_t m, int64_t w_stride, float *out,
                               int nthreads, int isa)
    int ts_matmul_wf_strided(const float *x, int64_t n, int64_t k, int64_t x_stride,
                             const void *w, int f32, int64_t m, int64_t w_stride, float *out,
                             int nthreads, int isa)
    void ts_dequantize_rows(const uint8_t *w, int64_t w_stride, int qtype, int64_t cols,
                            const int64_t *ids, int64_t n, float *out, int nthreads)
    int ts_set_sgemm(void *fn, int ilp64, int64_t min_n, void *local_threads)
    int TS_PACKED, TS_GROUP
    int ts_packs(int qtype)
    int ts_packed_rec(int qtype)
    void ts_repack(int qtype, const uint8_t *w, int64_t m, int64_t w_stride, int64_t nb,
                   uint8_t *packed)
    int64_t ts_blas_min_n
    void *ts_blas_local_ptr


include "quant.pxi"


cdef extern from "head_matmul.h" nogil:
    void ts_head_matmul(const float *x, int64_t N, int64_t H, int64_t K, const float *w,
                        int64_t M, float *out, int nthreads)


cdef extern from "attn_gemm.h" nogil:
    int TS_ATTN_TILE
    ctypedef struct ts_attn_gemm_job:
        const ts_attn_job *a
        const int64_t *tiles
        int64_t n_tiles
        int failed
    int ts_attn_gemm_ready()
    int ts_attn_gemm(ts_attn_gemm_job *gj, int nthreads)




# -- the decoder layer stack (a Decoder spec lowered by tinyserve/backends/cpu_decoder.py) ------

include "decoder.pxi"
