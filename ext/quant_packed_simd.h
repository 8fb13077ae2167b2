/* The SIMD twins of quant_packed.h's group kernel, included twice by it: AVX2 (maddubs, int16
 * sums widened by madd) and AVX-512 VNNI (dpbusd on 256-bit registers, int32 sums throughout).
 * The integer sums are exact either way and the float steps the same: both give the same bits.
 * Before each inclusion: PSFX(name) (the ISA suffix), SFXP(name) (quant_simd.h's helpers of the
 * same ISA), PACKED_VNNI (0 or 1) and a `#pragma GCC target`. No include guard on purpose. */

/* activation rows per tile: VNNI's 32 registers hold 8 rows' sums, AVX2's 16 hold 4 */
#define PK_NT (PACKED_VNNI ? 8 : 4)

static inline __m256i PSFX(bcast4)(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}

/* bit k (0..7) of each byte of a bit plane moved to bit 4 (0x10: a 5th bit over a nibble).
 * A constant k (the unrolled loops): one immediate shift, by at most 4, moves no bit of
 * interest across a byte. Otherwise, no branch: a 16-bit shift right by k leaves each byte's
 * bit k at its bit 0 (what crosses over from the byte above lands higher and is masked off). */
static inline __attribute__((always_inline)) __m256i PSFX(plane_bit)(__m256i plane, int k) {
    if (__builtin_constant_p(k)) {
        const __m256i at = k < 4 ? _mm256_slli_epi16(plane, 4 - k)
                                 : k > 4 ? _mm256_srli_epi16(plane, k - 4) : plane;
        return _mm256_and_si256(at, _mm256_set1_epi8(0x10));
    }
    const __m256i bit0 = _mm256_and_si256(_mm256_srl_epi16(plane, _mm_cvtsi32_si128(k)),
                                          _mm256_set1_epi8(1));
    return _mm256_slli_epi16(bit0, 4);
}

/* NT (<= PK_NT) activation rows against one group: the block's weights are decoded once into
 * registers and met by every row's activations */
static inline __attribute__((always_inline)) void
PSFX(group_tile)(const uint8_t *g, const XQ *xq, int64_t nb, int NT, float *out, int64_t os,
                   int qtype) {
    const int rec = ts_packed_rec(qtype), has_min = ts_has_min(qtype), q8 = qtype == TS_Q8_0;
    const int five = ts_five(qtype), qoff = ts_packed_qoff(qtype), hoff = ts_packed_hoff(qtype);
    const __m256i m4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    (void)ones;
    __m256 acc[PK_NT];
    for (int t = 0; t < NT; t++) acc[t] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *p = g + b * rec, *q = p + qoff;
        __m256i s[PK_NT];
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
            __m256i s16[PK_NT];
            for (int t = 0; t < NT; t++) s16[t] = _mm256_setzero_si256();
#endif
            for (int t = 0; t < NT; t++) s[t] = _mm256_setzero_si256();
            const __m256i plane =
                five ? _mm256_loadu_si256((const __m256i *)(p + hoff)) : _mm256_setzero_si256();
            for (int i = 0; i < 4; i++) {
                const __m256i raw = _mm256_loadu_si256((const __m256i *)(q + 32 * i));
                __m256i lo = _mm256_and_si256(raw, m4);
                __m256i hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
                if (five) {
                    lo = _mm256_or_si256(lo, PSFX(plane_bit)(plane, 2 * i));
                    hi = _mm256_or_si256(hi, PSFX(plane_bit)(plane, 2 * i + 1));
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

/* n_x activation rows in tiles of PK_NT, each tile's NT a constant of its own instance */
#if PACKED_VNNI
#define PK_WIDE_CASES(tile, ...)                                                                   \
    case 8: tile(g, x, nb, 8, o, os __VA_ARGS__); break;                                           \
    case 7: tile(g, x, nb, 7, o, os __VA_ARGS__); break;                                           \
    case 6: tile(g, x, nb, 6, o, os __VA_ARGS__); break;                                           \
    case 5: tile(g, x, nb, 5, o, os __VA_ARGS__); break;
#else
#define PK_WIDE_CASES(tile, ...)
#endif
#define PK_TILES(tile, ...)                                                                        \
    for (int t0 = 0; t0 < n_x; t0 += PK_NT) {                                                      \
        const int nt = n_x - t0 < PK_NT ? n_x - t0 : PK_NT;                                        \
        const XQ *x = xq + t0;                                                                     \
        float *o = out + t0 * os;                                                                  \
        switch (nt) {                                                                              \
            PK_WIDE_CASES(tile, __VA_ARGS__)                                                       \
        case 4: tile(g, x, nb, 4, o, os __VA_ARGS__); break;                                       \
        case 3: tile(g, x, nb, 3, o, os __VA_ARGS__); break;                                       \
        case 2: tile(g, x, nb, 2, o, os __VA_ARGS__); break;                                       \
        default: tile(g, x, nb, 1, o, os __VA_ARGS__); break;                                      \
        }                                                                                          \
    }

#define TS_GROUP_SIMD(name, qt)                                                                    \
    static void PSFX(group_##name)(const uint8_t *g, const XQ *xq, int64_t nb, int n_x,          \
                                     float *out, int64_t os) {                                     \
        PK_TILES(PSFX(group_tile), , qt)                                                           \
    }
TS_GROUP_SIMD(q4_0, TS_Q4_0)
TS_GROUP_SIMD(q4_1, TS_Q4_1)
TS_GROUP_SIMD(q5_0, TS_Q5_0)
TS_GROUP_SIMD(q5_1, TS_Q5_1)
TS_GROUP_SIMD(q8_0, TS_Q8_0)
#undef TS_GROUP_SIMD


#include "quant_packed_k_simd.h" /* Q4_K, Q5_K, Q6_K */
#undef PK_TILES
#undef PK_WIDE_CASES
#undef PK_NT
