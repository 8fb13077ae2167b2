/* AVX-512 tiles of the 32-block types (the VNNI inclusion of quant_simd.h defines TS_WIDE):
 * two blocks per 512-bit register, eight blocks folded per float step. Included by
 * quant_simd.h (SFX, DOT_US and the 256-bit helpers from there). No include guard on purpose. */

#ifdef TS_WIDE
/* AVX-512: two 32-blocks per 512-bit register, so one dpbusd/convert/FMA covers 64 values.
 * PAIR_PS(p) spreads the floats p[0], p[1] over lanes 0..7 and 8..15. */
#define PAIR_IDX _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0)
#define PAIR_PS(p)                                                                                 \
    _mm512_permutexvar_ps(PAIR_IDX,                                                                \
                          _mm512_castps128_ps512(_mm_castpd_ps(_mm_load_sd((const double *)(p)))))
#define JOIN256(lo, hi) _mm512_inserti64x4(_mm512_castsi256_si512(lo), (hi), 1)

/* two blocks' 16 packed bytes -> 64 bytes: lo(p0), hi(p0), lo(p1), hi(p1) nibbles */
static inline __m512i SFX(nibbles64)(const uint8_t *p0, const uint8_t *p1) {
    const __m256i both = _mm256_set_m128i(_mm_loadu_si128((const __m128i *)p1),
                                          _mm_loadu_si128((const __m128i *)p0));
    const __m512i dup = _mm512_shuffle_i64x2(_mm512_castsi256_si512(both),
                                             _mm512_castsi256_si512(both), _MM_SHUFFLE(1, 1, 0, 0));
    const __m512i shifted = _mm512_srlv_epi64(dup, _mm512_set_epi64(4, 4, 0, 0, 4, 4, 0, 0));
    return _mm512_and_si512(shifted, _mm512_set1_epi8(0x0F));
}

/* Eight 32-blocks at once: four dpbusd results p_k (blocks 2k, 2k+1 in 256-bit halves) fold
 * into one register whose lane 4L + k holds 128-bit lane L of p_k summed; lane 4L + k belongs to
 * block 2k + L/2 (OCT_IDX), so one convert and one FMA scale eight blocks. */
static inline __m512i SFX(fold4)(__m512i p0, __m512i p1, __m512i p2, __m512i p3) {
    const __m512i a =
        _mm512_add_epi32(_mm512_unpacklo_epi32(p0, p1), _mm512_unpackhi_epi32(p0, p1));
    const __m512i b =
        _mm512_add_epi32(_mm512_unpacklo_epi32(p2, p3), _mm512_unpackhi_epi32(p2, p3));
    return _mm512_add_epi32(_mm512_unpacklo_epi64(a, b), _mm512_unpackhi_epi64(a, b));
}
#define OCT_IDX _mm512_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6, 1, 3, 5, 7, 1, 3, 5, 7)
#define OCT_PS(p) _mm512_permutexvar_ps(OCT_IDX, _mm512_castps256_ps512(_mm256_loadu_ps(p)))

/* eight consecutive blocks of ts bytes: the f16 at bytes 0-1 (d) and 2-3 (m, when wanted) of each
 * -> (8,) f32, one gather and one conversion instead of sixteen scalar ones */
static inline __m256 SFX(f16x8)(const uint8_t *blk, int ts, __m256 *m) {
    const __m256i at =
        _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(ts));
    const __m256i dm = _mm256_i32gather_epi32((const int *)blk, at, 1);
    if (m) *m = _mm256_cvtph_ps(_mm256_cvtepi32_epi16(_mm256_srli_epi32(dm, 16)));
    return _mm256_cvtph_ps(_mm256_cvtepi32_epi16(dm));
}

#define WIDE_BEGIN                                                                                 \
    __m512 acc[8];                                                                                 \
    float accm[8];                                                                                 \
    for (int t = 0; t < NT; t++) {                                                                 \
        acc[t] = _mm512_setzero_ps();                                                              \
        accm[t] = 0.0f;                                                                            \
    }
#define WIDE_END                                                                                   \
    for (int t = 0; t < NT; t++) out[t * os] = _mm512_reduce_add_ps(acc[t]) - accm[t];

