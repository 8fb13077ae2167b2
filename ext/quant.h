/* Quantized matmul for ggml blocks, as llama.cpp does it: each activation row is quantized once
 * per call to int8 blocks, then every weight block meets its activation block in an integer dot
 * product, scaled in float. Legacy types (Q4_0 ... Q8_0) get Q8_0-style activations: one f32
 * scale per 32 values (llama.cpp's Q8_0/Q8_1). K-quants get Q8_K-style ones: one scale per 256
 * values, so a whole super-block (its 6/8-bit sub-block scales applied in integers) costs one
 * float step; the 32-value block sums serve the K-quant mins.
 *
 * Three implementations of one contract, picked at run time (ts_best_isa): portable scalar C,
 * AVX2 (maddubs/madd) and AVX-512 VNNI (dpbusd); the SIMD twins live in quant_simd.h. A fourth
 * level, bf16 (AVX-512 BF16 on top of VNNI), runs VNNI's kernels for everything but bf16-weight
 * matmuls, which it computes against bf16-rounded activations with vdpbf16ps (quant_bf16.h).
 * Block layouts: ggml-common.h (block_q4_0 ... block_q6_K); values follow ggml's
 * dequantize_row_* in ggml-quants.c (and tinyserve/loading/gguf_file.py, the NumPy twin).
 *
 * C API (ext/quant.pxi wraps it and ext/kernels.pyx's decoder stack calls it directly, one
 * translation unit): ts_matmul_q, ts_matmul_q_strided, ts_matmul_bf16,
 * ts_matmul_bf16_strided, ts_matmul_wf_strided (bf16 or float32 weights), ts_dequantize_rows,
 * ts_best_isa, ts_block_size, ts_type_size and the TS_ISA_* values (0 scalar, 1 avx2, 2 vnni,
 * 3 bf16: the index of kernels.get_isa() in available_isas()).
 */
#ifndef TINYSERVE_QUANT_H
#define TINYSERVE_QUANT_H

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "half.h"
#include "pool.h"
/* SIMD twins need GCC (#pragma GCC target); clang and TS_NO_SIMD builds get the portable C */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(TS_NO_SIMD)
#include <immintrin.h>
#define TS_X86 1
#else
#define TS_X86 0
#endif

/* gguf.GGMLQuantizationType values */
enum {
    TS_Q4_0 = 2,
    TS_Q4_1 = 3,
    TS_Q5_0 = 6,
    TS_Q5_1 = 7,
    TS_Q8_0 = 8,
    TS_Q4_K = 12,
    TS_Q5_K = 13,
    TS_Q6_K = 14
};
enum { TS_ISA_SCALAR = 0, TS_ISA_AVX2 = 1, TS_ISA_VNNI = 2, TS_ISA_BF16 = 3 };
/* The bf16 level differs from VNNI only in bf16-weight matmuls: the integer kernels (and the
 * packed ones, which know three levels) are VNNI's there. */
static inline int ts_int8_isa(int isa) { return isa == TS_ISA_BF16 ? TS_ISA_VNNI : isa; }

/* one activation row quantized: q (K,) int8; d (K/qk,) f32 scales, qk = 32 (legacy types) or
 * 256 (K-quants); per 32 values: bs = sum(q) and s = d * bs; K-quants also per 16 values:
 * b16 = sum(q) (the packed Q6_K kernel's offset of 32) */
typedef struct {
    const int8_t *q;
    const float *d;
    const float *s;
    const int16_t *bs;
    const int16_t *b16;
} XQ;

/* one weight row . n_x (<= 8) activation rows -> out[t * os] */
typedef void (*row_fn)(const uint8_t *w, const XQ *xq, int64_t nb, int n_x, float *out, int64_t os);

/* block values and bytes of a type (a packed weight's flag, quant_packed.h, ignored) */
static inline int ts_block_size(int qtype) {
    switch (qtype & 0xFF) {
    case TS_Q4_0:
    case TS_Q4_1:
    case TS_Q5_0:
    case TS_Q5_1:
    case TS_Q8_0: return 32;
    case TS_Q4_K:
    case TS_Q5_K:
    case TS_Q6_K: return 256;
    default: return 0;
    }
}

#define TS_MAX_TYPE_SIZE 210 /* Q6_K's */
static inline int ts_type_size(int qtype) {
    switch (qtype & 0xFF) {
    case TS_Q4_0: return 18;
    case TS_Q4_1: return 20;
    case TS_Q5_0: return 22;
    case TS_Q5_1: return 24;
    case TS_Q8_0: return 34;
    case TS_Q4_K: return 144;
    case TS_Q5_K: return 176;
    case TS_Q6_K: return 210;
    default: return 0;
    }
}

static inline float ts_load_f16(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return ts_f16_to_f32(h);
}

