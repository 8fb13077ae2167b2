/* The SIMD twins of quant_packed_k.h's group kernel, included by quant_packed_simd.h inside each
 * of its ISA inclusions (PSFX, PACKED_VNNI, PACKED_W512, the V_* vocabulary and the loads from there). A sub-block's dot per row
 * is summed exactly, then scaled in integers: VNNI accumulates int32 with dpbusd and multiplies by
 * the int32 scales (mullo); AVX2 sums maddubs' int16 pairs (as many words as stay below 2^15:
 * 8 of 4-bit values, 4 of 5- or 6-bit ones, |x| <= 127) and widens them with madd against the
 * scale duplicated into both halves of each lane. No include guard on purpose. */

#if PACKED_VNNI
#define K_DOT(s, u, x) DOT_ACC((s), (u), (x))
#define K_SCALE(isum, s, sc32) V_ADD32((isum), V_MULLO32((s), (sc32)))
#else
#define K_DOT(s, u, x) _mm256_add_epi16((s), _mm256_maddubs_epi16((u), (x)))
/* lane r of sc32 into both int16 halves of lane r: madd then gives sc * (pair 0 + pair 1) */
#define K_SCALE(isum, s, sc32)                                                                     \
    _mm256_add_epi32((isum), _mm256_madd_epi16((s), _mm256_blend_epi16((sc32),                  \
                                                   _mm256_slli_epi32((sc32), 16), 0xAA)))
#endif

/* Q4_K / Q5_K: NT (<= PK_NT) activation rows against one group. One sub-block at a time (its
 * low or high nibbles: a word is loaded twice), so only NT sums are live beside the totals. */
static inline __attribute__((always_inline)) void
PSFX(group_tile_k45)(const uint8_t *g, int64_t gs, const XQ *xq, int64_t nb, int NT, float *out,
                     int64_t os, int five) {
    const int rec = five ? TS_PK_REC_Q5_K : TS_PK_REC_Q4_K;
    /* AVX2's int16 sums hold 8 words of 4-bit values, 4 of 5-bit ones */
    const int flush = PACKED_VNNI ? 8 : five ? 4 : 8;
    const VI m4 = V_SET1_8(0x0F);
    VF acc[PK_NT];
    for (int t = 0; t < NT; t++) acc[t] = V_FZERO();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *p = g + b * rec;
        VI isum[PK_NT];
        for (int t = 0; t < NT; t++) isum[t] = V_ZERO();
        for (int sb = 0; sb < 8; sb++) { /* sub-block sb: word 8j + i's low (high) nibbles */
            const int j = sb / 2, high = sb % 2;
            const VI sc = PSFX(ld_u8_32)(p + TS_PK45_SC + 8 * sb, gs);
            for (int i0 = 0; i0 < 8; i0 += flush) {
                VI sum[PK_NT];
                for (int t = 0; t < NT; t++) sum[t] = V_ZERO();
                for (int i = i0; i < i0 + flush; i++) {
                    const int w = 8 * j + i;
                    const VI raw = PSFX(ld)(p + TS_PK45_Q + 32 * w, gs);
                    VI v = V_AND(high ? V_SRLI16(raw, 4) : raw, m4);
                    if (five) {
                        const VI plane = PSFX(ld)(p + TS_PK5_H + 32 * (w / 4), gs);
                        v = V_OR(v, PSFX(plane_bit)(plane, 2 * (w % 4) + high));
                    }
                    for (int t = 0; t < NT; t++) {
                        const int8_t *x = xq[t].q + b * 256 + 32 * sb + 4 * i;
                        sum[t] = K_DOT(sum[t], v, PSFX(bcast4)(x));
                    }
                }
                for (int t = 0; t < NT; t++) isum[t] = K_SCALE(isum[t], sum[t], sc);
            }
        }
        const VF dw = PSFX(ld_f16)(p + TS_PK_D, gs), mw = PSFX(ld_f16)(p + TS_PK_DMIN, gs);
        for (int t = 0; t < NT; t++) {
            /* mins: lane r = sum over pairs q of min(2q) * bs(2q) + min(2q + 1) * bs(2q + 1) */
            VI imin = V_ZERO();
            for (int q = 0; q < 4; q++) {
                const VI mn = PSFX(ld_8_16)(p + TS_PK45_MN + 16 * q, gs, 0);
                int32_t pair;
                memcpy(&pair, xq[t].bs + b * 8 + 2 * q, 4);
                imin = V_ADD32(imin, V_MADD16(mn, V_SET1_32(pair)));
            }
            const VF dx = V_SET1F(xq[t].d[b]);
            acc[t] = V_FMA(V_CVT(isum[t]), V_FMUL(dw, dx), acc[t]);
            acc[t] = V_FNMA(V_CVT(imin), V_FMUL(mw, dx), acc[t]);
        }
    }
    for (int t = 0; t < NT; t++) V_STORE(out + t * os, acc[t]);
}