static inline __attribute__((always_inline)) void
SFX(tile_q8_0)(const uint8_t *w, const XQ *xq, int64_t nb, int NT, float *out, int64_t os) {
    WIDE_BEGIN
    int64_t b = 0;
    for (; b + 8 <= nb; b += 8) {
        __m512i aq[4];
        __mmask64 neg[4];
        for (int k = 0; k < 4; k++) {
            const uint8_t *b0 = w + (b + 2 * k) * 34, *b1 = b0 + 34;
            const __m512i q = JOIN256(_mm256_loadu_si256((const __m256i *)(b0 + 2)),
                                      _mm256_loadu_si256((const __m256i *)(b1 + 2)));
            aq[k] = _mm512_abs_epi8(q);
            neg[k] = _mm512_movepi8_mask(q);
        }
        const __m512 dwv =
            _mm512_permutexvar_ps(OCT_IDX, _mm512_castps256_ps512(SFX(f16x8)(w + b * 34, 34, 0)));
        for (int t = 0; t < NT; t++) {
            __m512i p[4];
            for (int k = 0; k < 4; k++) {
                const __m512i xv = _mm512_loadu_si512((const void *)(xq[t].q + (b + 2 * k) * 32));
                const __m512i sx = _mm512_mask_sub_epi8(xv, neg[k], _mm512_setzero_si512(), xv);
                p[k] = _mm512_dpbusd_epi32(_mm512_setzero_si512(), aq[k], sx);
            }
            const __m512i f = SFX(fold4)(p[0], p[1], p[2], p[3]);
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(f), _mm512_mul_ps(dwv, OCT_PS(xq[t].d + b)),
                                     acc[t]);
        }
    }
    for (; b + 2 <= nb; b += 2) {
        const uint8_t *b0 = w + b * 34, *b1 = b0 + 34;
        const float dw[2] = {SFX(h2f)(b0), SFX(h2f)(b1)};
        const __m512 dwv = PAIR_PS(dw);
        const __m512i q = JOIN256(_mm256_loadu_si256((const __m256i *)(b0 + 2)),
                                  _mm256_loadu_si256((const __m256i *)(b1 + 2)));
        const __m512i aq = _mm512_abs_epi8(q);
        const __mmask64 neg = _mm512_movepi8_mask(q);
        for (int t = 0; t < NT; t++) {
            const __m512i xv = _mm512_loadu_si512((const void *)(xq[t].q + b * 32));
            const __m512i sx = _mm512_mask_sub_epi8(xv, neg, _mm512_setzero_si512(), xv);
            const __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), aq, sx);
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p),
                                     _mm512_mul_ps(dwv, PAIR_PS(xq[t].d + b)), acc[t]);
        }
    }
    if (b < nb) { /* odd block count: the last block alone */
        const uint8_t *blk = w + b * 34;
        const float dw = SFX(h2f)(blk);
        const __m256i q = _mm256_loadu_si256((const __m256i *)(blk + 2));
        const __m256i aq = _mm256_sign_epi8(q, q);
        for (int t = 0; t < NT; t++) {
            const __m256i xv = _mm256_loadu_si256((const __m256i *)(xq[t].q + b * 32));
            const __m256i p = DOT_US(aq, _mm256_sign_epi8(xv, q));
            const __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(dw * xq[t].d[b]));
            acc[t] = _mm512_add_ps(acc[t], _mm512_zextps256_ps512(v));
        }
    }
    WIDE_END
}

/* Q4_0, Q4_1, Q5_0, Q5_1 as unsigned values u (0..15 / 0..31) with y = d*u + m, where m is the
 * stored min or -8d / -16d; w.x = d*dx*sum(u*xq) + m*s with s = dx*sum(xq) */
