/* K-quant tiles (Q4_K, Q5_K, Q6_K) of the SIMD twins, included by quant_simd.h inside each of its
 * ISA inclusions (SFX, DOT_US, ACC16, TILE_END from there). No include guard on purpose. */

/* ---- K-quants against Q8_K-style activations (one scale per 256 values) -------------------
 * maddubs gives int16 pair sums (no saturation: |q| <= 32, |x| <= 127); ACC16 multiplies them by
 * the sub-block's integer scale and accumulates int32, so a super-block needs one float step. */

#define K_BEGIN                                                                                    \
    __m256 acc[8];                                                                                 \
    float accm[8];                                                                                 \
    for (int t = 0; t < NT; t++) {                                                                 \
        acc[t] = _mm256_setzero_ps();                                                              \
        accm[t] = 0.0f;                                                                            \
    }

/* Q4_K / Q5_K: sub-block s (32 values) is y = d*sc_s*q - dmin*m_s */
static inline __attribute__((always_inline)) void SFX(tile_q45_k)(const uint8_t *w, const XQ *xq,
                                                                  int64_t nb, int NT, float *out,
                                                                  int64_t os, int five) {
    K_BEGIN
    const __m256i m4 = _mm256_set1_epi8(0x0F), one = _mm256_set1_epi8(1);
    const int ts = five ? 176 : 144;
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = w + b * ts, *qs = blk + (five ? 48 : 16);
        const float d = SFX(h2f)(blk), dmin = SFX(h2f)(blk + 2);
        uint8_t sc[8], mn[8];
        ts_scale_min_k4(blk + 4, sc, mn);
        const __m256i qh =
            five ? _mm256_loadu_si256((const __m256i *)(blk + 16)) : _mm256_setzero_si256();
        __m256i isum[8];
        for (int t = 0; t < NT; t++) isum[t] = _mm256_setzero_si256();
        for (int j = 0; j < 4; j++) {
            const __m256i raw = _mm256_loadu_si256((const __m256i *)(qs + 32 * j));
            __m256i lo = _mm256_and_si256(raw, m4);
            __m256i hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
            if (five) { /* bit s of qh[l] is the 5th bit of value l of sub-block s */
                const __m256i hlo = _mm256_and_si256(_mm256_srli_epi16(qh, 2 * j), one);
                const __m256i hhi = _mm256_and_si256(_mm256_srli_epi16(qh, 2 * j + 1), one);
                lo = _mm256_or_si256(lo, _mm256_slli_epi16(hlo, 4));
                hi = _mm256_or_si256(hi, _mm256_slli_epi16(hhi, 4));
            }
            const __m256i slo = _mm256_set1_epi16(sc[2 * j]),
                          shi = _mm256_set1_epi16(sc[2 * j + 1]);
            for (int t = 0; t < NT; t++) {
                const int8_t *x = xq[t].q + b * 256 + 64 * j;
                const __m256i xlo = _mm256_loadu_si256((const __m256i *)x);
                const __m256i xhi = _mm256_loadu_si256((const __m256i *)(x + 32));
                isum[t] = ACC16(isum[t], _mm256_maddubs_epi16(lo, xlo), slo);
                isum[t] = ACC16(isum[t], _mm256_maddubs_epi16(hi, xhi), shi);
            }
        }
        /* mins: dmin * dx * sum_s m_s * sum(xq of sub-block s) */
        const __m128i mins = _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)mn));
        for (int t = 0; t < NT; t++) {
            const float dx = xq[t].d[b];
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[t]), _mm256_set1_ps(d * dx), acc[t]);
            __m128i m = _mm_madd_epi16(mins, _mm_loadu_si128((const __m128i *)(xq[t].bs + b * 8)));
            m = _mm_add_epi32(m, _mm_unpackhi_epi64(m, m));
            m = _mm_add_epi32(m, _mm_shuffle_epi32(m, 1));
            accm[t] += dmin * dx * (float)_mm_cvtsi128_si32(m);
        }
    }
    TILE_END
}

static inline __attribute__((always_inline)) void
SFX(tile_q4_k)(const uint8_t *w, const XQ *xq, int64_t nb, int NT, float *out, int64_t os) {
    SFX(tile_q45_k)(w, xq, nb, NT, out, os, 0);
}

static inline __attribute__((always_inline)) void
SFX(tile_q5_k)(const uint8_t *w, const XQ *xq, int64_t nb, int NT, float *out, int64_t os) {
    SFX(tile_q45_k)(w, xq, nb, NT, out, os, 1);
}

/* Q6_K: value 128h + 32j + l = (6-bit q) - 32 with an int8 scale per 16 values; the int16 pair
 * sums of values 0..15 of a 32-group sit in the low 128 bits, of values 16..31 in the high */
static inline __attribute__((always_inline)) void
SFX(tile_q6_k)(const uint8_t *w, const XQ *xq, int64_t nb, int NT, float *out, int64_t os) {
    K_BEGIN
    const __m256i m4 = _mm256_set1_epi8(0x0F), m3 = _mm256_set1_epi8(3);
    const __m256i off = _mm256_set1_epi8(32);
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = w + b * 210;
        const float d = SFX(h2f)(blk + 208);
        const int8_t *scales = (const int8_t *)(blk + 192);
        __m256i isum[8];
        for (int t = 0; t < NT; t++) isum[t] = _mm256_setzero_si256();
        for (int h = 0; h < 2; h++) {
            const __m256i ql0 = _mm256_loadu_si256((const __m256i *)(blk + 64 * h));
            const __m256i ql1 = _mm256_loadu_si256((const __m256i *)(blk + 64 * h + 32));
            const __m256i qh = _mm256_loadu_si256((const __m256i *)(blk + 128 + 32 * h));
            for (int j = 0; j < 4; j++) {
                const __m256i ql = (j & 1) ? ql1 : ql0;
                const __m256i low = (j & 2) ? _mm256_and_si256(_mm256_srli_epi16(ql, 4), m4)
                                            : _mm256_and_si256(ql, m4);
                const __m256i high = _mm256_and_si256(_mm256_srli_epi16(qh, 2 * j), m3);
                const __m256i q = _mm256_sub_epi8(_mm256_or_si256(low, _mm256_slli_epi16(high, 4)),
                                                  off); /* [-32, 31] */
                const __m256i aq = _mm256_sign_epi8(q, q);
                const __m256i sv = _mm256_set_m128i(_mm_set1_epi16(scales[8 * h + 2 * j + 1]),
                                                    _mm_set1_epi16(scales[8 * h + 2 * j]));
                for (int t = 0; t < NT; t++) {
                    const __m256i xv =
                        _mm256_loadu_si256((const __m256i *)(xq[t].q + b * 256 + 128 * h + 32 * j));
                    isum[t] = ACC16(isum[t], _mm256_maddubs_epi16(aq, _mm256_sign_epi8(xv, q)), sv);
                }
            }
        }
        for (int t = 0; t < NT; t++)
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[t]), _mm256_set1_ps(d * xq[t].d[b]),
                                     acc[t]);
    }
    TILE_END
}
#undef K_BEGIN