static inline float ts_bf16_to_f32(uint16_t b) {
    const uint32_t bits = (uint32_t)b << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* Q4_K/Q5_K: 12 bytes -> 8 six-bit scales and 8 six-bit mins (ggml's get_scale_min_k4) */
static inline void ts_scale_min_k4(const uint8_t *s, uint8_t *sc, uint8_t *mn) {
    for (int j = 0; j < 4; j++) {
        sc[j] = s[j] & 63;
        mn[j] = s[j + 4] & 63;
        sc[j + 4] = (s[j + 8] & 0x0F) | ((s[j] >> 6) << 4);
        mn[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4);
    }
}

#include "quant_scalar.h" /* dequantization and the portable twins */

/* ---- SIMD twins ---------------------------------------------------------------------------- */
#if TS_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define SFX(name) name##_avx2
#define DOT_US(u, s) _mm256_madd_epi16(_mm256_maddubs_epi16((u), (s)), _mm256_set1_epi16(1))
#define ACC16(acc, p, sc) _mm256_add_epi32((acc), _mm256_madd_epi16((p), (sc)))
#include "quant_simd.h"
#undef SFX
#undef DOT_US
#undef ACC16
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")
#define SFX(name) name##_vnni
#define DOT_US(u, s) _mm256_dpbusd_epi32(_mm256_setzero_si256(), (u), (s))
#define ACC16(acc, p, sc) _mm256_dpwssd_epi32((acc), (p), (sc))
#define TS_WIDE 1
#include "quant_simd.h"
#undef TS_WIDE
#undef SFX
#undef DOT_US
#undef ACC16
#pragma GCC pop_options

/* avx512bf16 as a target: GCC 10 on */
#if __GNUC__ >= 10
#define TS_BF16DP 1
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni,avx512bf16")
#include "quant_bf16.h"
#pragma GCC pop_options
#endif
#endif
#ifndef TS_BF16DP
#define TS_BF16DP 0
#endif

/* the best implementation this CPU runs */
static inline int ts_best_isa(void) {
#if TS_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw")) {
#if TS_BF16DP
        if (__builtin_cpu_supports("avx512bf16")) return TS_ISA_BF16;
#endif
        return TS_ISA_VNNI;
    }
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("f16c"))
        return TS_ISA_AVX2;
#endif
    return TS_ISA_SCALAR;
}

typedef void (*quant_fn)(const float *x, int64_t k, int qk, int8_t *q, float *d, float *s,
                         int16_t *bs, int16_t *b16);
/* one float weight row (bf16 bits or float32) . n_x activation rows (float32; bf16 bits for the
 * bf16 level's bf16 weights), row t at x + t * xs elements */
typedef void (*wf_fn)(const void *w, const void *x, int64_t xs, int64_t k, int n_x, float *out,
                      int64_t os);

/* the row kernels of one implementation: quantized rows of qtype, activation quantizer, and the
 * bf16 and f32 float-weight rows on f32 activations (the bf16 level: VNNI's) */
static void ts_pick(int isa, int qtype, row_fn *row, quant_fn *quant, wf_fn *bf16, wf_fn *f32) {
    *row = ts_row_fn_scalar(qtype);
    *quant = ts_quantize_row_scalar;
    *bf16 = ts_row_bf16_scalar;
    *f32 = ts_row_f32_scalar;
#if TS_X86
    if (isa == TS_ISA_AVX2) {
        *row = row_fn_for_avx2(qtype);
        *quant = quantize_row_avx2;
        *bf16 = row_bf16_avx2;
        *f32 = row_f32_avx2;
    } else if (isa == TS_ISA_VNNI || isa == TS_ISA_BF16) {
        *row = row_fn_for_vnni(qtype);
        *quant = quantize_row_vnni;
        *bf16 = row_bf16_vnni;
        *f32 = row_f32_vnni;
    }
#else
    (void)isa;
#endif
}

#include "quant_packed.h" /* Q4_0 / Q4_1 / Q8_0 in groups of 8 rows */

/* Output rows per task: enough tasks for the threads to balance, few enough to keep the
 * per-task cost (a dynamic-schedule fetch) negligible. */
static int64_t ts_rows_per_task(int64_t m, int nthreads) {
    int64_t rc = (m + 8 * nthreads - 1) / (8 * nthreads);
    if (rc < 4) rc = 4;
    if (rc > 64) rc = 64;
    return rc;
}
/* ... rounded up to whole groups when a packed matrix is among them */
static int64_t ts_task_rows(int64_t m, int nthreads, int packed) {
    const int64_t rc = ts_rows_per_task(m, nthreads);
    /* packed: whole pairs of groups, which the 512-bit tiles take at once */
    return packed ? (rc + 2 * TS_GROUP - 1) / (2 * TS_GROUP) * (2 * TS_GROUP) : rc;
}
#define TS_X_PER_TASK 64 /* activation rows per task: their int8 blocks stay in L2 */

