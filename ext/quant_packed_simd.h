/* The SIMD twins of quant_packed.h's group kernel, included three times by it: AVX2 (maddubs,
 * int16 sums widened by madd), AVX-512 VNNI on 256-bit registers (dpbusd, int32 sums throughout:
 * one group of 8 rows per vector) and VNNI on 512-bit registers (two groups side by side: rows
 * 0-7 of group g in the low half, of group g + 1 in the high half, so one dpbusd meets 4 values
 * of 16 rows; where the core executes 512-bit integer ops at full width that is twice the
 * multiply-adds per instruction). The integer sums are exact either way and each output's float
 * steps the same: all three give the same bits. Before each inclusion: PSFX(name) (the ISA
 * suffix), PACKED_VNNI (0 or 1), PACKED_W512 (0 or 1: the two-group tiles), DOT_ACC and a
 * `#pragma GCC target`. No include guard on purpose.
 *
 * The tiles are written once over a small vocabulary of vector operations, VI / VF (integer and
 * float vectors of one or two groups) and V_* (their operations), as ggml writes its kernels
 * over GGML_F32_VEC; the loads take a group's bytes at p and, two groups wide, the next group's
 * at p + gs. */

#if PACKED_W512
#define VI __m512i
#define VF __m512
#define V_ZERO() _mm512_setzero_si512()
#define V_FZERO() _mm512_setzero_ps()
#define V_AND(a, b) _mm512_and_si512((a), (b))
#define V_OR(a, b) _mm512_or_si512((a), (b))
#define V_ADD32(a, b) _mm512_add_epi32((a), (b))
#define V_SUB32(a, b) _mm512_sub_epi32((a), (b))
#define V_MULLO32(a, b) _mm512_mullo_epi32((a), (b))
#define V_MADD16(a, b) _mm512_madd_epi16((a), (b))
#define V_SLLI16(a, n) _mm512_slli_epi16((a), (n))
#define V_SRLI16(a, n) _mm512_srli_epi16((a), (n))
#define V_SRL16(a, c) _mm512_srl_epi16((a), (c))
#define V_SLLI32(a, n) _mm512_slli_epi32((a), (n))
#define V_SRAI32(a, n) _mm512_srai_epi32((a), (n))
#define V_SET1_8(v) _mm512_set1_epi8((char)(v))
#define V_SET1_32(v) _mm512_set1_epi32(v)
/* |w|, and x with w's sign (x where w == 0: its product with |w| = 0 is 0 either way) */
#define V_ABS8(w) _mm512_abs_epi8(w)
#define V_SIGN8(x, w) _mm512_mask_sub_epi8((x), _mm512_movepi8_mask(w), _mm512_setzero_si512(), (x))
#define V_CVT(a) _mm512_cvtepi32_ps(a)
#define V_FMUL(a, b) _mm512_mul_ps((a), (b))
#define V_FMA(a, b, c) _mm512_fmadd_ps((a), (b), (c))
#define V_FNMA(a, b, c) _mm512_fnmadd_ps((a), (b), (c))
#define V_SET1F(v) _mm512_set1_ps(v)
#define V_STORE(p, v) _mm512_storeu_ps((p), (v))
#else
#define VI __m256i
#define VF __m256
#define V_ZERO() _mm256_setzero_si256()
#define V_FZERO() _mm256_setzero_ps()
#define V_AND(a, b) _mm256_and_si256((a), (b))
#define V_OR(a, b) _mm256_or_si256((a), (b))
#define V_ADD32(a, b) _mm256_add_epi32((a), (b))
#define V_SUB32(a, b) _mm256_sub_epi32((a), (b))
#define V_MULLO32(a, b) _mm256_mullo_epi32((a), (b))
#define V_MADD16(a, b) _mm256_madd_epi16((a), (b))
#define V_SLLI16(a, n) _mm256_slli_epi16((a), (n))
#define V_SRLI16(a, n) _mm256_srli_epi16((a), (n))
#define V_SRL16(a, c) _mm256_srl_epi16((a), (c))
#define V_SLLI32(a, n) _mm256_slli_epi32((a), (n))
#define V_SRAI32(a, n) _mm256_srai_epi32((a), (n))
#define V_SET1_8(v) _mm256_set1_epi8((char)(v))
#define V_SET1_32(v) _mm256_set1_epi32(v)
#define V_ABS8(w) _mm256_sign_epi8((w), (w))
#define V_SIGN8(x, w) _mm256_sign_epi8((x), (w))
#define V_CVT(a) _mm256_cvtepi32_ps(a)
#define V_FMUL(a, b) _mm256_mul_ps((a), (b))
#define V_FMA(a, b, c) _mm256_fmadd_ps((a), (b), (c))
#define V_FNMA(a, b, c) _mm256_fnmadd_ps((a), (b), (c))
#define V_SET1F(v) _mm256_set1_ps(v)
#define V_STORE(p, v) _mm256_storeu_ps((p), (v))
#endif

