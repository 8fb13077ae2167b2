/* AVX-512 twins of paged attention's score and value kernels (kernels_attn.h), for CPUs of the
   vnni ISA level and up: 16 floats per instruction, and 32 registers for 16 independent FMA
   chains (four heads times four keys).

   Scores (Dh % 16 == 0): key j's score is one 16-lane FMA chain over d, folded to 8 lanes
   (low half + high half) and reduced as the AVX2 kernel reduces its lanes. That is a different
   order from the AVX2 kernel's, so a CPU has one score arithmetic: ts_attn_span takes this one
   for every token (prefill tiles and decode pieces alike) whenever the call is wide. Each key's
   score is the same bits however the keys are grouped (tail keys too), so the grouping here is
   free. Values: acc[d] = acc[d] * corr + p_0 v_0[d] + p_1 v_1[d] + ..., one FMA chain per
   output dim in key order, the AVX2 kernel's arithmetic lane for lane. */
#ifndef TINYSERVE_KERNELS_ATTN_WIDE_H
#define TINYSERVE_KERNELS_ATTN_WIDE_H

#include <stdint.h>

/* target pragmas need GCC; other compilers (and TS_NO_SIMD builds) stay on the AVX2 kernels */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(TS_NO_SIMD) && \
    defined(__AVX2__) && defined(__FMA__)
#define TS_ATTN_WIDE 1
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f")
#include <immintrin.h>

/* the sums of four keys' 16-lane chains: fold each to 8 lanes, then reduce as ts_hsum4x256 */
static inline __m128 ts_hsum4x512(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
#define TS_FOLD(a)                                                                                 \
    _mm256_add_ps(_mm512_castps512_ps256(a),                                                       \
                  _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)))
    return ts_hsum4x256(TS_FOLD(a0), TS_FOLD(a1), TS_FOLD(a2), TS_FOLD(a3));
#undef TS_FOLD
}

/* NH heads (q rows Dh apart) against NK keys (rows rs apart; NK 1 or 4): sc[h * BS + i] */
static inline __attribute__((always_inline)) void ts_dots512(const float *q, int NH,
                                                             const float *k, int64_t rs, int NK,
                                                             int64_t Dh, float *sc, int64_t BS) {
    __m512 a[4][4];
    for (int h = 0; h < NH; h++)
        for (int i = 0; i < NK; i++) a[h][i] = _mm512_setzero_ps();
    for (int64_t d = 0; d < Dh; d += 16) {
        __m512 qv[4];
        for (int h = 0; h < NH; h++) qv[h] = _mm512_loadu_ps(q + h * Dh + d);
        for (int i = 0; i < NK; i++) {
            const __m512 kv = _mm512_loadu_ps(k + i * rs + d);
            for (int h = 0; h < NH; h++) a[h][i] = _mm512_fmadd_ps(qv[h], kv, a[h][i]);
        }
    }
    const __m512 z = _mm512_setzero_ps();
    for (int h = 0; h < NH; h++) {
        if (NK == 4) {
            _mm_storeu_ps(sc + h * BS, ts_hsum4x512(a[h][0], a[h][1], a[h][2], a[h][3]));
        } else {
            sc[h * BS] = _mm_cvtss_f32(ts_hsum4x512(a[h][0], z, z, z));
        }
    }
}

/* ts_attn_scores' contract (Dh % 16 == 0): sc[g * BS + j - j0] for keys j0 .. j1 - 1 */
static void ts_attn_scores_wide(const float *q, int gi, int64_t Dh, const float *kb, int64_t rs,
                                int64_t j0, int64_t j1, float *sc, int64_t BS) {
    for (int64_t j = j0; j < j1;) {
        const int four = j + 4 <= j1;
        for (int g = 0; g < gi; g += 4) {
            const float *qg = q + g * Dh, *kj = kb + j * rs;
            float *s = sc + g * BS + (j - j0);
            /* constant head and key counts: the accumulators stay in registers */
            switch ((gi - g < 4 ? gi - g : 4) * 2 + four) {
            case 9: ts_dots512(qg, 4, kj, rs, 4, Dh, s, BS); break;
            case 8: ts_dots512(qg, 4, kj, rs, 1, Dh, s, BS); break;
            case 7: ts_dots512(qg, 3, kj, rs, 4, Dh, s, BS); break;
            case 6: ts_dots512(qg, 3, kj, rs, 1, Dh, s, BS); break;
            case 5: ts_dots512(qg, 2, kj, rs, 4, Dh, s, BS); break;
            case 4: ts_dots512(qg, 2, kj, rs, 1, Dh, s, BS); break;
            case 3: ts_dots512(qg, 1, kj, rs, 4, Dh, s, BS); break;
            default: ts_dots512(qg, 1, kj, rs, 1, Dh, s, BS); break;
            }
        }
        j += four ? 4 : 1;
    }
}

/* ts_attn_pv's contract and bits: 16 dims a lane group, the last group masked */
static void ts_attn_pv_wide(float *acc, const float *corr, const float *p, int gi, int64_t BS,
                            const float *vb, int64_t rs, int64_t nj, int64_t Dv) {
    for (int g = 0; g < gi; g++) {
        float *a = acc + g * Dv;
        const float *pg = p + g * BS;
        const __m512 c = _mm512_set1_ps(corr[g]);
        int64_t d0 = 0;
        for (; d0 + 128 <= Dv; d0 += 128) {
            __m512 r[8];
            for (int i = 0; i < 8; i++) r[i] = _mm512_mul_ps(_mm512_loadu_ps(a + d0 + 16 * i), c);
            for (int64_t j = 0; j < nj; j++) {
                const __m512 pj = _mm512_set1_ps(pg[j]);
                const float *vr = vb + j * rs + d0;
                for (int i = 0; i < 8; i++)
                    r[i] = _mm512_fmadd_ps(pj, _mm512_loadu_ps(vr + 16 * i), r[i]);
            }
            for (int i = 0; i < 8; i++) _mm512_storeu_ps(a + d0 + 16 * i, r[i]);
        }
        for (; d0 < Dv; d0 += 16) {
            const __mmask16 live = Dv - d0 >= 16 ? 0xFFFF : (__mmask16)((1u << (Dv - d0)) - 1);
            __m512 r = _mm512_mul_ps(_mm512_maskz_loadu_ps(live, a + d0), c);
            for (int64_t j = 0; j < nj; j++)
                r = _mm512_fmadd_ps(_mm512_set1_ps(pg[j]),
                                    _mm512_maskz_loadu_ps(live, vb + j * rs + d0), r);
            _mm512_mask_storeu_ps(a + d0, live, r);
        }
    }
}

#pragma GCC pop_options
#else
#define TS_ATTN_WIDE 0
#endif

#endif
