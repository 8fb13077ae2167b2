/* Prefill attention through BLAS sgemm, for ext/kernels.pyx's paged attention.

   A sequence with many new tokens (a prefill chunk) attends with two matrix products per tile of
   its queries and kv head instead of one dot product per (query, key): its context's key and value
   rows are gathered from the paged pool into contiguous matrices once per tile, then
       S = (scale Q) K^T          (T*G, n)   one sgemm
       P = softmax(S) by row      each row over its own causal / sliding-window key range
       O = P V / rowsum           (T*G, Dv)  one sgemm
   with T queries of the tile times the G query heads sharing the kv head as rows. The scores are
   exact float32 products, as in the online-softmax path (kernels_attn.h); only the summation
   order differs. Each task runs single-threaded sgemm on its own pool thread, as quant.h's
   weight panels do. Needs quant.h (ts_sgemm_nt, the registered sgemm) and kernels_attn.h. */
#ifndef TINYSERVE_ATTN_GEMM_H
#define TINYSERVE_ATTN_GEMM_H

#include "kernels_attn.h"
#include "quant.h"

#define TS_ATTN_TILE 64 /* queries per task: their (T*G, n) scores stay a few hundred KB */

/* c (n, m; ldc) = a (n, k; lda) @ b (k, m; ldb), through the registered sgemm */
static inline void ts_sgemm_nn(int64_t n, int64_t m, int64_t k, const float *a, int64_t lda,
                               const float *b, int64_t ldb, float *c, int64_t ldc) {
    if (ts_sgemm_ilp64)
        ((ts_sgemm64_fn)ts_sgemm_ptr)(TS_CBLAS_ROW_MAJOR, TS_CBLAS_NO_TRANS, TS_CBLAS_NO_TRANS, n,
                                      m, k, 1.0f, a, lda, b, ldb, 0.0f, c, ldc);
    else
        ((ts_sgemm32_fn)ts_sgemm_ptr)(TS_CBLAS_ROW_MAJOR, TS_CBLAS_NO_TRANS, TS_CBLAS_NO_TRANS,
                                      (int)n, (int)m, (int)k, 1.0f, a, (int)lda, b, (int)ldb, 0.0f,
                                      c, (int)ldc);
}

/* Whether prefill attention takes the sgemm tiles: only in exact-prefill mode (quant.h's
   ts_blas_min_n > 0), as sgemm's summation order depends on the tile a token lands in, and only
   where a registered sgemm can run single-threaded on each pool thread. */
static inline int ts_attn_gemm_ready(void) {
    return ts_blas_min_n > 0 && ts_sgemm_ptr != 0 && ts_blas_local_ptr != 0;
}

/* Every tile's task on the pool, BLAS held to one thread meanwhile; -1: out of memory. */
typedef struct {
    const ts_attn_job *a; /* the call's geometry (float32 pools, n_spans 1) */
    const int64_t *tiles; /* (n_tiles, 2): first and one-past-last flat token of each tile */
    int64_t n_tiles;
    _Atomic int failed;
} ts_attn_gemm_job;


