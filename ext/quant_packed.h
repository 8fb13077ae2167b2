/* Weights repacked in groups of 8 rows, for quant.h's int8 matmul (Q4_0, Q4_1, Q5_0, Q5_1,
 * Q8_0 here; the K-quants' layout in quant_packed_k.h).
 *
 * Row-major ggml blocks make each output a dot product of its own: an 8-lane integer partial per
 * 32-block, converted, scaled and summed in float, then a horizontal sum per output. Packed, the
 * 8 rows of a group lie side by side, 4 bytes of each row per 32-bit lane, so one maddubs
 * multiplies 4 values of 8 rows by the same 4 activations, the 8 outputs stay in the 8 lanes of
 * one register, and a block's float step (convert, scale, fma) serves 8 outputs at once: about
 * 2.5x fewer instructions per weight than the row kernels, at 1 activation row (decode) and at
 * many (prefill) alike (llama.cpp's repack.cpp interleaves rows the same way).
 *
 * Layout of group g (rows 8g .. 8g+7), block b, at packed + g * group_stride + b * rec bytes:
 *   d[8]  f16 scales of the 8 rows          (16 bytes)
 *   m[8]  f16 mins (Q4_1, Q5_1)             (16 bytes)
 *   q     Q4_x/Q5_x: 4 x 32 bytes, word i of row r = bytes 4i..4i+3 of its 16 nibble bytes (low
 *         nibbles: values 4i..4i+3, high nibbles: values 16+4i..16+4i+3, as ggml packs them);
 *         Q8_0: 8 x 32 bytes, word c of row r = its int8 values 4c..4c+3.
 *   h     Q5_x: 32 bytes, a bit plane: bit 2i (2i + 1) of byte 4r + j = the 5th bit of row r's
 *         value 4i + j (16 + 4i + j), i.e. of byte 4r + j of word i's low (high) nibbles, so one
 *         shift and a mask put each word's 5th bits in place (ts_plane_bit).
 *   rec = 144 (Q4_0), 160 (Q4_1), 176 (Q5_0), 192 (Q5_1), 272 (Q8_0): the 8 original blocks'
 *   bytes.
 *
 * Arithmetic of one output (row r, activation row t), whatever the tile or the row count:
 *   per block b, isum = the exact integer dot (Q4_0 / Q5_0: minus 8 / 16 * sum(xq)), then
 *   acc = fma((float)isum, d_r * xd_b, acc), and with mins acc = fma(m_r, xs_b, acc), in block
 *   order. The scalar twin does the same operations (fmaf): both implementations give the same
 *   bits. Needs quant.h's XQ and block helpers. */
#ifndef TINYSERVE_QUANT_PACKED_H
#define TINYSERVE_QUANT_PACKED_H

#define TS_PACKED 0x100 /* or-ed into a qtype: the weight is packed (ts_repack) */
#define TS_GROUP 8      /* weight rows per group */

static inline int ts_packs(int qtype) { return ts_block_size(qtype) != 0 && !(qtype & ~0xFF); }
static inline int ts_is_k(int qtype) { return ts_block_size(qtype) == 256; }

static inline int ts_has_min(int qtype) { return qtype == TS_Q4_1 || qtype == TS_Q5_1; }
static inline int ts_five(int qtype) { return qtype == TS_Q5_0 || qtype == TS_Q5_1; }
/* where a record's quants start, and (Q5_x) its 5th bits */
static inline int ts_packed_qoff(int qtype) { return ts_has_min(qtype) ? 32 : 16; }
static inline int ts_packed_hoff(int qtype) { return ts_packed_qoff(qtype) + 128; }
/* where an original block's nibbles (or int8 values) and 5th bits start */
static inline int ts_block_qs(int qtype) {
    return (ts_has_min(qtype) ? 4 : 2) + (ts_five(qtype) ? 4 : 0);
}
static inline int ts_block_qh(int qtype) { return ts_has_min(qtype) ? 4 : 2; }

#include "quant_packed_k.h"

/* bytes of one group's block record: the 8 original blocks' (32-value types), or the K-quants'
 * records with their scales decoded */