/* ---- large batches: dequantize into float32 once, then BLAS sgemm ------------------------- */
/* From ~64 activation rows on (prefill chunks, big batched decodes) the integer tiles above run
 * ~130 GOP/s on 2 cores while OpenBLAS's sgemm runs ~300-430 GFLOP/s: dequantizing the weight
 * (O(m k), ~0.2 ms for 1536 x 576 on 2 threads) and one sgemm (O(n m k)) then wins by ~3x, and
 * is more accurate (float activations). The sgemm is whichever cblas_sgemm the process already
 * loaded (NumPy's OpenBLAS), handed over by quant.pxi (ts_set_sgemm): no link-time
 * BLAS dependency. Unset (0), every n takes the integer path. */
typedef void (*ts_sgemm32_fn)(int, int, int, int, int, int, float, const float *, int,
                              const float *, int, float, float *, int);
typedef void (*ts_sgemm64_fn)(int, int, int, int64_t, int64_t, int64_t, float, const float *,
                              int64_t, const float *, int64_t, float, float *, int64_t);
typedef int (*ts_blas_local_fn)(int);
static void *ts_sgemm_ptr = 0;
static int ts_sgemm_ilp64 = 0;
static int64_t ts_blas_min_n = 0; /* activation rows from which sgemm is used; 0: never */
/* OpenBLAS's openblas_set_num_threads_local (0.3.27+): sets BLAS's thread count (per thread in
 * intent, process-wide in 0.3.31), returning the previous one. With it each of our pool
 * threads runs sgemm on its own weight panel single-threaded; without it (another BLAS) one
 * sgemm runs on BLAS's threads. */
static void *ts_blas_local_ptr = 0;
enum { TS_CBLAS_ROW_MAJOR = 101, TS_CBLAS_NO_TRANS = 111, TS_CBLAS_TRANS = 112 };

/* c (n, m; row stride ldc) = a (n, k; row stride lda) @ b.T (b: (m, k) contiguous), through the
 * registered sgemm */
static inline void ts_sgemm_nt(int64_t n, int64_t m, int64_t k, const float *a, int64_t lda,
                               const float *b, float *c, int64_t ldc) {
    if (ts_sgemm_ilp64)
        ((ts_sgemm64_fn)ts_sgemm_ptr)(TS_CBLAS_ROW_MAJOR, TS_CBLAS_NO_TRANS, TS_CBLAS_TRANS, n, m,
                                      k, 1.0f, a, lda, b, k, 0.0f, c, ldc);
    else
        ((ts_sgemm32_fn)ts_sgemm_ptr)(TS_CBLAS_ROW_MAJOR, TS_CBLAS_NO_TRANS, TS_CBLAS_TRANS,
                                      (int)n, (int)m, (int)k, 1.0f, a, (int)lda, b, (int)k, 0.0f,
                                      c, (int)ldc);
}

/* Register a cblas_sgemm (LP64 or ILP64), the row count from which it is used, and the BLAS's
 * per-thread thread-count setter (or 0); a product of known values checks the ABI guess.
 * 1: in use, 0: rejected (integer path everywhere). */
static int ts_set_sgemm(void *fn, int ilp64, int64_t min_n, void *local_threads) {
    ts_sgemm_ptr = fn;
    ts_sgemm_ilp64 = ilp64;
    ts_blas_min_n = fn ? min_n : 0;
    ts_blas_local_ptr = fn ? local_threads : 0;
    if (!fn) return 0;
    const float a[6] = {1, 2, 3, 4, 5, 6}, b[6] = {1, 0, -1, 2, 1, 0}; /* a (2, 3), b (2, 3) */
    float c[4] = {0, 0, 0, 0};
    ts_sgemm_nt(2, 2, 3, a, 3, b, c, 2);
    if (c[0] != -2.0f || c[1] != 4.0f || c[2] != -2.0f || c[3] != 13.0f) {
        ts_sgemm_ptr = 0;
        ts_blas_min_n = 0;
        ts_blas_local_ptr = 0;
        return 0;
    }
    return 1;
}

/* Weight rows per sgemm task: at least 2 tasks per thread (a thread on a busy core takes fewer),
 * at most 256 rows (<= 256 x k floats of scratch per thread, dequantized just before use). */
static inline int64_t ts_blas_panel(int64_t m, int nthreads) {
    int64_t tasks = 2 * (int64_t)nthreads, panel;
    if (tasks < 1) tasks = 1;
    panel = (m + tasks - 1) / tasks;
    panel = (panel + 15) & ~(int64_t)15;
    return panel > 256 ? 256 : panel;
}

/* out (n, m) = x (n, k) @ dequant(w).T by dequantizing w and sgemm; -1: no memory.
 * With a per-thread BLAS thread setter (OpenBLAS): the pool's threads take weight panels
 * (ext/pool.h), each dequantizes its panel into its own scratch and calls a single-threaded
 * sgemm for those output columns, so BLAS never starts (or spins) threads of its own that would
 * fight ours for the cores. Otherwise: dequantize all of w, one sgemm on BLAS's threads. */