/* item = tile * KVH + kv head: that tile's queries of the kv head's G query heads */
static void ts_attn_gemm_task(void *ctx, int64_t item) {
    ts_attn_gemm_job *gj = (ts_attn_gemm_job *)ctx;
    const ts_attn_job *j = gj->a;
    ((ts_blas_local_fn)ts_blas_local_ptr)(1);
    const int64_t KVH = j->KVH, G = j->H / KVH, Dh = j->Dh, Dv = j->Dv, BS = j->BS;
    const int64_t kvh = item % KVH, t0 = gj->tiles[2 * (item / KVH)];
    const int64_t t1 = gj->tiles[2 * (item / KVH) + 1], T = t1 - t0;
    const int32_t *table = j->block_tables + j->seq_of[t0] * j->max_blocks;
    int64_t k_lo, k_hi, lo, hi; /* the tile's keys: the union of its tokens' ranges */
    ts_attn_range(j, t0, &k_lo, &hi);
    ts_attn_range(j, t1 - 1, &lo, &k_hi);
    for (int64_t t = t0; t < t1; t++) {
        ts_attn_range(j, t, &lo, &hi);
        k_lo = lo < k_lo ? lo : k_lo;
        k_hi = hi > k_hi ? hi : k_hi;
    }
    const int64_t n = k_hi - k_lo + 1, rows = T * G;
    if (n <= 0) { /* no keys at all (cannot happen for a causal query: it sees itself) */
        for (int64_t t = t0; t < t1; t++)
            memset(j->out + (t * j->H + kvh * G) * Dv, 0, (size_t)(G * Dv) * sizeof(float));
        return;
    }
    float *q = (float *)ts_scratch(2, sizeof(float) * (size_t)(rows * Dh + n * (Dh + Dv) +
                                                               rows * n + rows));
    if (!q) {
        atomic_store(&gj->failed, 1);
        return;
    }
    float *kc = q + rows * Dh, *vc = kc + n * Dh, *sc = vc + n * Dv, *sums = sc + rows * n;
    for (int64_t t = t0; t < t1; t++) { /* Q rows (t, g), scaled */
        const float *qt = j->q + (t * j->H + kvh * G) * Dh;
        float *dst = q + (t - t0) * G * Dh;
        for (int64_t i = 0; i < G * Dh; i++) dst[i] = qt[i] * j->scale;
    }
    const float *kp = (const float *)j->k, *vp = (const float *)j->v;
    for (int64_t p = k_lo; p <= k_hi; p++) { /* this kv head's rows, out of their blocks */
        const int64_t block = table[p / BS], slot = block * BS + p % BS;
        memcpy(kc + (p - k_lo) * Dh, kp + (slot * KVH + kvh) * Dh, (size_t)Dh * sizeof(float));
        memcpy(vc + (p - k_lo) * Dv, vp + block * j->v_block + (p % BS) * j->v_row + kvh * Dv,
               (size_t)Dv * sizeof(float));
    }
    ts_sgemm_nt(rows, n, Dh, q, Dh, kc, sc, n); /* (T*G, n) scores */
    for (int64_t t = t0; t < t1; t++) {
        ts_attn_range(j, t, &lo, &hi);
        for (int64_t g = 0; g < G; g++) {
            float *s = sc + ((t - t0) * G + g) * n;
            const int64_t a = lo - k_lo, b = hi - k_lo + 1; /* the row's own keys */
            float m = -INFINITY;
            for (int64_t i = a; i < b; i++) m = s[i] > m ? s[i] : m;
            for (int64_t i = 0; i < a; i++) s[i] = 0.0f;
            sums[(t - t0) * G + g] = ts_exp_sub_sum(s + a, b - a, m); /* subtract max: stable */
            for (int64_t i = b; i < n; i++) s[i] = 0.0f;
        }
    }
    float *o = q; /* Q is spent: the (T*G, Dv) outputs go there (callers pass Dv <= Dh) */
    ts_sgemm_nn(rows, Dv, n, sc, n, vc, Dv, o, Dv); /* (T*G, Dv) */
    for (int64_t t = t0; t < t1; t++) {
        float *dst = j->out + (t * j->H + kvh * G) * Dv;
        for (int64_t g = 0; g < G; g++) {
            const float *src = o + ((t - t0) * G + g) * Dv;
            const float inv = 1.0f / sums[(t - t0) * G + g];
            for (int64_t d = 0; d < Dv; d++) dst[g * Dv + d] = src[d] * inv;
        }
    }
}

static inline int ts_attn_gemm(ts_attn_gemm_job *gj, int nthreads) {
    const ts_blas_local_fn set_threads = (ts_blas_local_fn)ts_blas_local_ptr;
    const int prev = set_threads(1);
    ts_parallel_for(nthreads, gj->n_tiles * gj->a->KVH, ts_attn_gemm_task, gj);
    set_threads(prev);
    return atomic_load(&gj->failed) ? -1 : 0;
}

#endif
