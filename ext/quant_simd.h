/* x86 SIMD twins of quant.h's scalar kernels, included twice by quant.h: once for AVX2
 * (maddubs + madd) and once for AVX-512 VNNI (dpbusd on 256-bit registers).
 *
 * Before each inclusion quant.h defines:
 *   SFX(name)       appends the ISA suffix (name##_avx2 / name##_vnni)
 *   DOT_US(u, s)    u8 (32 lanes) x s8 (32 lanes) -> 8 x int32, lane k = sum of bytes 4k..4k+3
 * and a `#pragma GCC target` that enables the instructions.
 *
 * One tile = one weight row x up to 4 (AVX2) or 8 (VNNI) activation rows: a weight block is
 * decoded into a register once and dotted with each activation row's matching int8 block, so the
 * weights stream from memory once however many rows (batched decode, prefill) the call has.
 * With TS_WIDE (the VNNI build) the 32-block types take two blocks per 512-bit register.
 * No include guard on purpose.
 */

static inline float SFX(hsum)(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline float SFX(h2f)(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

/* 16 packed bytes -> 32 bytes: low nibbles in lanes 0..15, high nibbles in 16..31 (ggml order) */
static inline __m256i SFX(nibbles32)(const uint8_t *p) {
    const __m128i q = _mm_loadu_si128((const __m128i *)p);
    const __m128i m = _mm_set1_epi8(0x0F);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(q, 4), m), _mm_and_si128(q, m));
}

/* 32 bits -> 32 bytes, byte j = 0x10 where bit j is set (the 5th bit of Q5_0/Q5_1 values) */
static inline __m256i SFX(bits32_x10)(const uint8_t *p) {
    uint32_t b;
    memcpy(&b, p, 4);
    const __m256i shuf = _mm256_set_epi64x(0x0303030303030303LL, 0x0202020202020202LL,
                                           0x0101010101010101LL, 0x0000000000000000LL);
    __m256i bytes = _mm256_shuffle_epi8(_mm256_set1_epi32((int)b), shuf);
    bytes = _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfeLL));
    bytes = _mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1));
    return _mm256_and_si256(bytes, _mm256_set1_epi8(0x10));
}

/* signed weights w (int8) . activations x: |w| (as u8) times x with w's sign */
#define DOT_SS(w, x) DOT_US(_mm256_sign_epi8((w), (w)), _mm256_sign_epi8((x), (w)))

#define TILE_BEGIN                                                                                 \
    __m256 acc[8];                                                                                 \
    float accm[8];                                                                                 \
    for (int t = 0; t < NT; t++) {                                                                 \
        acc[t] = _mm256_setzero_ps();                                                              \
        accm[t] = 0.0f;                                                                            \
    }

#define TILE_END                                                                                   \
    for (int t = 0; t < NT; t++) out[t * os] = SFX(hsum)(acc[t]) - accm[t];

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

/* ---- 32-value block types ---------------------------------------------------------------- */

#ifndef TS_WIDE
static inline __attribute__((always_inline)) void
SFX(tile_q8_0)(const uint8_t *w, const XQ *xq, int64_t nb, int NT, float *out, int64_t os) {
    TILE_BEGIN
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = w + b * 34;
        const float dw = SFX(h2f)(blk);
        const __m256i q = _mm256_loadu_si256((const __m256i *)(blk + 2));
        const __m256i aq = _mm256_sign_epi8(q, q);
        for (int t = 0; t < NT; t++) {
            const __m256i xv = _mm256_loadu_si256((const __m256i *)(xq[t].q + b * 32));
            const __m256i p = DOT_US(aq, _mm256_sign_epi8(xv, q));
            acc[t] =
                _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(dw * xq[t].d[b]), acc[t]);
        }
    }
    TILE_END
}
#endif

#ifndef TS_WIDE
static inline __attribute__((always_inline)) void
SFX(tile_q4_0)(const uint8_t *w, const XQ *xq, int64_t nb, int NT, float *out, int64_t os) {
    TILE_BEGIN
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = w + b * 18;
        const float dw = SFX(h2f)(blk);
        const __m256i q = _mm256_sub_epi8(SFX(nibbles32)(blk + 2), _mm256_set1_epi8(8));
        const __m256i aq = _mm256_sign_epi8(q, q);
        for (int t = 0; t < NT; t++) {
            const __m256i xv = _mm256_loadu_si256((const __m256i *)(xq[t].q + b * 32));
            const __m256i p = DOT_US(aq, _mm256_sign_epi8(xv, q));
            acc[t] =
                _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(dw * xq[t].d[b]), acc[t]);
        }
    }
    TILE_END
}
#endif