typedef struct {
    const float *x;
    int64_t n, k, x_stride, m, w_stride, panel;
    const uint8_t *w;
    int qtype;
    float *out;
    _Atomic int failed;
} ts_blas_job;

/* weight row r of a blas job as floats: from its row of blocks, or out of its packed group */
static inline void ts_dequant_any_row(const ts_blas_job *j, int64_t r, float *y) {
    const int qtype = j->qtype & 0xFF, bs = ts_block_size(qtype), ts = ts_type_size(qtype);
    const int64_t nb = j->k / bs;
    uint8_t blk[TS_MAX_TYPE_SIZE];
    for (int64_t b = 0; b < nb; b++) {
        if (j->qtype & TS_PACKED) {
            ts_unpack_block(qtype, j->w + (r / TS_GROUP) * j->w_stride, nb, b, (int)(r % TS_GROUP),
                            blk);
            ts_dequant_block(qtype, blk, y + b * bs);
        } else {
            ts_dequant_block(qtype, j->w + r * j->w_stride + b * ts, y + b * bs);
        }
    }
}

/* one weight panel: dequantize rows [t * panel, ...) into this thread's scratch, one sgemm */
static void ts_blas_panel_task(void *ctx, int64_t t) {
    ts_blas_job *j = (ts_blas_job *)ctx;
    const int64_t k = j->k, r0 = t * j->panel;
    const int64_t r1 = r0 + j->panel < j->m ? r0 + j->panel : j->m;
    float *wf = (float *)ts_scratch(1, (size_t)(j->panel * k) * sizeof(float));
    if (!wf) {
        atomic_store(&j->failed, 1);
        return;
    }
    ((ts_blas_local_fn)ts_blas_local_ptr)(1);
    for (int64_t r = r0; r < r1; r++) ts_dequant_any_row(j, r, wf + (r - r0) * k);
    ts_sgemm_nt(j->n, r1 - r0, k, j->x, j->x_stride, wf, j->out + r0, j->m);
}

/* rows [t * 64, ...) of w dequantized into the float32 matrix ctx->out */
static void ts_dequant_rows_task(void *ctx, int64_t t) {
    ts_blas_job *j = (ts_blas_job *)ctx;
    const int64_t r1 = (t + 1) * 64 < j->m ? (t + 1) * 64 : j->m;
    for (int64_t r = t * 64; r < r1; r++) ts_dequant_any_row(j, r, j->out + r * j->k);
}

/* out (n, m) = x (n, k) @ dequant(w).T by dequantizing w and sgemm; -1: no memory.
 * With a per-thread BLAS thread setter (OpenBLAS): the pool's threads take weight panels, each
 * dequantizes its panel into its own scratch and calls a single-threaded sgemm for those output
 * columns, so BLAS never starts (or spins) threads of its own that would fight ours for the
 * cores. Otherwise: dequantize all of w, one sgemm on BLAS's threads. */
static inline int ts_matmul_q_blas(const float *x, int64_t n, int64_t k, int64_t x_stride,
                                   const uint8_t *w, int64_t m, int64_t w_stride, int qtype,
                                   float *out, int nthreads) {
    ts_blas_job job = {x, n, k, x_stride, m, w_stride, 0, w, qtype, out, 0};
    if (ts_blas_local_ptr) {
        const ts_blas_local_fn set_threads = (ts_blas_local_fn)ts_blas_local_ptr;
        job.panel = ts_blas_panel(m, nthreads);
        /* OpenBLAS 0.3.31 applies the count process-wide (and returns the previous one), others
         * per thread: set by every task, restored once here afterwards */
        const int prev = set_threads(1);
        ts_parallel_for(nthreads, (m + job.panel - 1) / job.panel, ts_blas_panel_task, &job);
        set_threads(prev);
        return atomic_load(&job.failed) ? -1 : 0;
    }
    float *wf = (float *)ts_scratch(1, (size_t)(m * k) * sizeof(float));
    if (!wf) return -1;
    job.out = wf;
    ts_parallel_for(nthreads, (m + 63) / 64, ts_dequant_rows_task, &job);
    ts_sgemm_nt(n, m, k, x, x_stride, wf, out, m);
    return 0;
}

typedef struct {
    const float *x;
    int64_t x_stride, k;
    int qk;
    int64_t nd, nbx;
    quant_fn quant;
    int8_t *xq;
    float *xd, *xs;
    int16_t *xb, *x16;
} ts_quant_job;

