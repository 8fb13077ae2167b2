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
#include "quant_simd_wide.h" /* 512-bit Q8_0 / Q4_0 / Q4_1 / Q5_0 / Q5_1 */
#endif

/* ---- 32-value block types ---------------------------------------------------------------- */

#ifndef TS_WIDE
/* One 32-block type per qtype (a constant at every call below: the branches fold away).
 * Q8_0 / Q4_0 / Q5_0 hold signed q with y = d*q: |q| (u8) meets x with q's sign.
 * Q4_1 / Q5_1 hold unsigned q with y = d*q + m, so w.x = d*dx*sum(q*xq) + m*dx*sum(xq), and
 * dx*sum(xq) is XQ.s. */
static inline __attribute__((always_inline)) void
SFX(tile_32)(const uint8_t *w, const XQ *xq, int64_t nb, int NT, float *out, int64_t os,
             int qtype) {
    const int ts = ts_type_size(qtype);
    const int has_min = qtype == TS_Q4_1 || qtype == TS_Q5_1;
    /* even and odd blocks go to separate accumulators: one FMA chain would wait out its latency
     * at every block (a row of small blocks is a few cycles of work each). The split depends
     * only on the block index, so a row's sum is the same whatever the tile size. */
    __m256 acc[2][8];
    float accm[2][8];
    for (int t = 0; t < NT; t++) {
        acc[0][t] = acc[1][t] = _mm256_setzero_ps();
        accm[0][t] = accm[1][t] = 0.0f;
    }
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = w + b * ts;
        const int e = (int)(b & 1);
        const float dw = SFX(h2f)(blk), mw = has_min ? SFX(h2f)(blk + 2) : 0.0f;
        __m256i q;
        switch (qtype) {
        case TS_Q8_0: q = _mm256_loadu_si256((const __m256i *)(blk + 2)); break;
        case TS_Q4_0: q = _mm256_sub_epi8(SFX(nibbles32)(blk + 2), _mm256_set1_epi8(8)); break;
        case TS_Q5_0:
            q = _mm256_or_si256(SFX(nibbles32)(blk + 6), SFX(bits32_x10)(blk + 2));
            q = _mm256_sub_epi8(q, _mm256_set1_epi8(16));
            break;
        case TS_Q4_1: q = SFX(nibbles32)(blk + 4); break;
        default: q = _mm256_or_si256(SFX(nibbles32)(blk + 8), SFX(bits32_x10)(blk + 4)); /* Q5_1 */
        }
        const __m256i aq = has_min ? q : _mm256_sign_epi8(q, q);
        for (int t = 0; t < NT; t++) {
            const __m256i xv = _mm256_loadu_si256((const __m256i *)(xq[t].q + b * 32));
            const __m256i p = DOT_US(aq, has_min ? xv : _mm256_sign_epi8(xv, q));
            acc[e][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(dw * xq[t].d[b]),
                                        acc[e][t]);
            if (has_min) accm[e][t] -= mw * xq[t].s[b];
        }
    }
    for (int t = 0; t < NT; t++)
        out[t * os] = SFX(hsum)(_mm256_add_ps(acc[0][t], acc[1][t])) - (accm[0][t] + accm[1][t]);
}

#define TILE_32(name, qt)                                                                          \
    static inline __attribute__((always_inline)) void SFX(tile_##name)(                            \
        const uint8_t *w, const XQ *xq, int64_t nb, int NT, float *out, int64_t os) {              \
        SFX(tile_32)(w, xq, nb, NT, out, os, qt);                                                  \
    }
TILE_32(q8_0, TS_Q8_0)
TILE_32(q4_0, TS_Q4_0)
TILE_32(q5_0, TS_Q5_0)
TILE_32(q4_1, TS_Q4_1)
TILE_32(q5_1, TS_Q5_1)
#undef TILE_32
#endif

