/* The SIMD twins of quant_packed_k.h's group kernel, included by quant_packed_simd.h inside each
 * of its ISA inclusions (PSFX, SFXP, PACKED_VNNI and bcast4 from there). A sub-block's dot per row
 * is summed exactly, then scaled in integers: VNNI accumulates int32 with dpbusd and multiplies by
 * the int32 scales (mullo); AVX2 sums maddubs' int16 pairs (as many words as stay below 2^15:
 * 8 of 4-bit values, 4 of 5- or 6-bit ones, |x| <= 127) and widens them with madd against the
 * scale duplicated into both halves of each lane. No include guard on purpose. */

#if PACKED_VNNI
typedef __m256i PSFX(ksum);  /* a sub-block's per-row dots: 8 x int32 */
#define K_DOT(s, u, x) _mm256_dpbusd_epi32((s), (u), (x))
#define K_SCALE(isum, s, sc32) _mm256_add_epi32((isum), _mm256_mullo_epi32((s), (sc32)))
#else
typedef __m256i PSFX(ksum); /* a sub-block's per-row dots: 16 x int16 pair sums */
#define K_DOT(s, u, x) _mm256_add_epi16((s), _mm256_maddubs_epi16((u), (x)))
/* lane r of sc32 into both int16 halves of lane r: madd then gives sc * (pair 0 + pair 1) */
#define K_SCALE(isum, s, sc32)                                                                     \
    _mm256_add_epi32((isum), _mm256_madd_epi16((s), _mm256_blend_epi16((sc32),                  \
                                                   _mm256_slli_epi32((sc32), 16), 0xAA)))
#endif

/* scales of sub-block s of the 8 rows as int32 lanes: u8 (Q4_K/Q5_K) or int8 (Q6_K) */
static inline __m256i PSFX(k_scales_u8)(const uint8_t *p) {
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
}
static inline __m256i PSFX(k_scales_i8)(const uint8_t *p) {
    return _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p));
}

/* Q4_K / Q5_K: NT (<= PK_NT) activation rows against one group. One sub-block at a time (its
 * low or high nibbles: a word is loaded twice), so only NT sums are live beside the totals. */
static inline __attribute__((always_inline)) void
PSFX(group_tile_k45)(const uint8_t *g, const XQ *xq, int64_t nb, int NT, float *out, int64_t os,
                     int five) {
    const int rec = five ? TS_PK_REC_Q5_K : TS_PK_REC_Q4_K;
    /* AVX2's int16 sums hold 8 words of 4-bit values, 4 of 5-bit ones */
    const int flush = PACKED_VNNI ? 8 : five ? 4 : 8;
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    __m256 acc[PK_NT];
    for (int t = 0; t < NT; t++) acc[t] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *p = g + b * rec;
        __m256i isum[PK_NT];
        for (int t = 0; t < NT; t++) isum[t] = _mm256_setzero_si256();
        for (int sb = 0; sb < 8; sb++) { /* sub-block sb: word 8j + i's low (high) nibbles */
            const int j = sb / 2, high = sb % 2;
            const __m256i sc = PSFX(k_scales_u8)(p + TS_PK45_SC + 8 * sb);
            for (int i0 = 0; i0 < 8; i0 += flush) {
                PSFX(ksum) sum[PK_NT];
                for (int t = 0; t < NT; t++) sum[t] = _mm256_setzero_si256();
                for (int i = i0; i < i0 + flush; i++) {
                    const int w = 8 * j + i;
                    const __m256i raw =
                        _mm256_loadu_si256((const __m256i *)(p + TS_PK45_Q + 32 * w));
                    __m256i v = _mm256_and_si256(high ? _mm256_srli_epi16(raw, 4) : raw, m4);
                    if (five) {
                        const __m256i plane =
                            _mm256_loadu_si256((const __m256i *)(p + TS_PK5_H + 32 * (w / 4)));
                        v = _mm256_or_si256(v, PSFX(plane_bit)(plane, 2 * (w % 4) + high));
                    }
                    for (int t = 0; t < NT; t++) {
                        const int8_t *x = xq[t].q + b * 256 + 32 * sb + 4 * i;
                        sum[t] = K_DOT(sum[t], v, PSFX(bcast4)(x));
                    }
                }
                for (int t = 0; t < NT; t++) isum[t] = K_SCALE(isum[t], sum[t], sc);
            }
        }
        const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + TS_PK_D)));
        const __m256 mw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + TS_PK_DMIN)));
        for (int t = 0; t < NT; t++) {
            /* mins: lane r = sum over pairs q of min(2q) * bs(2q) + min(2q + 1) * bs(2q + 1) */
            __m256i imin = _mm256_setzero_si256();
            for (int q = 0; q < 4; q++) {
                const __m256i mn = _mm256_cvtepu8_epi16(
                    _mm_loadu_si128((const __m128i *)(p + TS_PK45_MN + 16 * q)));
                int32_t pair;
                memcpy(&pair, xq[t].bs + b * 8 + 2 * q, 4);
                imin = _mm256_add_epi32(imin, _mm256_madd_epi16(mn, _mm256_set1_epi32(pair)));
            }
            const __m256 dx = _mm256_set1_ps(xq[t].d[b]);
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[t]), _mm256_mul_ps(dw, dx), acc[t]);
            acc[t] = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(imin), _mm256_mul_ps(mw, dx), acc[t]);
        }
    }
    for (int t = 0; t < NT; t++) _mm256_storeu_ps(out + t * os, acc[t]);
}

