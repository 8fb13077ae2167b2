/* The SIMD twins of quant_packed.h's group kernel, included twice by it: AVX2 (maddubs, int16
 * sums widened by madd) and AVX-512 VNNI (dpbusd on 256-bit registers, int32 sums throughout).
 * The integer sums are exact either way and the float steps the same: both give the same bits.
 * Before each inclusion: PSFX(name) (the ISA suffix), SFXP(name) (quant_simd.h's helpers of the
 * same ISA), PACKED_VNNI (0 or 1) and a `#pragma GCC target`. No include guard on purpose. */

static inline __m256i PSFX(bcast4)(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}

/* NT (<= 4) activation rows against one group: the block's weights are decoded once into
 * registers and met by every row's activations */
static inline __attribute__((always_inline)) void
PSFX(group_tile)(const uint8_t *g, const XQ *xq, int64_t nb, int NT, float *out, int64_t os,
                   int qtype) {
    const int rec = ts_packed_rec(qtype), has_min = ts_has_min(qtype), q8 = qtype == TS_Q8_0;
    const int five = ts_five(qtype), qoff = ts_packed_qoff(qtype), hoff = ts_packed_hoff(qtype);
    const __m256i m4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    (void)ones;
    __m256 acc[4];
    for (int t = 0; t < NT; t++) acc[t] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *p = g + b * rec, *q = p + qoff;
        __m256i s[4];
        if (q8) {
            for (int t = 0; t < NT; t++) s[t] = _mm256_setzero_si256();
            for (int c = 0; c < 8; c++) {
                const __m256i w = _mm256_loadu_si256((const __m256i *)(q + 32 * c));
                const __m256i aw = _mm256_sign_epi8(w, w);
                for (int t = 0; t < NT; t++) {
                    const __m256i x = _mm256_sign_epi8(PSFX(bcast4)(xq[t].q + b * 32 + 4 * c), w);
                    s[t] = DOT_ACC(s[t], aw, x);
                }
            }
        } else {
            /* AVX2: 8 maddubs of 4-bit weights (<= 15) and |x| <= 127 stay below 2^15 in int16,
             * 4 of 5-bit ones (<= 31): the int16 sums widen to int32 every 4 (or 2) words */
#if !PACKED_VNNI
            __m256i s16[4];
            for (int t = 0; t < NT; t++) s16[t] = _mm256_setzero_si256();
#endif
            for (int t = 0; t < NT; t++) s[t] = _mm256_setzero_si256();
            for (int i = 0; i < 4; i++) {
                const __m256i raw = _mm256_loadu_si256((const __m256i *)(q + 32 * i));
                __m256i lo = _mm256_and_si256(raw, m4);
                __m256i hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
                if (five) {
                    lo = _mm256_or_si256(lo, SFXP(bits32_x10)(p + hoff + 8 * i));
                    hi = _mm256_or_si256(hi, SFXP(bits32_x10)(p + hoff + 8 * i + 4));
                }
                for (int t = 0; t < NT; t++) {
                    const int8_t *x = xq[t].q + b * 32;
                    const __m256i xl = PSFX(bcast4)(x + 4 * i), xh = PSFX(bcast4)(x + 16 + 4 * i);
#if PACKED_VNNI
                    s[t] = _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(s[t], lo, xl), hi, xh);
#else
                    s16[t] = _mm256_add_epi16(s16[t], _mm256_add_epi16(_mm256_maddubs_epi16(lo, xl),
                                                                       _mm256_maddubs_epi16(hi, xh)));
#endif
                }
#if !PACKED_VNNI
                if (i == 3 || (five && i == 1))
                    for (int t = 0; t < NT; t++) {
                        s[t] = _mm256_add_epi32(s[t], _mm256_madd_epi16(s16[t], ones));
                        s16[t] = _mm256_setzero_si256();
                    }
#endif
            }
            if (!has_min)
                for (int t = 0; t < NT; t++)
                    s[t] = _mm256_sub_epi32(s[t], _mm256_set1_epi32((five ? 16 : 8) * xq[t].bs[b]));
        }
        const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
        const __m256 mw = has_min ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 16)))
                                  : _mm256_setzero_ps();
        for (int t = 0; t < NT; t++) {
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[t]),
                                     _mm256_mul_ps(dw, _mm256_set1_ps(xq[t].d[b])), acc[t]);
            if (has_min) acc[t] = _mm256_fmadd_ps(mw, _mm256_set1_ps(xq[t].s[b]), acc[t]);
        }
    }
    for (int t = 0; t < NT; t++) _mm256_storeu_ps(out + t * os, acc[t]);
}

#define TS_GROUP_SIMD(name, qt)                                                                    \
    static void PSFX(group_##name)(const uint8_t *g, const XQ *xq, int64_t nb, int n_x,        \
                                       float *out, int64_t os) {                                   \
        for (int t0 = 0; t0 < n_x; t0 += 4) {                                                      \
            const int nt = n_x - t0 < 4 ? n_x - t0 : 4;                                            \
            switch (nt) {                                                                          \
            case 4: PSFX(group_tile)(g, xq + t0, nb, 4, out + t0 * os, os, qt); break;           \
            case 3: PSFX(group_tile)(g, xq + t0, nb, 3, out + t0 * os, os, qt); break;           \
            case 2: PSFX(group_tile)(g, xq + t0, nb, 2, out + t0 * os, os, qt); break;           \
            default: PSFX(group_tile)(g, xq + t0, nb, 1, out + t0 * os, os, qt); break;          \
            }                                                                                      \
        }                                                                                          \
    }
TS_GROUP_SIMD(q4_0, TS_Q4_0)
TS_GROUP_SIMD(q4_1, TS_Q4_1)
TS_GROUP_SIMD(q5_0, TS_Q5_0)
TS_GROUP_SIMD(q5_1, TS_Q5_1)
TS_GROUP_SIMD(q8_0, TS_Q8_0)
#undef TS_GROUP_SIMD


#include "quant_packed_k_simd.h" /* Q4_K, Q5_K, Q6_K */