static inline int ts_packed_rec(int qtype) {
    switch (qtype & 0xFF) {
    case TS_Q4_K: return TS_PK_REC_Q4_K;
    case TS_Q5_K: return TS_PK_REC_Q5_K;
    case TS_Q6_K: return TS_PK_REC_Q6_K;
    default: return TS_GROUP * ts_type_size(qtype);
    }
}

/* packed (m / 8, nb * rec) from w (m, nb blocks; row r at w + r * w_stride); m % 8 == 0 */
static void ts_repack(int qtype, const uint8_t *w, int64_t m, int64_t w_stride, int64_t nb,
                      uint8_t *packed) {
    const int ts = ts_type_size(qtype), rec = ts_packed_rec(qtype);
    const int has_min = ts_has_min(qtype), five = ts_five(qtype), q8 = qtype == TS_Q8_0;
    const int words = q8 ? 8 : 4, qoff = ts_packed_qoff(qtype), hoff = ts_packed_hoff(qtype);
    for (int64_t g = 0; g < m / TS_GROUP; g++)
        for (int64_t b = 0; b < nb; b++) {
            uint8_t *p = packed + (g * nb + b) * rec;
            if (ts_is_k(qtype)) {
                memset(p, 0, (size_t)rec); /* the bit planes are or-ed in */
                for (int r = 0; r < TS_GROUP; r++)
                    ts_repack_k_block(qtype, w + (g * TS_GROUP + r) * w_stride + b * ts, r, p);
                continue;
            }
            uint8_t h[32];
            memset(h, 0, sizeof h);
            for (int r = 0; r < TS_GROUP; r++) {
                const uint8_t *blk = w + (g * TS_GROUP + r) * w_stride + b * ts;
                memcpy(p + 2 * r, blk, 2); /* d */
                if (has_min) memcpy(p + 16 + 2 * r, blk + 2, 2);
                const uint8_t *qs = blk + ts_block_qs(qtype);
                for (int i = 0; i < words; i++) memcpy(p + qoff + 32 * i + 4 * r, qs + 4 * i, 4);
                if (!five) continue;
                uint32_t qh;
                memcpy(&qh, blk + ts_block_qh(qtype), 4);
                for (int i = 0; i < 4; i++)
                    for (int j = 0; j < 4; j++) {
                        h[4 * r + j] |= (uint8_t)(((qh >> (4 * i + j)) & 1u) << (2 * i));
                        h[4 * r + j] |= (uint8_t)(((qh >> (16 + 4 * i + j)) & 1u) << (2 * i + 1));
                    }
            }
            if (five) memcpy(p + hoff, h, sizeof h);
        }
}

/* the original block b of row r (0..7) of the packed group at g, back into blk */
static inline void ts_unpack_block(int qtype, const uint8_t *g, int64_t nb, int64_t b, int r,
                                   uint8_t *blk) {
    const int rec = ts_packed_rec(qtype), has_min = ts_has_min(qtype), q8 = qtype == TS_Q8_0;
    const int words = q8 ? 8 : 4, qoff = ts_packed_qoff(qtype);
    const uint8_t *p = g + b * rec;
    (void)nb;
    if (ts_is_k(qtype)) {
        ts_unpack_k_block(qtype, p, r, blk);
        return;
    }
    memcpy(blk, p + 2 * r, 2);
    if (has_min) memcpy(blk + 2, p + 16 + 2 * r, 2);
    uint8_t *qs = blk + ts_block_qs(qtype);
    for (int i = 0; i < words; i++) memcpy(qs + 4 * i, p + qoff + 32 * i + 4 * r, 4);
    if (ts_five(qtype)) {
        const uint8_t *h = p + ts_packed_hoff(qtype);
        uint32_t qh = 0;
        for (int i = 0; i < 4; i++)
            for (int j = 0; j < 4; j++) {
                qh |= (uint32_t)((h[4 * r + j] >> (2 * i)) & 1u) << (4 * i + j);
                qh |= (uint32_t)((h[4 * r + j] >> (2 * i + 1)) & 1u) << (16 + 4 * i + j);
            }
        memcpy(blk + ts_block_qh(qtype), &qh, 4);
    }
}

