/* K-quants (Q4_K, Q5_K, Q6_K) in groups of 8 rows: quant_packed.h's layout for 256-value
 * super-blocks, included by it.
 *
 * As for the 32-value types, each 32-bit lane of a register holds 4 bytes of one of the group's
 * 8 rows, so a dpbusd (or maddubs) meets 4 weights of 8 rows with the same 4 activations and the
 * 8 outputs stay in 8 lanes. What the K-quants add is a small integer scale per sub-block (32
 * values for Q4_K/Q5_K, 16 for Q6_K): a sub-block's integer dots are summed per row first, then
 * multiplied by that row's scale in integers (madd on int16 pairs, or mullo on int32), so a whole
 * super-block still costs one float step per output, as in the row kernels. The scales are kept
 * decoded (one byte each) so no 6-bit unpacking runs in the inner loop.
 *
 * Record of group g, super-block b, at packed + g * group_stride + b * rec bytes:
 *   Q4_K / Q5_K (rec 1184 / 1440):
 *     d[8], dmin[8]     f16 of the 8 rows                                   (0, 16)
 *     sc[s][r]          u8 6-bit scale of sub-block s (0..7) of row r       (32: 64 bytes)
 *     mn[p][r][e]       u8 6-bit min of sub-block 2p + e of row r            (96: 64 bytes)
 *     q                 32 words x 32 bytes: word w = 8j + i holds bytes 32j + 4i .. + 3 of
 *                       each row's 128 nibble bytes (low nibbles: sub-block 2j, values
 *                       4i..4i+3; high nibbles: sub-block 2j + 1, the same values)   (160)
 *     h (Q5_K)          8 bit planes of 32 bytes (quant_packed.h's Q5_0 plane): plane w / 4,
 *                       bit 2 (w % 4) (+ 1) of byte 4r + l = the 5th bit of value 4i + l of row
 *                       r's sub-block 2j (2j + 1)                                       (1184)
 *   Q6_K (rec 1680):
 *     d[8]              f16                                                    (0)
 *     sc[p][r][e]       int8 scale of 16-value sub-block 2p + e of row r       (16: 128 bytes)
 *     ql                32 words: word w = bytes 4w .. 4w + 3 of each row's ql  (144)
 *     qh                16 words: word v = bytes 4v .. 4v + 3 of each row's qh  (1168)
 *     ql byte 64h + 32a + l holds value 128h + 32a + l (low nibble) and value 128h + 32a + 64 + l
 *     (high nibble); their top 2 bits are bits 2a, 2a + 1 and 2a + 4, 2a + 5 of qh byte 32h + l.
 *
 * Arithmetic of one output (row r, activation row t), whatever the tile or the row count: per
 * super-block b, the exact integer isum = sum over sub-blocks of scale * (integer dot), and
 * (Q4_K / Q5_K) imin = sum over sub-blocks of min * (sum of the activation's int8 values there);
 * then acc = fma((float)isum, d_r * xd_b, acc) and acc = fma(-(float)imin, dmin_r * xd_b, acc),
 * in block order. The integer sums are exact in int32 (Q4_K/Q5_K: |isum| <= 256 * 63 * 31 * 127;
 * Q6_K: <= 256 * 128 * 32 * 127), so every implementation gives the same bits. */
#ifndef TINYSERVE_QUANT_PACKED_K_H
#define TINYSERVE_QUANT_PACKED_K_H

enum {
    TS_PK_D = 0,       /* d[8] */
    TS_PK_DMIN = 16,   /* dmin[8] (Q4_K, Q5_K) */
    TS_PK45_SC = 32,   /* sc[s][r] */
    TS_PK45_MN = 96,   /* mn[p][r][e] */
    TS_PK45_Q = 160,   /* 32 nibble words */
    TS_PK5_H = 1184,   /* Q5_K's 5th bits */
    TS_PK6_SC = 16,    /* Q6_K sc[p][r][e] */
    TS_PK6_QL = 144,   /* 32 words */
    TS_PK6_QH = 1168,  /* 16 words */
    TS_PK_REC_Q4_K = 1184,
    TS_PK_REC_Q5_K = 1440,
    TS_PK_REC_Q6_K = 1680
};

/* where Q6_K's scale of sub-block u of row r lies in a record */
static inline int ts_pk6_sc(int u, int r) { return TS_PK6_SC + 16 * (u / 2) + 2 * r + (u & 1); }