#include "quant_simd_k.h" /* Q4_K, Q5_K, Q6_K */

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
                              int16_t *bs, int16_t *b16) {
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
            if (qk == 256) { /* values 0..15 are i32[0] and i32[1] */
                const __m256i s01 = _mm256_add_epi32(i32[0], i32[1]);
                __m128i h = _mm_add_epi32(_mm256_castsi256_si128(s01),
                                          _mm256_extracti128_si256(s01, 1));
                h = _mm_hadd_epi32(h, h);
                h = _mm_hadd_epi32(h, h);
                const int first16 = _mm_cvtsi128_si32(h);
                b16[2 * (b * 8 + g)] = (int16_t)first16;
                b16[2 * (b * 8 + g) + 1] = (int16_t)(sum - first16);
            }
            s[b * (qk / 32) + g] = db * (float)sum;
        }
    }
}

/* ---- float weights: bf16 bits widened to f32, or float32 as stored; float FMA ------------ */

static inline __m256 SFX(load8w)(const void *w, int64_t i, int f32) {
    if (f32) return _mm256_loadu_ps((const float *)w + i);
    const __m128i raw = _mm_loadu_si128((const __m128i *)((const uint16_t *)w + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

/* one weight row (bf16 or f32: a constant at each call) . NT activation rows; each output summed
   in one fixed order (lanes, then the tail), whatever NT */
static inline __attribute__((always_inline)) void SFX(tile_wf)(const void *w, int f32,
                                                               const float *x, int64_t xs,
                                                               int64_t k, int NT, float *out,
                                                               int64_t os) {
    __m256 acc[8];
    for (int t = 0; t < NT; t++) acc[t] = _mm256_setzero_ps();
    int64_t i = 0;
#ifdef TS_WIDE
    __m512 acc16[8];
    for (int t = 0; t < NT; t++) acc16[t] = _mm512_setzero_ps();
    for (; i + 16 <= k; i += 16) {
        __m512 wv;
        if (f32) {
            wv = _mm512_loadu_ps((const float *)w + i);
        } else {
            const __m256i raw = _mm256_loadu_si256((const __m256i *)((const uint16_t *)w + i));
            wv = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
        }
        for (int t = 0; t < NT; t++)
            acc16[t] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + t * xs + i), acc16[t]);
    }
    for (int t = 0; t < NT; t++)
        acc[t] =
            _mm256_add_ps(_mm512_castps512_ps256(acc16[t]),
                          _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc16[t]), 1)));
#endif
    for (; i + 8 <= k; i += 8) {
        const __m256 wv = SFX(load8w)(w, i, f32);
        for (int t = 0; t < NT; t++)
            acc[t] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + t * xs + i), acc[t]);
    }
    for (int t = 0; t < NT; t++) {
        float r = SFX(hsum)(acc[t]);
        for (int64_t j = i; j < k; j++)
            r += (f32 ? ((const float *)w)[j] : ts_bf16_to_f32(((const uint16_t *)w)[j])) *
                 x[t * xs + j];
        out[t * os] = r;
    }
}

#define TILE_WF_DISPATCH(name, f32)                                                                \
    static void SFX(row_##name)(const void *w, const void *xv, int64_t xs, int64_t k, int n_x,     \
                                float *out, int64_t os) {                                          \
        const float *x = (const float *)xv;                                                        \
        switch (n_x) {                                                                             \
        case 8: SFX(tile_wf)(w, f32, x, xs, k, 8, out, os); break;                                 \
        case 7: SFX(tile_wf)(w, f32, x, xs, k, 7, out, os); break;                                 \
        case 6: SFX(tile_wf)(w, f32, x, xs, k, 6, out, os); break;                                 \
        case 5: SFX(tile_wf)(w, f32, x, xs, k, 5, out, os); break;                                 \
        case 4: SFX(tile_wf)(w, f32, x, xs, k, 4, out, os); break;                                 \
        case 3: SFX(tile_wf)(w, f32, x, xs, k, 3, out, os); break;                                 \
        case 2: SFX(tile_wf)(w, f32, x, xs, k, 2, out, os); break;                                 \
        default: SFX(tile_wf)(w, f32, x, xs, k, 1, out, os); break;                                \
        }                                                                                          \
    }
TILE_WF_DISPATCH(bf16, 0)
TILE_WF_DISPATCH(f32, 1)
#undef TILE_WF_DISPATCH

#undef TILE_BEGIN
#undef TILE_END
#undef DOT_SS