/* activation row i quantized */
static void ts_quant_task(void *ctx, int64_t i) {
    const ts_quant_job *j = (const ts_quant_job *)ctx;
    j->quant(j->x + i * j->x_stride, j->k, j->qk, j->xq + i * j->k, j->xd + i * j->nd,
             j->xs + i * j->nbx, j->xb + i * j->nbx, j->x16 + i * 2 * j->nbx);
}

typedef struct {
    int64_t n, k, nd, nbx, rc, n_nc;
    int nw, tile_rows;
    const int8_t *xq;
    const float *xd, *xs;
    const int16_t *xb, *x16;
    row_fn row[4];
    group_fn group[4]; /* non-NULL: matrix j is packed (quant_packed.h), w_stride per group */
    group2_fn group2[4]; /* non-NULL: two groups at a time (the same bits) */
    int64_t nb[4], m[4], w_stride[4], first[5];
    const uint8_t *w[4];
    float *out[4];
    /* argmax mode (nw = 1, out unused): per row chunk c and activation row i, the chunk's largest
     * output and its row index, best_v / best_i [c * n + i] */
    float *best_v;
    int64_t *best_i;
} ts_mm_job;

/* v beats the best so far as numpy.argmax sees it: larger, or the first nan */
static inline int ts_beats(float v, float best) { return v > best || (v != v && best == best); }

/* A decode step (one activation row) spends only a few cycles on each weight block, so a row's
 * bytes must already be on their way when its turn comes: the row TS_PREFETCH_ROWS ahead is
 * requested now (the hardware prefetcher alone left the head's matvec short of the bandwidth). */
#define TS_PREFETCH_ROWS 4
static inline void ts_prefetch_row(const uint8_t *w, int64_t r, int64_t r_end, int64_t ws, int n_x) {
    if (n_x != 1 || r >= r_end) return;
    for (int64_t c = 0; c < ws; c += 64) __builtin_prefetch(w + r * ws + c);
}

/* one chunk of <= rc rows of one matrix against <= TS_X_PER_TASK activation rows */
static void ts_mm_task(void *ctx, int64_t task) {
    const ts_mm_job *jb = (const ts_mm_job *)ctx;
    const int64_t c = task / jb->n_nc, k = jb->k;
    int j = 0;
    while (c >= jb->first[j + 1]) j++;
    const int64_t m = jb->m[j], r0 = (c - jb->first[j]) * jb->rc;
    const int64_t r1 = r0 + jb->rc < m ? r0 + jb->rc : m;
    const int64_t i0 = (task % jb->n_nc) * TS_X_PER_TASK;
    const int64_t i1 = i0 + TS_X_PER_TASK < jb->n ? i0 + TS_X_PER_TASK : jb->n;
    const uint8_t *wj = jb->w[j];
    float *oj = jb->out[j];
    for (int64_t t0 = i0; t0 < i1; t0 += jb->tile_rows) {
        const int n_x = (int)(i1 - t0 < jb->tile_rows ? i1 - t0 : jb->tile_rows);
        XQ tile[8];
        for (int t = 0; t < n_x; t++) {
            tile[t].q = jb->xq + (t0 + t) * k;
            tile[t].d = jb->xd + (t0 + t) * jb->nd;
            tile[t].s = jb->xs + (t0 + t) * jb->nbx;
            tile[t].bs = jb->xb + (t0 + t) * jb->nbx;
            tile[t].b16 = jb->x16 + (t0 + t) * 2 * jb->nbx;
        }
        const int64_t ws = jb->w_stride[j], w_ = r1 - r0;
        float buf[8 * 64]; /* argmax: (n_x, rc <= 64), this chunk's outputs, reduced right away */
        float *o = jb->best_v ? buf - r0 : oj + t0 * m; /* output (t, r) at o[t * os + r] */
        const int64_t os = jb->best_v ? w_ : m;
        if (jb->group[j]) { /* r0 and m are multiples of the group */
            for (int64_t r = r0; r < r1;) {
                const uint8_t *g = wj + r / TS_GROUP * ws;
                /* one row (decode) streams its weights from memory: there the two-group tile
                 * measured slower than one group at a time over a large matrix (the head) */
                if (jb->group2[j] && n_x > 1 && r + 2 * TS_GROUP <= r1) {
                    ts_prefetch_row(wj, r / TS_GROUP + 2, (r1 - 1) / TS_GROUP + 1, ws, n_x);
                    ts_prefetch_row(wj, r / TS_GROUP + 3, (r1 - 1) / TS_GROUP + 1, ws, n_x);
                    jb->group2[j](g, ws, tile, jb->nb[j], n_x, o + r, os);
                    r += 2 * TS_GROUP;
                } else {
                    ts_prefetch_row(wj, r / TS_GROUP + 1, (r1 - 1) / TS_GROUP + 1, ws, n_x);
                    jb->group[j](g, tile, jb->nb[j], n_x, o + r, os);
                    r += TS_GROUP;
                }
            }
        } else {
            for (int64_t r = r0; r < r1; r++) {
                ts_prefetch_row(wj, r + TS_PREFETCH_ROWS, r1, ws, n_x);
                jb->row[j](wj + r * ws, tile, jb->nb[j], n_x, o + r, os);
            }
        }
        if (!jb->best_v) continue;
        for (int t = 0; t < n_x; t++) {
            int64_t bi = 0;
            for (int64_t r = 1; r < w_; r++)
                if (ts_beats(buf[t * w_ + r], buf[t * w_ + bi])) bi = r;
            jb->best_v[c * jb->n + t0 + t] = buf[t * w_ + bi];
            jb->best_i[c * jb->n + t0 + t] = r0 + bi;
        }
    }
}