/* ggml's 12-byte Q4_K/Q5_K scale field back from 8 scales and 8 mins (ts_scale_min_k4's
 * inverse: every bit of the field is used, so the original bytes come back) */
static inline void ts_pack_scale_min_k4(const uint8_t *sc, const uint8_t *mn, uint8_t *s) {
    for (int j = 0; j < 4; j++) {
        s[j] = (uint8_t)(sc[j] | (sc[j + 4] >> 4) << 6);
        s[j + 4] = (uint8_t)(mn[j] | (mn[j + 4] >> 4) << 6);
        s[j + 8] = (uint8_t)((sc[j + 4] & 0x0F) | (mn[j + 4] & 0x0F) << 4);
    }
}

/* row r's super-block blk into its group's record p */
static void ts_repack_k_block(int qtype, const uint8_t *blk, int r, uint8_t *p) {
    if (qtype == TS_Q6_K) {
        memcpy(p + TS_PK_D + 2 * r, blk + 208, 2);
        for (int u = 0; u < 16; u++) p[ts_pk6_sc(u, r)] = blk[192 + u];
        for (int w = 0; w < 32; w++) memcpy(p + TS_PK6_QL + 32 * w + 4 * r, blk + 4 * w, 4);
        for (int v = 0; v < 16; v++) memcpy(p + TS_PK6_QH + 32 * v + 4 * r, blk + 128 + 4 * v, 4);
        return;
    }
    const int five = qtype == TS_Q5_K;
    uint8_t sc[8], mn[8];
    memcpy(p + TS_PK_D + 2 * r, blk, 2);
    memcpy(p + TS_PK_DMIN + 2 * r, blk + 2, 2);
    ts_scale_min_k4(blk + 4, sc, mn);
    for (int s = 0; s < 8; s++) {
        p[TS_PK45_SC + 8 * s + r] = sc[s];
        p[TS_PK45_MN + 16 * (s / 2) + 2 * r + (s & 1)] = mn[s];
    }
    const uint8_t *qs = blk + (five ? 48 : 16), *qh = blk + 16;
    for (int w = 0; w < 32; w++) memcpy(p + TS_PK45_Q + 32 * w + 4 * r, qs + 4 * w, 4);
    if (!five) return;
    for (int w = 0; w < 32; w++) {
        const int j = w / 8, i = w % 8;
        uint8_t *plane = p + TS_PK5_H + 32 * (w / 4);
        const int k = 2 * (w % 4); /* the low nibbles' bit; the high nibbles' is k + 1 */
        for (int l = 0; l < 4; l++) {
            plane[4 * r + l] |= (uint8_t)(((qh[4 * i + l] >> (2 * j)) & 1) << k);
            plane[4 * r + l] |= (uint8_t)(((qh[4 * i + l] >> (2 * j + 1)) & 1) << (k + 1));
        }
    }
}

/* the original super-block of row r back out of its group's record p */
static void ts_unpack_k_block(int qtype, const uint8_t *p, int r, uint8_t *blk) {
    if (qtype == TS_Q6_K) {
        memcpy(blk + 208, p + TS_PK_D + 2 * r, 2);
        for (int u = 0; u < 16; u++) blk[192 + u] = p[ts_pk6_sc(u, r)];
        for (int w = 0; w < 32; w++) memcpy(blk + 4 * w, p + TS_PK6_QL + 32 * w + 4 * r, 4);
        for (int v = 0; v < 16; v++) memcpy(blk + 128 + 4 * v, p + TS_PK6_QH + 32 * v + 4 * r, 4);
        return;
    }
    const int five = qtype == TS_Q5_K;
    uint8_t sc[8], mn[8];
    memcpy(blk, p + TS_PK_D + 2 * r, 2);
    memcpy(blk + 2, p + TS_PK_DMIN + 2 * r, 2);
    for (int s = 0; s < 8; s++) {
        sc[s] = p[TS_PK45_SC + 8 * s + r];
        mn[s] = p[TS_PK45_MN + 16 * (s / 2) + 2 * r + (s & 1)];
    }
    ts_pack_scale_min_k4(sc, mn, blk + 4);
    uint8_t *qs = blk + (five ? 48 : 16), *qh = blk + 16;
    for (int w = 0; w < 32; w++) memcpy(qs + 4 * w, p + TS_PK45_Q + 32 * w + 4 * r, 4);
    if (!five) return;
    memset(qh, 0, 32);
    for (int w = 0; w < 32; w++) {
        const int j = w / 8, i = w % 8;
        const uint8_t *plane = p + TS_PK5_H + 32 * (w / 4);
        const int k = 2 * (w % 4);
        for (int l = 0; l < 4; l++) {
            qh[4 * i + l] |= (uint8_t)(((plane[4 * r + l] >> k) & 1) << (2 * j));
            qh[4 * i + l] |= (uint8_t)(((plane[4 * r + l] >> (k + 1)) & 1) << (2 * j + 1));
        }
    }
}