/* Q6_K: the stored 6-bit values q (0..63, unsigned as dpbusd / maddubs take them) meet x, and
 * the offset comes off per sub-block as 32 * scale * sum(x) (XQ.b16), exact in integers:
 * sum sc (q - 32) x = sum sc q x - 32 sum sc b16. The top 2 bits of a value sit at bits 2a, 2a + 1
 * (low nibbles) and 2a + 4, 2a + 5 (high nibbles) of its qh byte: one shift and a 0x30 mask each
 * put them above the nibble. Both nibbles of a word at once (two sub-blocks' sums live): the
 * word and its top bits are loaded once, which decode (one activation row) needs most. */
static inline __attribute__((always_inline)) void
PSFX(group_tile_q6_k)(const uint8_t *g, int64_t gs, const XQ *xq, int64_t nb, int NT, float *out,
                      int64_t os) {
    /* AVX2's int16 sums hold 2 words of 6-bit values, VNNI's int32 ones the sub-block's 4 */
    const int flush = PACKED_VNNI ? 4 : 2;
    const VI m4 = V_SET1_8(0x0F), m30 = V_SET1_8(0x30);
    VF acc[PK_NT];
    for (int t = 0; t < NT; t++) acc[t] = V_FZERO();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *p = g + b * TS_PK_REC_Q6_K;
        VI isum[PK_NT];
        for (int t = 0; t < NT; t++) isum[t] = V_ZERO();
        for (int h = 0; h < 2; h++)
            for (int a = 0; a < 2; a++) {
                /* scales of sub-blocks 8h + 2a + e (low nibbles) and 8h + 2a + 4 + e (high) */
                const VI pl = PSFX(ld_8_16)(p + TS_PK6_SC + 16 * (4 * h + a), gs, 1);
                const VI ph = PSFX(ld_8_16)(p + TS_PK6_SC + 16 * (4 * h + a + 2), gs, 1);
                for (int half = 0; half < 2; half++) {
                    /* lane r's scale of this half's sub-block, as int32 */
                    const VI sc_lo = half ? V_SRAI32(pl, 16) : V_SRAI32(V_SLLI32(pl, 16), 16);
                    const VI sc_hi = half ? V_SRAI32(ph, 16) : V_SRAI32(V_SLLI32(ph, 16), 16);
                    for (int i0 = 4 * half; i0 < 4 * half + 4; i0 += flush) {
                        VI s_lo[PK_NT], s_hi[PK_NT];
                        for (int t = 0; t < NT; t++) s_lo[t] = s_hi[t] = V_ZERO();
                        for (int i = i0; i < i0 + flush; i++) {
                            const int w = 16 * h + 8 * a + i;
                            const VI raw = PSFX(ld)(p + TS_PK6_QL + 32 * w, gs);
                            const VI qh = PSFX(ld)(p + TS_PK6_QH + 32 * (8 * h + i), gs);
                            const VI lo = V_OR(V_AND(raw, m4),
                                               V_AND(V_SLLI16(qh, 4 - 2 * a), m30));
                            const VI hi = V_OR(V_AND(V_SRLI16(raw, 4), m4),
                                               V_AND(V_SRLI16(qh, 2 * a), m30));
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
        const VF dw = PSFX(ld_f16)(p + TS_PK_D, gs);
        for (int t = 0; t < NT; t++) {
            /* the offsets: lane r = sum over pairs q of sc(2q) b16(2q) + sc(2q + 1) b16(2q + 1) */
            VI off = V_ZERO();
            for (int q = 0; q < 8; q++) {
                const VI sc = PSFX(ld_8_16)(p + TS_PK6_SC + 16 * q, gs, 1);
                int32_t pair;
                memcpy(&pair, xq[t].b16 + b * 16 + 2 * q, 4);
                off = V_ADD32(off, V_MADD16(sc, V_SET1_32(pair)));
            }
            const VI exact = V_SUB32(isum[t], V_SLLI32(off, 5));
            acc[t] = V_FMA(V_CVT(exact), V_FMUL(dw, V_SET1F(xq[t].d[b])), acc[t]);
        }
    }
    for (int t = 0; t < NT; t++) V_STORE(out + t * os, acc[t]);
}

static inline __attribute__((always_inline)) void
PSFX(group_tile_q4_k)(const uint8_t *g, int64_t gs, const XQ *xq, int64_t nb, int NT, float *out,
                      int64_t os) {
    PSFX(group_tile_k45)(g, gs, xq, nb, NT, out, os, 0);
}
static inline __attribute__((always_inline)) void
PSFX(group_tile_q5_k)(const uint8_t *g, int64_t gs, const XQ *xq, int64_t nb, int NT, float *out,
                      int64_t os) {
    PSFX(group_tile_k45)(g, gs, xq, nb, NT, out, os, 1);
}

#define TS_GROUP_SIMD_K(name)                                                                      \
    PK_GROUP_FN(name) {                                                                            \
        PK_GS                                                                                      \
        PK_TILES(PSFX(group_tile_##name), )                                                        \
    }
TS_GROUP_SIMD_K(q4_k)
TS_GROUP_SIMD_K(q5_k)
TS_GROUP_SIMD_K(q6_k)
#undef TS_GROUP_SIMD_K
#undef K_DOT
#undef K_SCALE
