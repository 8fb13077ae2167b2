/* Per-head products for the decoder stack's multi-head latent attention (ext/decoder.pxi):
       out[n, h, :] = w[h] @ x[n, h, :]        x (N, H, K; row stride ldx), w (H, M, K)
   MLA absorbs W_UK into each query head ((dr + dn) -> (dr + r)) and applies W_UV to each head's
   attended latent (r -> dv) this way. One task per head on the kernel pool: a few rows are dot
   products, each output one ts_dot whatever the row count (a row's result does not depend on the
   step). In exact-prefill mode (quant.h's ts_blas_min_n > 0), from HEAD_GEMM_MIN_ROWS rows (a
   prefill chunk) each head is one single-threaded sgemm on its pool thread (as attn_gemm.h's
   tiles), when a BLAS with a per-thread thread setter is registered. */
#ifndef TINYSERVE_HEAD_MATMUL_H
#define TINYSERVE_HEAD_MATMUL_H

#include "kernels_simd.h"
#include "pool.h"
#include "quant.h"

#define TS_HEAD_GEMM_MIN_ROWS 8

typedef struct {
    const float *x;
    const float *w;
    float *out;
    int64_t N, K, M, ldx, ldo;
    int gemm;
} ts_head_job;

static void ts_head_task(void *ctx, int64_t h) {
    const ts_head_job *j = (const ts_head_job *)ctx;
    const float *x = j->x + h * j->K, *w = j->w + h * j->M * j->K;
    float *out = j->out + h * j->M;
    if (j->gemm) {
        ((ts_blas_local_fn)ts_blas_local_ptr)(1);
        ts_sgemm_nt(j->N, j->M, j->K, x, j->ldx, w, out, j->ldo);
        return;
    }
    for (int64_t n = 0; n < j->N; n++)
        for (int64_t m = 0; m < j->M; m++)
            out[n * j->ldo + m] = ts_dot(x + n * j->ldx, w + m * j->K, j->K);
}

/* x (N, H, K) contiguous heads, w (H, M, K) -> out (N, H, M) */
static inline void ts_head_matmul(const float *x, int64_t N, int64_t H, int64_t K, const float *w,
                                  int64_t M, float *out, int nthreads) {
    ts_head_job job = {x, w, out, N, K, M, H * K, H * M, 0};
    job.gemm = ts_blas_min_n > 0 && N >= TS_HEAD_GEMM_MIN_ROWS && ts_sgemm_ptr != 0 &&
               ts_blas_local_ptr != 0;
    if (!job.gemm) {
        ts_parallel_for(nthreads, H, ts_head_task, &job);
        return;
    }
    const ts_blas_local_fn set_threads = (ts_blas_local_fn)ts_blas_local_ptr;
    const int prev = set_threads(1); /* applied process-wide by some OpenBLAS: restored after */
    ts_parallel_for(nthreads, H, ts_head_task, &job);
    set_threads(prev);
}

#endif