/* The portable twin: the operations of the contract above, one output at a time. */
static void ts_group_k_scalar(const uint8_t *g, const XQ *xq, int64_t nb, int n_x, float *out,
                              int64_t os, int qtype) {
    const int q6 = qtype == TS_Q6_K, five = qtype == TS_Q5_K;
    const int rec = q6 ? TS_PK_REC_Q6_K : five ? TS_PK_REC_Q5_K : TS_PK_REC_Q4_K;
    for (int t = 0; t < n_x; t++)
        for (int r = 0; r < TS_GROUP; r++) {
            float acc = 0.0f;
            for (int64_t b = 0; b < nb; b++) {
                const uint8_t *p = g + b * rec;
                const int8_t *x = xq[t].q + b * 256;
                int32_t isum = 0, imin = 0;
                if (q6) {
                    const int8_t *sc = (const int8_t *)p;
                    for (int w = 0; w < 32; w++) {
                        const int h = w / 16, a = (w / 8) % 2, i = w % 8;
                        const int u = 8 * h + 2 * a + i / 4; /* the low nibbles' sub-block */
                        const uint8_t *ql = p + TS_PK6_QL + 32 * w + 4 * r;
                        const uint8_t *qh = p + TS_PK6_QH + 32 * (8 * h + i) + 4 * r;
                        const int8_t *xl = x + 128 * h + 32 * a + 4 * i, *xh = xl + 64;
                        for (int l = 0; l < 4; l++) {
                            const int lo = ((ql[l] & 0x0F) | ((qh[l] >> (2 * a)) & 3) << 4) - 32;
                            const int hi = ((ql[l] >> 4) | ((qh[l] >> (2 * a + 4)) & 3) << 4) - 32;
                            isum += sc[ts_pk6_sc(u, r)] * lo * xl[l] +
                                    sc[ts_pk6_sc(u + 4, r)] * hi * xh[l];
                        }
                    }
                } else {
                    for (int w = 0; w < 32; w++) {
                        const int j = w / 8, i = w % 8;
                        const int s_lo = p[TS_PK45_SC + 8 * (2 * j) + r];
                        const int s_hi = p[TS_PK45_SC + 8 * (2 * j + 1) + r];
                        const uint8_t *q = p + TS_PK45_Q + 32 * w + 4 * r;
                        const int8_t *xl = x + 64 * j + 4 * i, *xh = xl + 32;
                        for (int l = 0; l < 4; l++) {
                            int lo = q[l] & 0x0F, hi = q[l] >> 4;
                            if (five) {
                                const int hb = p[TS_PK5_H + 32 * (w / 4) + 4 * r + l];
                                lo |= ((hb >> (2 * (w % 4))) & 1) << 4;
                                hi |= ((hb >> (2 * (w % 4) + 1)) & 1) << 4;
                            }
                            isum += s_lo * lo * xl[l] + s_hi * hi * xh[l];
                        }
                    }
                    for (int s = 0; s < 8; s++) {
                        const int mn = p[TS_PK45_MN + 16 * (s / 2) + 2 * r + (s & 1)];
                        imin += mn * xq[t].bs[b * 8 + s];
                    }
                }
                const float dx = xq[t].d[b];
                acc = fmaf((float)isum, ts_load_f16(p + TS_PK_D + 2 * r) * dx, acc);
                if (!q6) acc = fmaf(-(float)imin, ts_load_f16(p + TS_PK_DMIN + 2 * r) * dx, acc);
            }
            out[t * os + r] = acc;
        }
}

#endif /* TINYSERVE_QUANT_PACKED_K_H */
