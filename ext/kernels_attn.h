/* Paged attention's inner loop for ext/kernels.pyx: one token's query heads that share a kv
   head, against that sequence's keys [lo, hi], read in place through its block table.

   Per block of BS keys: every key row is loaded once for all the heads of the group (GQA), the
   block's scores are exponentiated together (a vectorized exp instead of one libm call per key),
   and the running max / sum / weighted values follow the online softmax:
       m' = max(m, max_j s_j),  l' = l e^(m - m') + sum_j e^(s_j - m'),
       acc' = acc e^(m - m') + sum_j e^(s_j - m') v_j,   out = acc / l.
   Needs kernels_simd.h first (ts_dot, ts_axpy). */
#ifndef TINYSERVE_KERNELS_ATTN_H
#define TINYSERVE_KERNELS_ATTN_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX2__) && defined(__FMA__)
/* e^x for 8 floats: 2^n * p(r), x = n ln2 + r, |r| <= ln2/2; Cephes' degree-5 polynomial
   (relative error ~2e-7, as libm's expf to float rounding); x < -87.3 gives 0 */
static inline __m256 ts_exp256(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.33654f), hi = _mm256_set1_ps(88.3762626647949f);
    const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    x = _mm256_max_ps(_mm256_min_ps(x, hi), lo);
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n),
                                                         _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

/* s[i] = e^(s[i] - m) for i < n; -> their sum */
static inline float ts_exp_sub_sum(float *s, int64_t n, float m) {
    const __m256 vm = _mm256_set1_ps(m);
    __m256 tot = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 e = ts_exp256(_mm256_sub_ps(_mm256_loadu_ps(s + i), vm));
        _mm256_storeu_ps(s + i, e);
        tot = _mm256_add_ps(tot, e);
    }
    if (i < n) { /* the tail through a padded copy: same exp for every key */
        float pad[8];
        for (int j = 0; j < 8; j++) pad[j] = i + j < n ? s[i + j] - m : -INFINITY;
        const __m256 e = ts_exp256(_mm256_loadu_ps(pad));
        _mm256_storeu_ps(pad, e);
        memcpy(s + i, pad, (size_t)(n - i) * sizeof(float));
        tot = _mm256_add_ps(tot, e);
    }
    return ts_hsum256(tot);
}
#else
static inline float ts_exp_sub_sum(float *s, int64_t n, float m) {
    float tot = 0.0f;
    for (int64_t i = 0; i < n; i++) {
        s[i] = expf(s[i] - m);
        tot += s[i];
    }
    return tot;
}
#endif

/* out (gi, Dv) = softmax(q (gi, Dh) . K[lo..hi]^T * scale) V[lo..hi] for one token's heads
   h0 .. h0 + gi - 1, head h0 + g reading kv head g / G of k, v (G query heads per kv head; with
   gi = H a whole token, so each key row is read whole, in order: a decode batch is memory bound
   on the KV pool). k, v: the layer's pools at the first kv head's offset; key p lives at
   table[p / BS] * block_stride + (p % BS) * row_stride (v: v_block_stride, v_row_stride). work: gi * (BS + Dv + 2) floats. */