/* out_j (n, m_j) = x (n, k) @ dequant(w_j).T for nw <= 4 weights that read the same x (q/k/v,
 * gate/up): the activations are quantized once and every matrix's rows share one parallel region,
 * so a decode step pays one fork/join where it paid nw (small k/v matrices alone stayed on one
 * thread). The weights' types must share one activation format (all 32-blocks or all K-quants);
 * each output element is computed exactly as by a single-matrix call. x row i at x + i *
 * x_stride, w_j row r at w_j + r * w_stride_j. 0, or -1: out of memory */
static inline int ts_matmul_q_run(const float *x, int64_t n, int64_t k, int64_t x_stride, int nw,
                                  const uint8_t *const *w, const int64_t *m,
                                  const int64_t *w_stride, const int *qtype, float *const *out,
                                  float *best_v, int64_t *best_i, int nthreads, int isa) {
    isa = ts_int8_isa(isa);
    if (!best_v && ts_sgemm_ptr && ts_blas_min_n > 0 && n >= ts_blas_min_n) {
        for (int j = 0; j < nw; j++)
            if (ts_matmul_q_blas(x, n, k, x_stride, w[j], m[j], w_stride[j], qtype[j], out[j],
                                 nthreads))
                return -1;
        return 0;
    }
    row_fn row[4];
    quant_fn quant;
    wf_fn unused, unused_f32;
    int64_t nb[4], m_all = 0, work = 0;
    group_fn group[4];
    group2_fn group2[4];
    int any_packed = 0;
    for (int j = 0; j < nw; j++) {
        ts_pick(isa, qtype[j] & 0xFF, &row[j], &quant, &unused, &unused_f32);
        group[j] = qtype[j] & TS_PACKED ? ts_group_fn(isa, qtype[j] & 0xFF) : 0;
        group2[j] = qtype[j] & TS_PACKED ? ts_group2_fn(isa, qtype[j] & 0xFF) : 0;
        any_packed |= group[j] != 0;
        nb[j] = k / ts_block_size(qtype[j]);
        m_all += m[j];
        /* weight bytes touched, counted per x row (a packed stride spans a group of rows) */
        work += (group[j] ? m[j] / TS_GROUP : m[j]) * w_stride[j] * n;
    }
    const int qk = ts_block_size(qtype[0]) == 256 ? 256 : 32; /* Q8_K- or Q8_0-style */
    const int64_t nbx = k / 32, nd = k / qk;
    /* one buffer: q (n, k) int8 | d (n, nd) f32 | s (n, nbx) f32 | bs (n, nbx) int16 |
     * b16 (n, 2 nbx) int16 */
    int8_t *xq = (int8_t *)ts_scratch(0, (size_t)(n * k + 4 * n * nd + 10 * n * nbx + 64));
    if (!xq) return -1;
    float *xd = (float *)(xq + ((n * k + 63) & ~(int64_t)63)), *xs = xd + n * nd;
    int16_t *xb = (int16_t *)(xs + n * nbx), *x16 = xb + n * nbx;

    ts_quant_job qj = {x, x_stride, k, qk, nd, nbx, quant, xq, xd, xs, xb, x16};
    ts_parallel_for(n * k >= 32768 ? nthreads : 1, n, ts_quant_task, &qj);

    /* row chunks of every matrix in one task list: matrix j's chunks follow matrix j-1's */
    ts_mm_job job = {.n = n, .k = k, .nd = nd, .nbx = nbx, .nw = nw, .xq = xq, .xd = xd,
                     .xs = xs, .xb = xb, .x16 = x16, .tile_rows = isa == TS_ISA_VNNI ? 8 : 4,
                     .best_v = best_v, .best_i = best_i};
    job.rc = ts_task_rows(m_all, nthreads, any_packed);
    for (int j = 0; j < nw; j++) {
        job.row[j] = row[j];
        job.group[j] = group[j];
        job.group2[j] = group2[j];
        job.nb[j] = nb[j];
        job.w[j] = w[j];
        job.m[j] = m[j];
        job.w_stride[j] = w_stride[j];
        job.out[j] = out ? out[j] : 0;
        job.first[j + 1] = job.first[j] + (m[j] + job.rc - 1) / job.rc;
    }
    job.n_nc = (n + TS_X_PER_TASK - 1) / TS_X_PER_TASK;
    /* below ~64 KB of weight traffic handing tasks to another thread costs more than it saves
     * (a 192 x 576 Q4_1 matvec, 69 KB, takes ~4 us on one core) */
    ts_parallel_for(work >= (1 << 16) ? nthreads : 1, job.first[nw] * job.n_nc, ts_mm_task, &job);
    return 0;
}