static inline __attribute__((always_inline)) void SFX(tile_wide_u)(const uint8_t *w, const XQ *xq,
                                                                   int64_t nb, int NT, float *out,
                                                                   int64_t os, int qtype) {
    const int has_min = qtype == TS_Q4_1 || qtype == TS_Q5_1;
    const int five = qtype == TS_Q5_0 || qtype == TS_Q5_1;
    const float offset = has_min ? 0.0f : (five ? -16.0f : -8.0f);
    const int ts = ts_type_size(qtype), qh_at = 2 + 2 * has_min, qs_at = qh_at + 4 * five;
    WIDE_BEGIN
    __m128 accm2[8]; /* the min terms m * s of two blocks, lanes 0 and 1 */
    for (int t = 0; t < NT; t++) accm2[t] = _mm_setzero_ps();
    __m256 accm8[8]; /* min terms of eight blocks */
    for (int t = 0; t < NT; t++) accm8[t] = _mm256_setzero_ps();
    int64_t b = 0;
    for (; b + 8 <= nb; b += 8) {
        __m256 mw8;
        const __m256 dw8 = SFX(f16x8)(w + b * ts, ts, &mw8);
        const __m512 dwv = _mm512_permutexvar_ps(OCT_IDX, _mm512_castps256_ps512(dw8));
        const __m256 mwv = has_min ? mw8 : _mm256_mul_ps(_mm256_set1_ps(offset), dw8);
        __m512i q[4];
        for (int k = 0; k < 4; k++) {
            const uint8_t *b0 = w + (b + 2 * k) * ts, *b1 = b0 + ts;
            q[k] = SFX(nibbles64)(b0 + qs_at, b1 + qs_at);
            if (five)
                q[k] = _mm512_or_si512(
                    q[k], JOIN256(SFX(bits32_x10)(b0 + qh_at), SFX(bits32_x10)(b1 + qh_at)));
        }
        for (int t = 0; t < NT; t++) {
            __m512i p[4];
            for (int k = 0; k < 4; k++) {
                const __m512i xv = _mm512_loadu_si512((const void *)(xq[t].q + (b + 2 * k) * 32));
                p[k] = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q[k], xv);
            }
            const __m512i f = SFX(fold4)(p[0], p[1], p[2], p[3]);
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(f), _mm512_mul_ps(dwv, OCT_PS(xq[t].d + b)),
                                     acc[t]);
            accm8[t] = _mm256_fmadd_ps(mwv, _mm256_loadu_ps(xq[t].s + b), accm8[t]);
        }
    }
    for (int t = 0; t < NT; t++) accm[t] -= SFX(hsum)(accm8[t]);
    for (; b + 2 <= nb; b += 2) {
        const uint8_t *b0 = w + b * ts, *b1 = b0 + ts;
        const float dw[2] = {SFX(h2f)(b0), SFX(h2f)(b1)};
        const __m128 mw2 = has_min ? _mm_setr_ps(SFX(h2f)(b0 + 2), SFX(h2f)(b1 + 2), 0.0f, 0.0f)
                                   : _mm_setr_ps(offset * dw[0], offset * dw[1], 0.0f, 0.0f);
        const __m512 dwv = PAIR_PS(dw);
        __m512i q = SFX(nibbles64)(b0 + qs_at, b1 + qs_at);
        if (five)
            q = _mm512_or_si512(q,
                                JOIN256(SFX(bits32_x10)(b0 + qh_at), SFX(bits32_x10)(b1 + qh_at)));
        for (int t = 0; t < NT; t++) {
            const __m512i xv = _mm512_loadu_si512((const void *)(xq[t].q + b * 32));
            const __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q, xv);
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p),
                                     _mm512_mul_ps(dwv, PAIR_PS(xq[t].d + b)), acc[t]);
            accm2[t] = _mm_fmadd_ps(mw2, _mm_castpd_ps(_mm_load_sd((const double *)(xq[t].s + b))),
                                    accm2[t]);
        }
    }
    for (int t = 0; t < NT; t++) {
        const __m128 a = _mm_add_ps(accm2[t], _mm_movehdup_ps(accm2[t]));
        accm[t] -= _mm_cvtss_f32(a);
    }
    if (b < nb) { /* odd block count: the last block alone */
        const uint8_t *blk = w + b * ts;
        const float dw = SFX(h2f)(blk);
        const float mw = has_min ? SFX(h2f)(blk + 2) : offset * dw;
        __m256i q = SFX(nibbles32)(blk + qs_at);
        if (five) q = _mm256_or_si256(q, SFX(bits32_x10)(blk + qh_at));
        for (int t = 0; t < NT; t++) {
            const __m256i xv = _mm256_loadu_si256((const __m256i *)(xq[t].q + b * 32));
            const __m256 v =
                _mm256_mul_ps(_mm256_cvtepi32_ps(DOT_US(q, xv)), _mm256_set1_ps(dw * xq[t].d[b]));
            acc[t] = _mm512_add_ps(acc[t], _mm512_zextps256_ps512(v));
            accm[t] -= mw * xq[t].s[b];
        }
    }
    WIDE_END
}

#define WIDE_U(name, qt)                                                                           \
    static inline __attribute__((always_inline)) void SFX(tile_##name)(                            \
        const uint8_t *w, const XQ *xq, int64_t nb, int NT, float *out, int64_t os) {              \
        SFX(tile_wide_u)(w, xq, nb, NT, out, os, qt);                                              \
    }
WIDE_U(q4_0, TS_Q4_0)
WIDE_U(q4_1, TS_Q4_1)
WIDE_U(q5_0, TS_Q5_0)
WIDE_U(q5_1, TS_Q5_1)
#undef WIDE_U
#endif /* TS_WIDE */