/* Q6_K: the stored 6-bit values q (0..63, unsigned as dpbusd / maddubs take them) meet x, and
 * the offset comes off per sub-block as 32 * scale * sum(x) (XQ.b16), exact in integers:
 * sum sc (q - 32) x = sum sc q x - 32 sum sc b16. The top 2 bits of a value sit at bits 2a, 2a + 1
 * (low nibbles) and 2a + 4, 2a + 5 (high nibbles) of its qh byte: one shift and a 0x30 mask each
 * put them above the nibble. Both nibbles of a word at once (two sub-blocks' sums live): the
 * word and its top bits are loaded once, which decode (one activation row) needs most. */
static inline __attribute__((always_inline)) void
PSFX(group_tile_q6_k)(const uint8_t *g, const XQ *xq, int64_t nb, int NT, float *out,
                      int64_t os) {
    /* AVX2's int16 sums hold 2 words of 6-bit values, VNNI's int32 ones the sub-block's 4 */
    const int flush = PACKED_VNNI ? 4 : 2;
    const __m256i m4 = _mm256_set1_epi8(0x0F), m30 = _mm256_set1_epi8(0x30);
    __m256 acc[PK_NT];
    for (int t = 0; t < NT; t++) acc[t] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *p = g + b * TS_PK_REC_Q6_K;
        __m256i isum[PK_NT];
        for (int t = 0; t < NT; t++) isum[t] = _mm256_setzero_si256();
        for (int h = 0; h < 2; h++)
            for (int a = 0; a < 2; a++) {
                /* scales of sub-blocks 8h + 2a + e (low nibbles) and 8h + 2a + 4 + e (high) */
                const __m256i pl = _mm256_cvtepi8_epi16(
                    _mm_loadu_si128((const __m128i *)(p + TS_PK6_SC + 16 * (4 * h + a))));
                const __m256i ph = _mm256_cvtepi8_epi16(
                    _mm_loadu_si128((const __m128i *)(p + TS_PK6_SC + 16 * (4 * h + a + 2))));
                for (int half = 0; half < 2; half++) {
                    /* lane r's scale of this half's sub-block, as int32 */
                    const __m256i sc_lo = half ? _mm256_srai_epi32(pl, 16)
                                               : _mm256_srai_epi32(_mm256_slli_epi32(pl, 16), 16);
                    const __m256i sc_hi = half ? _mm256_srai_epi32(ph, 16)
                                               : _mm256_srai_epi32(_mm256_slli_epi32(ph, 16), 16);
                    for (int i0 = 4 * half; i0 < 4 * half + 4; i0 += flush) {
                        PSFX(ksum) s_lo[PK_NT], s_hi[PK_NT];
                        for (int t = 0; t < NT; t++) s_lo[t] = s_hi[t] = _mm256_setzero_si256();
                        for (int i = i0; i < i0 + flush; i++) {
                            const int w = 16 * h + 8 * a + i;
                            const __m256i raw =
                                _mm256_loadu_si256((const __m256i *)(p + TS_PK6_QL + 32 * w));
                            const __m256i qh = _mm256_loadu_si256(
                                (const __m256i *)(p + TS_PK6_QH + 32 * (8 * h + i)));
                            const __m256i lo = _mm256_or_si256(
                                _mm256_and_si256(raw, m4),
                                _mm256_and_si256(_mm256_slli_epi16(qh, 4 - 2 * a), m30));
                            const __m256i hi = _mm256_or_si256(
                                _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4),
                                _mm256_and_si256(_mm256_srli_epi16(qh, 2 * a), m30));
                            for (int t = 0; t < NT; t++) {
                                const int8_t *x = xq[t].q + b * 256 + 128 * h + 32 * a + 4 * i;
                                s_lo[t] = K_DOT(s_lo[t], lo, PSFX(bcast4)(x));
                                s_hi[t] = K_DOT(s_hi[t], hi, PSFX(bcast4)(x + 64));
                            }
                        }
                        for (int t = 0; t < NT; t++) {
                            isum[t] = K_SCALE(isum[t], s_lo[t], sc_lo);
                            isum[t] = K_SCALE(isum[t], s_hi[t], sc_hi);
                        }
                    }
                }
            }
        const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + TS_PK_D)));
        for (int t = 0; t < NT; t++) {
            /* the offsets: lane r = sum over pairs q of sc(2q) b16(2q) + sc(2q + 1) b16(2q + 1) */
            __m256i off = _mm256_setzero_si256();
            for (int q = 0; q < 8; q++) {
                const __m256i sc = _mm256_cvtepi8_epi16(
                    _mm_loadu_si128((const __m128i *)(p + TS_PK6_SC + 16 * q)));
                int32_t pair;
                memcpy(&pair, xq[t].b16 + b * 16 + 2 * q, 4);
                off = _mm256_add_epi32(off, _mm256_madd_epi16(sc, _mm256_set1_epi32(pair)));
            }
            const __m256i exact = _mm256_sub_epi32(isum[t], _mm256_slli_epi32(off, 5));
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(exact),
                                     _mm256_mul_ps(dw, _mm256_set1_ps(xq[t].d[b])), acc[t]);
        }
    }
    for (int t = 0; t < NT; t++) _mm256_storeu_ps(out + t * os, acc[t]);
}

static inline __attribute__((always_inline)) void
PSFX(group_tile_q4_k)(const uint8_t *g, const XQ *xq, int64_t nb, int NT, float *out, int64_t os) {
    PSFX(group_tile_k45)(g, xq, nb, NT, out, os, 0);
}
static inline __attribute__((always_inline)) void
PSFX(group_tile_q5_k)(const uint8_t *g, const XQ *xq, int64_t nb, int NT, float *out, int64_t os) {
    PSFX(group_tile_k45)(g, xq, nb, NT, out, os, 1);
}

#define TS_GROUP_SIMD_K(name)                                                                      \
    static void PSFX(group_##name)(const uint8_t *g, const XQ *xq, int64_t nb, int n_x,          \
                                     float *out, int64_t os) {                                     \
        PK_TILES(PSFX(group_tile_##name), )                                                        \
    }
TS_GROUP_SIMD_K(q4_k)
TS_GROUP_SIMD_K(q5_k)
TS_GROUP_SIMD_K(q6_k)
#undef TS_GROUP_SIMD_K
#undef K_DOT
#undef K_SCALE