#ifndef TS_WIDE
static inline __attribute__((always_inline)) void
SFX(tile_q5_0)(const uint8_t *w, const XQ *xq, int64_t nb, int NT, float *out, int64_t os) {
    TILE_BEGIN
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = w + b * 22;
        const float dw = SFX(h2f)(blk);
        __m256i q = _mm256_or_si256(SFX(nibbles32)(blk + 6), SFX(bits32_x10)(blk + 2));
        q = _mm256_sub_epi8(q, _mm256_set1_epi8(16));
        const __m256i aq = _mm256_sign_epi8(q, q);
        for (int t = 0; t < NT; t++) {
            const __m256i xv = _mm256_loadu_si256((const __m256i *)(xq[t].q + b * 32));
            const __m256i p = DOT_US(aq, _mm256_sign_epi8(xv, q));
            acc[t] =
                _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(dw * xq[t].d[b]), acc[t]);
        }
    }
    TILE_END
}
#endif

/* Q4_1 / Q5_1: y = d*q + m, so w.x = d*dx*sum(q*xq) + m*dx*sum(xq); dx*sum(xq) is XQ.s */
#ifndef TS_WIDE
static inline __attribute__((always_inline)) void
SFX(tile_q4_1)(const uint8_t *w, const XQ *xq, int64_t nb, int NT, float *out, int64_t os) {
    TILE_BEGIN
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = w + b * 20;
        const float dw = SFX(h2f)(blk), mw = SFX(h2f)(blk + 2);
        const __m256i q = SFX(nibbles32)(blk + 4);
        for (int t = 0; t < NT; t++) {
            const __m256i xv = _mm256_loadu_si256((const __m256i *)(xq[t].q + b * 32));
            const __m256i p = DOT_US(q, xv);
            acc[t] =
                _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(dw * xq[t].d[b]), acc[t]);
            accm[t] -= mw * xq[t].s[b];
        }
    }
    TILE_END
}
#endif

#ifndef TS_WIDE
static inline __attribute__((always_inline)) void
SFX(tile_q5_1)(const uint8_t *w, const XQ *xq, int64_t nb, int NT, float *out, int64_t os) {
    TILE_BEGIN
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = w + b * 24;
        const float dw = SFX(h2f)(blk), mw = SFX(h2f)(blk + 2);
        const __m256i q = _mm256_or_si256(SFX(nibbles32)(blk + 8), SFX(bits32_x10)(blk + 4));
        for (int t = 0; t < NT; t++) {
            const __m256i xv = _mm256_loadu_si256((const __m256i *)(xq[t].q + b * 32));
            const __m256i p = DOT_US(q, xv);
            acc[t] =
                _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(dw * xq[t].d[b]), acc[t]);
            accm[t] -= mw * xq[t].s[b];
        }
    }
    TILE_END
}
#endif

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