/* one group (8 rows) . n_x activation rows -> out[t * os + r], r = 0..7 */
typedef void (*group_fn)(const uint8_t *g, const XQ *xq, int64_t nb, int n_x, float *out,
                         int64_t os);

static inline void ts_group_scalar_q(const uint8_t *g, const XQ *xq, int64_t nb, int n_x,
                                     float *out, int64_t os, int qtype) {
    const int rec = ts_packed_rec(qtype), has_min = ts_has_min(qtype), q8 = qtype == TS_Q8_0;
    const int five = ts_five(qtype), qoff = ts_packed_qoff(qtype), hoff = ts_packed_hoff(qtype);
    for (int t = 0; t < n_x; t++)
        for (int r = 0; r < TS_GROUP; r++) {
            float acc = 0.0f;
            for (int64_t b = 0; b < nb; b++) {
                const uint8_t *p = g + b * rec, *q = p + qoff;
                const uint8_t *h = p + hoff;
                const int8_t *x = xq[t].q + b * 32;
                int32_t isum = 0;
                if (q8) {
                    for (int c = 0; c < 8; c++)
                        for (int j = 0; j < 4; j++)
                            isum += (int8_t)q[32 * c + 4 * r + j] * x[4 * c + j];
                } else {
                    for (int i = 0; i < 4; i++)
                        for (int j = 0; j < 4; j++) {
                            const uint8_t v = q[32 * i + 4 * r + j];
                            const int hb = five ? h[4 * r + j] : 0;
                            const int lo = (v & 0x0F) | ((hb >> (2 * i)) & 1) << 4;
                            const int hi = (v >> 4) | ((hb >> (2 * i + 1)) & 1) << 4;
                            isum += lo * x[4 * i + j] + hi * x[16 + 4 * i + j];
                        }
                    if (!has_min) isum -= (five ? 16 : 8) * xq[t].bs[b];
                }
                acc = fmaf((float)isum, ts_load_f16(p + 2 * r) * xq[t].d[b], acc);
                if (has_min) acc = fmaf(ts_load_f16(p + 16 + 2 * r), xq[t].s[b], acc);
            }
            out[t * os + r] = acc;
        }
}

/* the portable twins by name: fn (ts_group_scalar_q or quant_packed_k.h's ts_group_k_scalar)
 * at a constant qtype */
#define TS_GROUP_SCALAR(name, fn, qt)                                                              \
    static void ts_group_##name##_scalar(const uint8_t *g, const XQ *xq, int64_t nb, int n_x,      \
                                         float *out, int64_t os) {                                 \
        fn(g, xq, nb, n_x, out, os, qt);                                                           \
    }
TS_GROUP_SCALAR(q4_0, ts_group_scalar_q, TS_Q4_0)
TS_GROUP_SCALAR(q4_1, ts_group_scalar_q, TS_Q4_1)
TS_GROUP_SCALAR(q5_0, ts_group_scalar_q, TS_Q5_0)
TS_GROUP_SCALAR(q5_1, ts_group_scalar_q, TS_Q5_1)
TS_GROUP_SCALAR(q8_0, ts_group_scalar_q, TS_Q8_0)
TS_GROUP_SCALAR(q4_k, ts_group_k_scalar, TS_Q4_K)
TS_GROUP_SCALAR(q5_k, ts_group_k_scalar, TS_Q5_K)
TS_GROUP_SCALAR(q6_k, ts_group_k_scalar, TS_Q6_K)
#undef TS_GROUP_SCALAR

/* two groups (16 rows, the second gs bytes after the first) . n_x activation rows ->
 * out[t * os + r], r = 0..15: each output exactly as group_fn computes it */
typedef void (*group2_fn)(const uint8_t *g, int64_t gs, const XQ *xq, int64_t nb, int n_x,
                          float *out, int64_t os);