static inline int ts_matmul_q_multi(const float *x, int64_t n, int64_t k, int64_t x_stride, int nw,
                                    const uint8_t *const *w, const int64_t *m,
                                    const int64_t *w_stride, const int *qtype, float *const *out,
                                    int nthreads, int isa) {
    return ts_matmul_q_run(x, n, k, x_stride, nw, w, m, w_stride, qtype, out, 0, 0, nthreads,
                           isa);
}

/* ids (n,) = argmax over r of (x @ dequant(w).T)[i, r], the first of equal maxima (numpy's
 * argmax of ts_matmul_q's integer-path output, bit for bit, without the (n, m) outputs: greedy
 * decoding's output head). Always the integer path, whatever n. 0, or -1: out of memory */
static inline int ts_matmul_q_argmax(const float *x, int64_t n, int64_t k, int64_t x_stride,
                                     const uint8_t *w, int64_t m, int64_t w_stride, int qtype,
                                     int64_t *ids, int nthreads, int isa) {
    const int64_t rows = ts_task_rows(m, nthreads, (qtype & TS_PACKED) != 0);
    const int64_t n_rc = (m + rows - 1) / rows;
    float *best_v = (float *)malloc((size_t)(n_rc * n) * (sizeof(float) + sizeof(int64_t)));
    if (!best_v) return -1;
    int64_t *best_i = (int64_t *)(best_v + n_rc * n);
    const int rc = ts_matmul_q_run(x, n, k, x_stride, 1, &w, &m, &w_stride, &qtype, 0, best_v,
                                   best_i, nthreads, isa);
    for (int64_t i = 0; rc == 0 && i < n; i++) { /* chunks in row order: the first max wins */
        int64_t bc = 0;
        for (int64_t c = 1; c < n_rc; c++)
            if (ts_beats(best_v[c * n + i], best_v[bc * n + i])) bc = c;
        ids[i] = best_i[bc * n + i];
    }
    free(best_v);
    return rc;
}

/* out (n, m) = x (n, k) @ dequant(w).T; x row i at x + i * x_stride, w row r at w + r * w_stride.
 * 0, or -1: out of memory */
static inline int ts_matmul_q_strided(const float *x, int64_t n, int64_t k, int64_t x_stride,
                                      const uint8_t *w, int64_t m, int64_t w_stride, int qtype,
                                      float *out, int nthreads, int isa) {
    return ts_matmul_q_multi(x, n, k, x_stride, 1, &w, &m, &w_stride, &qtype, &out, nthreads,
                             isa);
}

typedef struct {
    const char *x;
    int64_t x_stride, x_row_bytes, k, n; /* x row i at x + i * x_row_bytes, x_stride elements */
    const char *w;
    int64_t m, w_stride; /* bytes between weight rows */
    float *out;
    wf_fn row;
    int64_t rc, n_nc;
    int tile_rows;
} ts_wf_job;

static void ts_wf_task(void *ctx, int64_t task) {
    const ts_wf_job *j = (const ts_wf_job *)ctx;
    const int64_t m = j->m, r0 = (task / j->n_nc) * j->rc, r1 = r0 + j->rc < m ? r0 + j->rc : m;
    const int64_t i0 = (task % j->n_nc) * TS_X_PER_TASK;
    const int64_t i1 = i0 + TS_X_PER_TASK < j->n ? i0 + TS_X_PER_TASK : j->n;
    for (int64_t t0 = i0; t0 < i1; t0 += j->tile_rows) {
        const int n_x = (int)(i1 - t0 < j->tile_rows ? i1 - t0 : j->tile_rows);
        for (int64_t r = r0; r < r1; r++)
            j->row(j->w + r * j->w_stride, j->x + t0 * j->x_row_bytes, j->x_stride, j->k, n_x,
                   j->out + t0 * m + r, m);
    }
}

#if TS_BF16DP
/* the bf16 level's activations: rows of x (f32, row stride xs) rounded into rows of kp bf16 */
typedef struct {
    const float *x;
    int64_t xs, k, kp;
    uint16_t *xb;
} ts_round_job;

static void ts_round_task(void *ctx, int64_t i) {
    const ts_round_job *j = (const ts_round_job *)ctx;
    ts_round_bf16_row(j->x + i * j->xs, j->k, j->xb + i * j->kp);
}
#endif