static inline void ts_attn_token(const float *q, int gi, int G, int64_t Dh, int64_t Dv, const float *k,
                                 const float *v, int64_t block_stride, int64_t row_stride,
                                 int64_t v_block_stride, int64_t v_row_stride, const int32_t *table, int64_t BS, int64_t lo, int64_t hi,
                                 float scale, float *out, float *work) {
    float *acc = work, *m = acc + gi * Dv, *l = m + gi, *sc = l + gi; /* sc: (gi, BS) */
    memset(acc, 0, (size_t)(gi * Dv) * sizeof(float));
    for (int g = 0; g < gi; g++) {
        m[g] = -INFINITY;
        l[g] = 0.0f;
    }
    for (int64_t b = lo / BS; b <= hi / BS; b++) {
        const int64_t j0 = b * BS < lo ? lo - b * BS : 0;
        const int64_t j1 = hi - b * BS + 1 < BS ? hi - b * BS + 1 : BS, nj = j1 - j0;
        const float *kb = k + table[b] * block_stride, *vb = v + table[b] * v_block_stride;
        for (int64_t j = j0; j < j1; j++) { /* each key once for every head of the group */
            const float *kp = kb + j * row_stride;
            for (int g = 0; g < gi; g++)
                sc[g * BS + j - j0] = ts_dot(q + g * Dh, kp + (g / G) * Dh, Dh) * scale;
        }
        for (int g = 0; g < gi; g++) {
            float *s = sc + g * BS, bm = -INFINITY;
            for (int64_t j = 0; j < nj; j++) bm = s[j] > bm ? s[j] : bm;
            const float m_new = m[g] > bm ? m[g] : bm;
            const float corr = expf(m[g] - m_new); /* rescale what came before */
            l[g] = l[g] * corr + ts_exp_sub_sum(s, nj, m_new);
            float *a = acc + g * Dv;
            if (corr != 1.0f)
                for (int64_t d = 0; d < Dv; d++) a[d] *= corr;
            const float *vg = vb + (g / G) * Dv;
            for (int64_t j = 0; j < nj; j++) ts_axpy(a, s[j], vg + (j0 + j) * v_row_stride, Dv);
            m[g] = m_new;
        }
    }
    for (int g = 0; g < gi; g++) {
        for (int64_t d = 0; d < Dv; d++) out[g * Dv + d] = acc[g * Dv + d] / l[g];
    }
}

/* The work items of one paged attention call: item = (token, group of gi query heads). */
typedef struct {
    const float *q; /* (N, H, Dh) */
    const float *k, *v; /* pools (NB, BS, KVH, Dh), (NB, BS, KVH, Dv) */
    const int64_t *seq_of, *seq_lens, *positions; /* (N,), (S,), (N,) */
    const int32_t *block_tables; /* (S, max_blocks) */
    int64_t max_blocks, H, Dh, Dv, BS, KVH, gi, window;
    float scale;
    float *out; /* (N, H, Dv) */
} ts_attn_job;

/* A per-thread buffer that only grows (no allocation per call once warm). */
static inline float *ts_attn_scratch(size_t n) {
    static __thread float *buf = 0;
    static __thread size_t cap = 0;
    if (n > cap) {
        free(buf);
        buf = (float *)malloc(n * sizeof(float));
        cap = buf ? n : 0;
    }
    return buf;
}

static void ts_attn_task(void *ctx, int64_t item) {
    const ts_attn_job *j = (const ts_attn_job *)ctx;
    const int64_t G = j->H / j->KVH, per_tok = j->H / j->gi;
    const int64_t t = item / per_tok;
    const int64_t kvh = (item % per_tok) * j->gi / G; /* gi = H: the whole token, kvh = g0 = 0 */
    const int64_t g0 = (item % per_tok) * j->gi % G;
    const int64_t s = j->seq_of[t], pos = j->positions[t];
    int64_t hi = pos; /* causal: keys at positions <= the query's */
    if (hi > j->seq_lens[s] - 1) hi = j->seq_lens[s] - 1;
    const int64_t lo = j->window > 0 && pos - j->window + 1 > 0 ? pos - j->window + 1 : 0;
    float *work = ts_attn_scratch((size_t)(j->gi * (j->Dv + j->BS + 2)));
    if (!work) abort(); /* a few KB */
    const int64_t h0 = kvh * G + g0;
    ts_attn_token(j->q + (t * j->H + h0) * j->Dh, (int)j->gi, (int)G, j->Dh, j->Dv,
                  j->k + kvh * j->Dh, j->v + kvh * j->Dv, j->BS * j->KVH * j->Dh, j->KVH * j->Dh,
                  j->BS * j->KVH * j->Dv, j->KVH * j->Dv, j->block_tables + s * j->max_blocks,
                  j->BS, lo, hi, j->scale, j->out + (t * j->H + h0) * j->Dv, work);
}

#endif