/* One weight row against n_x (<= 8) activation rows: out[t * os] = w . x_t */
#define TILE_DISPATCH(name)                                                                        \
    static void SFX(row_##name)(const uint8_t *w, const XQ *xq, int64_t nb, int n_x, float *out,   \
                                int64_t os) {                                                      \
        switch (n_x) {                                                                             \
        case 8: SFX(tile_##name)(w, xq, nb, 8, out, os); break;                                    \
        case 7: SFX(tile_##name)(w, xq, nb, 7, out, os); break;                                    \
        case 6: SFX(tile_##name)(w, xq, nb, 6, out, os); break;                                    \
        case 5: SFX(tile_##name)(w, xq, nb, 5, out, os); break;                                    \
        case 4: SFX(tile_##name)(w, xq, nb, 4, out, os); break;                                    \
        case 3: SFX(tile_##name)(w, xq, nb, 3, out, os); break;                                    \
        case 2: SFX(tile_##name)(w, xq, nb, 2, out, os); break;                                    \
        default: SFX(tile_##name)(w, xq, nb, 1, out, os); break;                                   \
        }                                                                                          \
    }

TILE_DISPATCH(q8_0)
TILE_DISPATCH(q4_0)
TILE_DISPATCH(q4_1)
TILE_DISPATCH(q5_0)
TILE_DISPATCH(q5_1)
TILE_DISPATCH(q4_k)
TILE_DISPATCH(q5_k)
TILE_DISPATCH(q6_k)
#undef TILE_DISPATCH

static row_fn SFX(row_fn_for)(int qtype) {
    switch (qtype) {
    case TS_Q8_0: return SFX(row_q8_0);
    case TS_Q4_0: return SFX(row_q4_0);
    case TS_Q4_1: return SFX(row_q4_1);
    case TS_Q5_0: return SFX(row_q5_0);
    case TS_Q5_1: return SFX(row_q5_1);
    case TS_Q4_K: return SFX(row_q4_k);
    case TS_Q5_K: return SFX(row_q5_k);
    case TS_Q6_K: return SFX(row_q6_k);
    default: return 0;
    }
}

/* ---- activations: x row -> int8 32-blocks (round to nearest even, like the scalar twin) --- */

static void SFX(quantize_row)(const float *x, int64_t k, int qk, int8_t *q, float *d, float *s,
                              int16_t *bs) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int64_t b = 0; b < k / qk; b++) {
        const float *xb = x + b * qk;
        __m256 amax = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
        for (int i = 0; i < qk; i += 8) {
            const __m256 a = _mm256_andnot_ps(sign, _mm256_loadu_ps(xb + i));
            amax = _mm256_max_ps(amax, a);
            bad = _mm256_or_ps(bad, _mm256_cmp_ps(a, _mm256_set1_ps(FLT_MAX), _CMP_NLE_UQ));
        }
        __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
        m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        m = _mm_max_ss(m, _mm_movehdup_ps(m));
        const int nonfinite = _mm256_movemask_ps(bad) != 0; /* nan/inf: scale nan, as scalar */
        const float db = nonfinite ? NAN : _mm_cvtss_f32(m) / 127.0f;
        const __m256 id = _mm256_set1_ps(nonfinite || db == 0.0f ? 0.0f : 1.0f / db);
        d[b] = db;
        for (int g = 0; g < qk / 32; g++) {
            const float *xg = xb + 32 * g;
            __m256i i32[4];
            for (int i = 0; i < 4; i++)
                i32[i] = _mm256_cvtps_epi32(
                    _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(xg + 8 * i), id),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
            const __m256i sum32 = _mm256_add_epi32(_mm256_add_epi32(i32[0], i32[1]),
                                                   _mm256_add_epi32(i32[2], i32[3]));
            __m128i s4 =
                _mm_add_epi32(_mm256_castsi256_si128(sum32), _mm256_extracti128_si256(sum32, 1));
            s4 = _mm_hadd_epi32(s4, s4);
            s4 = _mm_hadd_epi32(s4, s4);
            /* pack 4 x 8 int32 -> 32 int8 (packs interleave 128-bit lanes: permute back) */
            const __m256i p16a = _mm256_packs_epi32(i32[0], i32[1]);
            const __m256i p16b = _mm256_packs_epi32(i32[2], i32[3]);
            __m256i p8 = _mm256_packs_epi16(p16a, p16b);
            p8 = _mm256_permutevar8x32_epi32(p8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm256_storeu_si256((__m256i *)(q + b * qk + 32 * g), p8);
            const int sum = _mm_cvtsi128_si32(s4);
            bs[b * (qk / 32) + g] = (int16_t)sum;
            s[b * (qk / 32) + g] = db * (float)sum;
        }
    }
}

/* ---- bf16 weights: float FMA against bf16 bits widened to f32 --------------------------- */

static inline __attribute__((always_inline)) void SFX(tile_bf16)(const uint16_t *w, const float *x,
                                                                 int64_t xs, int64_t k, int NT,
                                                                 float *out, int64_t os) {
    __m256 acc[8];
    for (int t = 0; t < NT; t++) acc[t] = _mm256_setzero_ps();
    int64_t i = 0;
#ifdef TS_WIDE
    __m512 acc16[8];
    for (int t = 0; t < NT; t++) acc16[t] = _mm512_setzero_ps();
    for (; i + 16 <= k; i += 16) {
        const __m256i raw = _mm256_loadu_si256((const __m256i *)(w + i));
        const __m512 wv = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
        for (int t = 0; t < NT; t++)
            acc16[t] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + t * xs + i), acc16[t]);
    }
    for (int t = 0; t < NT; t++)
        acc[t] =
            _mm256_add_ps(_mm512_castps512_ps256(acc16[t]),
                          _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc16[t]), 1)));
#endif
    for (; i + 8 <= k; i += 8) {
        const __m128i raw = _mm_loadu_si128((const __m128i *)(w + i));
        const __m256 wv = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
        for (int t = 0; t < NT; t++)
            acc[t] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + t * xs + i), acc[t]);
    }
    for (int t = 0; t < NT; t++) {
        float r = SFX(hsum)(acc[t]);
        for (int64_t j = i; j < k; j++) r += ts_bf16_to_f32(w[j]) * x[t * xs + j];
        out[t * os] = r;
    }
}

static void SFX(row_bf16)(const uint16_t *w, const float *x, int64_t xs, int64_t k, int n_x,
                          float *out, int64_t os) {
    switch (n_x) {
    case 8: SFX(tile_bf16)(w, x, xs, k, 8, out, os); break;
    case 7: SFX(tile_bf16)(w, x, xs, k, 7, out, os); break;
    case 6: SFX(tile_bf16)(w, x, xs, k, 6, out, os); break;
    case 5: SFX(tile_bf16)(w, x, xs, k, 5, out, os); break;
    case 4: SFX(tile_bf16)(w, x, xs, k, 4, out, os); break;
    case 3: SFX(tile_bf16)(w, x, xs, k, 3, out, os); break;
    case 2: SFX(tile_bf16)(w, x, xs, k, 2, out, os); break;
    default: SFX(tile_bf16)(w, x, xs, k, 1, out, os); break;
    }
}

#undef TILE_BEGIN
#undef TILE_END
#undef DOT_SS