/* out (n, m) = x (n, k) @ w.T for float weights: w (m, k) bf16 bits (f32 = 0) or float32
 * (f32 = 1), row r at w + r * w_stride bytes; x row i at x + i * x_stride. Each output is one
 * fixed-order sum whatever n, the tile or the thread count (unlike BLAS, whose rows change with
 * the row count: sgemv at one row, sgemm kernels by panel). On the bf16 level bf16 weights meet
 * x rounded to bf16 (quant_bf16.h); every other case multiplies in f32. 0, or -1: out of memory */
static inline int ts_matmul_wf_strided(const float *x, int64_t n, int64_t k, int64_t x_stride,
                                       const void *w, int f32, int64_t m, int64_t w_stride,
                                       float *out, int nthreads, int isa) {
    row_fn unused_row;
    quant_fn unused_quant;
    wf_fn bf16, wf32;
    ts_pick(isa, TS_Q8_0, &unused_row, &unused_quant, &bf16, &wf32);
    ts_wf_job job = {(const char *)x, x_stride, 4 * x_stride, k, n, (const char *)w, m, w_stride,
                     out, f32 ? wf32 : bf16, ts_rows_per_task(m, nthreads),
                     (n + TS_X_PER_TASK - 1) / TS_X_PER_TASK, isa >= TS_ISA_VNNI ? 8 : 4};
#if TS_BF16DP
    if (!f32 && isa == TS_ISA_BF16) { /* each activation row rounded once, into scratch */
        const int64_t kp = (k + 31) & ~(int64_t)31;
        char *raw = (char *)ts_scratch(0, (size_t)(n * kp) * sizeof(uint16_t) + 64);
        if (!raw) return -1;
        /* rows of whole cache lines from a line boundary: no load of the tile splits a line */
        uint16_t *xb = (uint16_t *)(raw + (-(uintptr_t)raw & 63));
        ts_round_job rj = {x, x_stride, k, kp, xb};
        ts_parallel_for(n * k >= 32768 ? nthreads : 1, n, ts_round_task, &rj);
        job.x = (const char *)xb;
        job.x_stride = kp;
        job.x_row_bytes = 2 * kp;
        job.row = ts_row_bf16dp;
    }
#endif
    const int64_t n_rc = (m + job.rc - 1) / job.rc;
    ts_parallel_for(m * k * 2 * n >= (1 << 16) ? nthreads : 1, n_rc * job.n_nc, ts_wf_task, &job);
    return 0;
}

/* out (n, m) = x (n, k) @ bf16(w).T; w (m, k) uint16 bf16 bits; x row i at x + i * x_stride,
 * w row r at w + r * w_stride (in elements). 0, or -1: out of memory */
static inline int ts_matmul_bf16_strided(const float *x, int64_t n, int64_t k, int64_t x_stride,
                                         const uint16_t *w, int64_t m, int64_t w_stride,
                                         float *out, int nthreads, int isa) {
    return ts_matmul_wf_strided(x, n, k, x_stride, w, 0, m, 2 * w_stride, out, nthreads, isa);
}

/* the same two with C-contiguous x (n, k): the C API ext/kernels.pyx calls */
static inline int ts_matmul_q(const float *x, int64_t n, int64_t k, const uint8_t *w, int64_t m,
                              int64_t w_stride, int qtype, float *out, int nthreads, int isa) {
    return ts_matmul_q_strided(x, n, k, k, w, m, w_stride, qtype, out, nthreads, isa);
}

static inline int ts_matmul_bf16(const float *x, int64_t n, int64_t k, const uint16_t *w,
                                 int64_t m, int64_t w_stride, float *out, int nthreads, int isa) {
    return ts_matmul_bf16_strided(x, n, k, k, w, m, w_stride, out, nthreads, isa);
}

/* out (n, cols) = rows ids of w dequantized; ids already checked against the row count */
typedef struct {
    const uint8_t *w;
    int64_t w_stride, cols;
    int qtype;
    const int64_t *ids;
    float *out;
} ts_rows_job;

static void ts_rows_task(void *ctx, int64_t i) {
    const ts_rows_job *j = (const ts_rows_job *)ctx;
    const int bs = ts_block_size(j->qtype), ts = ts_type_size(j->qtype);
    const uint8_t *row = j->w + j->ids[i] * j->w_stride;
    for (int64_t b = 0; b < j->cols / bs; b++)
        ts_dequant_block(j->qtype, row + b * ts, j->out + i * j->cols + b * bs);
}

static inline void ts_dequantize_rows(const uint8_t *w, int64_t w_stride, int qtype, int64_t cols,
                                      const int64_t *ids, int64_t n, float *out, int nthreads) {
    ts_rows_job job = {w, w_stride, cols, qtype, ids, out};
    ts_parallel_for(n * cols >= 65536 ? nthreads : 1, n, ts_rows_task, &job);
}

#endif /* TINYSERVE_QUANT_H */