#if TS_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define PSFX(name) ts_##name##_avx2
#define PACKED_VNNI 0
#define PACKED_W512 0
#define DOT_ACC(acc, u, s) _mm256_add_epi32((acc), _mm256_madd_epi16(_mm256_maddubs_epi16((u), (s)), ones))
#include "quant_packed_simd.h"
#undef PSFX
#undef PACKED_VNNI
#undef PACKED_W512
#undef DOT_ACC
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")
#define PSFX(name) ts_##name##_vnni
#define PACKED_VNNI 1
#define PACKED_W512 0
#define DOT_ACC(acc, u, s) _mm256_dpbusd_epi32((acc), (u), (s))
#include "quant_packed_simd.h"
#undef PSFX
#undef PACKED_W512
#undef DOT_ACC
#define PSFX(name) ts_##name##_vnni512
#define PACKED_W512 1
#define DOT_ACC(acc, u, s) _mm512_dpbusd_epi32((acc), (u), (s))
#include "quant_packed_simd.h"
#undef PSFX
#undef PACKED_VNNI
#undef PACKED_W512
#undef DOT_ACC
#pragma GCC pop_options
#endif

/* the group kernel of an implementation (all three give the same bits) */
static group_fn ts_group_fn(int isa, int qtype) {
#if TS_X86
    if (isa == TS_ISA_VNNI) {
        switch (qtype) {
        case TS_Q4_0: return ts_group_q4_0_vnni;
        case TS_Q4_1: return ts_group_q4_1_vnni;
        case TS_Q5_0: return ts_group_q5_0_vnni;
        case TS_Q5_1: return ts_group_q5_1_vnni;
        case TS_Q8_0: return ts_group_q8_0_vnni;
        case TS_Q4_K: return ts_group_q4_k_vnni;
        case TS_Q5_K: return ts_group_q5_k_vnni;
        case TS_Q6_K: return ts_group_q6_k_vnni;
        default: return 0;
        }
    }
    if (isa == TS_ISA_AVX2) {
        switch (qtype) {
        case TS_Q4_0: return ts_group_q4_0_avx2;
        case TS_Q4_1: return ts_group_q4_1_avx2;
        case TS_Q5_0: return ts_group_q5_0_avx2;
        case TS_Q5_1: return ts_group_q5_1_avx2;
        case TS_Q8_0: return ts_group_q8_0_avx2;
        case TS_Q4_K: return ts_group_q4_k_avx2;
        case TS_Q5_K: return ts_group_q5_k_avx2;
        case TS_Q6_K: return ts_group_q6_k_avx2;
        default: return 0;
        }
    }
#else
    (void)isa;
#endif
    switch (qtype) {
    case TS_Q4_0: return ts_group_q4_0_scalar;
    case TS_Q4_1: return ts_group_q4_1_scalar;
    case TS_Q5_0: return ts_group_q5_0_scalar;
    case TS_Q5_1: return ts_group_q5_1_scalar;
    case TS_Q8_0: return ts_group_q8_0_scalar;
    case TS_Q4_K: return ts_group_q4_k_scalar;
    case TS_Q5_K: return ts_group_q5_k_scalar;
    case TS_Q6_K: return ts_group_q6_k_scalar;
    default: return 0;
    }
}

/* the two-group kernel of an implementation, where it has one (VNNI's 512-bit tiles) */
static group2_fn ts_group2_fn(int isa, int qtype) {
#if TS_X86
    if (isa == TS_ISA_VNNI) {
        switch (qtype) {
        case TS_Q4_0: return ts_group2_q4_0_vnni512;
        case TS_Q4_1: return ts_group2_q4_1_vnni512;
        case TS_Q5_0: return ts_group2_q5_0_vnni512;
        case TS_Q5_1: return ts_group2_q5_1_vnni512;
        case TS_Q8_0: return ts_group2_q8_0_vnni512;
        case TS_Q4_K: return ts_group2_q4_k_vnni512;
        case TS_Q5_K: return ts_group2_q5_k_vnni512;
        case TS_Q6_K: return ts_group2_q6_k_vnni512;
        default: return 0;
        }
    }
#else
    (void)isa;
#endif
    (void)qtype;
    return 0;
}

#endif /* TINYSERVE_QUANT_PACKED_H */