/* a group's 32 bytes at p (and the next group's at p + gs) */
static inline VI PSFX(ld)(const uint8_t *p, int64_t gs) {
    const __m256i a = _mm256_loadu_si256((const __m256i *)p);
#if PACKED_W512
    return _mm512_inserti64x4(_mm512_castsi256_si512(a),
                              _mm256_loadu_si256((const __m256i *)(p + gs)), 1);
#else
    (void)gs;
    return a;
#endif
}
/* 8 f16 per group (one per row) as floats */
static inline VF PSFX(ld_f16)(const uint8_t *p, int64_t gs) {
    const __m128i a = _mm_loadu_si128((const __m128i *)p);
#if PACKED_W512
    return _mm512_cvtph_ps(_mm256_inserti128_si256(
        _mm256_castsi128_si256(a), _mm_loadu_si128((const __m128i *)(p + gs)), 1));
#else
    (void)gs;
    return _mm256_cvtph_ps(a);
#endif
}
/* 8 bytes per group (one per row), unsigned, as int32 lanes */
static inline VI PSFX(ld_u8_32)(const uint8_t *p, int64_t gs) {
#if PACKED_W512
    return _mm512_cvtepu8_epi32(_mm_unpacklo_epi64(_mm_loadl_epi64((const __m128i *)p),
                                                   _mm_loadl_epi64((const __m128i *)(p + gs))));
#else
    (void)gs;
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
#endif
}
/* 16 bytes per group (a pair per row) as int16 lanes, zero- (signed = 0) or sign-extended */
static inline __attribute__((always_inline)) VI PSFX(ld_8_16)(const uint8_t *p, int64_t gs,
                                                              int is_signed) {
#if PACKED_W512
    const __m256i h = _mm256_inserti128_si256(
        _mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)p)),
        _mm_loadu_si128((const __m128i *)(p + gs)), 1);
    return is_signed ? _mm512_cvtepi8_epi16(h) : _mm512_cvtepu8_epi16(h);
#else
    (void)gs;
    const __m128i h = _mm_loadu_si128((const __m128i *)p);
    return is_signed ? _mm256_cvtepi8_epi16(h) : _mm256_cvtepu8_epi16(h);
#endif
}

/* activation rows per tile: VNNI's 32 registers hold 8 rows' sums, AVX2's 16 hold 4 */
#define PK_NT (PACKED_VNNI ? 8 : 4)

static inline VI PSFX(bcast4)(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return V_SET1_32(v);
}

/* bit k (0..7) of each byte of a bit plane moved to bit 4 (0x10: a 5th bit over a nibble).
 * A constant k (the unrolled loops): one immediate shift, by at most 4, moves no bit of
 * interest across a byte. Otherwise, no branch: a 16-bit shift right by k leaves each byte's
 * bit k at its bit 0 (what crosses over from the byte above lands higher and is masked off). */
static inline __attribute__((always_inline)) VI PSFX(plane_bit)(VI plane, int k) {
    if (__builtin_constant_p(k)) {
        const VI at = k < 4 ? V_SLLI16(plane, 4 - k) : k > 4 ? V_SRLI16(plane, k - 4) : plane;
        return V_AND(at, V_SET1_8(0x10));
    }
    const VI bit0 = V_AND(V_SRL16(plane, _mm_cvtsi32_si128(k)), V_SET1_8(1));
    return V_SLLI16(bit0, 4);
}

/* NT (<= PK_NT) activation rows against one group (two: PACKED_W512): the block's weights are
 * decoded once into registers and met by every row's activations */
static inline __attribute__((always_inline)) void
PSFX(group_tile)(const uint8_t *g, int64_t gs, const XQ *xq, int64_t nb, int NT, float *out,
                 int64_t os, int qtype) {
    const int rec = ts_packed_rec(qtype), has_min = ts_has_min(qtype), q8 = qtype == TS_Q8_0;
    const int five = ts_five(qtype), qoff = ts_packed_qoff(qtype), hoff = ts_packed_hoff(qtype);
    const VI m4 = V_SET1_8(0x0F);
#if !PACKED_VNNI
    const __m256i ones = _mm256_set1_epi16(1);
#endif
    VF acc[PK_NT];
    for (int t = 0; t < NT; t++) acc[t] = V_FZERO();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *p = g + b * rec, *q = p + qoff;
        VI s[PK_NT];
        if (q8) {
            for (int t = 0; t < NT; t++) s[t] = V_ZERO();
            for (int c = 0; c < 8; c++) {
                const VI w = PSFX(ld)(q + 32 * c, gs), aw = V_ABS8(w);
                for (int t = 0; t < NT; t++)
                    s[t] = DOT_ACC(s[t], aw, V_SIGN8(PSFX(bcast4)(xq[t].q + b * 32 + 4 * c), w));
            }
        } else {
            /* AVX2: 8 maddubs of 4-bit weights (<= 15) and |x| <= 127 stay below 2^15 in int16,
             * 4 of 5-bit ones (<= 31): the int16 sums widen to int32 every 4 (or 2) words */
#if !PACKED_VNNI
            __m256i s16[PK_NT];
            for (int t = 0; t < NT; t++) s16[t] = _mm256_setzero_si256();
#endif
            for (int t = 0; t < NT; t++) s[t] = V_ZERO();
            const VI plane = five ? PSFX(ld)(p + hoff, gs) : V_ZERO();
            for (int i = 0; i < 4; i++) {
                const VI raw = PSFX(ld)(q + 32 * i, gs);
                VI lo = V_AND(raw, m4), hi = V_AND(V_SRLI16(raw, 4), m4);
                if (five) {
                    lo = V_OR(lo, PSFX(plane_bit)(plane, 2 * i));
                    hi = V_OR(hi, PSFX(plane_bit)(plane, 2 * i + 1));
                }
                for (int t = 0; t < NT; t++) {
                    const int8_t *x = xq[t].q + b * 32;
                    const VI xl = PSFX(bcast4)(x + 4 * i), xh = PSFX(bcast4)(x + 16 + 4 * i);
#if PACKED_VNNI
                    s[t] = DOT_ACC(DOT_ACC(s[t], lo, xl), hi, xh);
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
                    s[t] = V_SUB32(s[t], V_SET1_32((five ? 16 : 8) * xq[t].bs[b]));
        }
        const VF dw = PSFX(ld_f16)(p, gs);
        const VF mw = has_min ? PSFX(ld_f16)(p + 16, gs) : V_FZERO();
        for (int t = 0; t < NT; t++) {
            acc[t] = V_FMA(V_CVT(s[t]), V_FMUL(dw, V_SET1F(xq[t].d[b])), acc[t]);
            if (has_min) acc[t] = V_FMA(mw, V_SET1F(xq[t].s[b]), acc[t]);
        }
    }
    for (int t = 0; t < NT; t++) V_STORE(out + t * os, acc[t]);
}

/* n_x activation rows in tiles of PK_NT, each tile's NT a constant of its own instance */
#if PACKED_VNNI
#define PK_WIDE_CASES(tile, ...)                                                                   \
    case 8: tile(g, gs, x, nb, 8, o, os __VA_ARGS__); break;                                       \
    case 7: tile(g, gs, x, nb, 7, o, os __VA_ARGS__); break;                                       \
    case 6: tile(g, gs, x, nb, 6, o, os __VA_ARGS__); break;                                       \
    case 5: tile(g, gs, x, nb, 5, o, os __VA_ARGS__); break;
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
        case 4: tile(g, gs, x, nb, 4, o, os __VA_ARGS__); break;                                   \
        case 3: tile(g, gs, x, nb, 3, o, os __VA_ARGS__); break;                                   \
        case 2: tile(g, gs, x, nb, 2, o, os __VA_ARGS__); break;                                   \
        default: tile(g, gs, x, nb, 1, o, os __VA_ARGS__); break;                                  \
        }                                                                                          \
    }

/* The group kernels: one group (group_fn), or two groups gs bytes apart (group2_fn) */
#if PACKED_W512
#define PK_GROUP_FN(name)                                                                          \
    static void PSFX(group2_##name)(const uint8_t *g, int64_t gs, const XQ *xq, int64_t nb,     \
                                      int n_x, float *out, int64_t os)
#define PK_GS
#else
#define PK_GROUP_FN(name)                                                                          \
    static void PSFX(group_##name)(const uint8_t *g, const XQ *xq, int64_t nb, int n_x,          \
                                     float *out, int64_t os)
#define PK_GS const int64_t gs = 0;
#endif

#define TS_GROUP_SIMD(name, qt)                                                                    \
    PK_GROUP_FN(name) {                                                                            \
        PK_GS                                                                                      \
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
#undef PK_GROUP_FN
#undef PK_GS
#undef VI
#undef VF
#undef V_ZERO
#undef V_FZERO
#undef V_AND
#undef V_OR
#undef V_ADD32
#undef V_SUB32
#undef V_MULLO32
#undef V_MADD16
#undef V_SLLI16
#undef V_SRLI16
#undef V_SRL16
#undef V_SLLI32
#undef V_SRAI32
#undef V_SET1_8
#undef V_SET1_32
#undef V_ABS8
#undef V_SIGN8
#undef V_CVT
#undef V_FMUL
#undef V_FMA
#undef V_FNMA
#undef V_SET1F
#undef V_STORE
