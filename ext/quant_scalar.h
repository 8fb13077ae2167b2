/* Portable C twins of quant_simd.h, included by quant.h (which defines XQ, row_fn and the
 * block helpers): ggml's dequantize_row_* for embedding rows, and the integer block dots of the
 * quantized matmul in the same arithmetic as the SIMD paths. Plain loops the compiler can
 * vectorize; they are what non-x86 and clang builds run. */
#ifndef TINYSERVE_QUANT_SCALAR_H
#define TINYSERVE_QUANT_SCALAR_H

/* ---- dequantization (embedding rows): one block -> floats, as ggml's dequantize_row_* ---- */

static void ts_dequant_block(int qtype, const uint8_t *b, float *y) {
    switch (qtype) {
    case TS_Q8_0: {
        const float d = ts_load_f16(b);
        for (int i = 0; i < 32; i++) y[i] = d * (float)(int8_t)b[2 + i];
        break;
    }
    case TS_Q4_0: {
        const float d = ts_load_f16(b);
        for (int i = 0; i < 16; i++) {
            y[i] = d * (float)((b[2 + i] & 0x0F) - 8);
            y[i + 16] = d * (float)((b[2 + i] >> 4) - 8);
        }
        break;
    }
    case TS_Q4_1: {
        const float d = ts_load_f16(b), m = ts_load_f16(b + 2);
        for (int i = 0; i < 16; i++) {
            y[i] = (float)(b[4 + i] & 0x0F) * d + m;
            y[i + 16] = (float)(b[4 + i] >> 4) * d + m;
        }
        break;
    }
    case TS_Q5_0:
    case TS_Q5_1: {
        const int has_min = qtype == TS_Q5_1, o = has_min ? 2 : 0;
        const float d = ts_load_f16(b), m = has_min ? ts_load_f16(b + 2) : 0.0f;
        uint32_t qh;
        memcpy(&qh, b + 2 + o, 4);
        const uint8_t *qs = b + 6 + o;
        for (int i = 0; i < 16; i++) {
            const int lo = (qs[i] & 0x0F) | (((qh >> i) & 1) << 4);
            const int hi = (qs[i] >> 4) | (((qh >> (i + 16)) & 1) << 4);
            y[i] = has_min ? (float)lo * d + m : (float)(lo - 16) * d;
            y[i + 16] = has_min ? (float)hi * d + m : (float)(hi - 16) * d;
        }
        break;
    }
    case TS_Q4_K:
    case TS_Q5_K: {
        const int five = qtype == TS_Q5_K;
        const float d = ts_load_f16(b), dmin = ts_load_f16(b + 2);
        uint8_t sc[8], mn[8];
        ts_scale_min_k4(b + 4, sc, mn);
        const uint8_t *qh = b + 16, *qs = b + (five ? 48 : 16);
        for (int s = 0; s < 8; s++) {
            const float ds = d * sc[s], ms = dmin * mn[s];
            for (int l = 0; l < 32; l++) {
                int q = (s & 1) ? qs[32 * (s / 2) + l] >> 4 : qs[32 * (s / 2) + l] & 0x0F;
                if (five) q |= ((qh[l] >> s) & 1) << 4;
                y[32 * s + l] = ds * (float)q - ms;
            }
        }
        break;
    }
    case TS_Q6_K: {
        const float d = ts_load_f16(b + 208);
        const int8_t *sc = (const int8_t *)(b + 192);
        for (int h = 0; h < 2; h++) {
            const uint8_t *ql = b + 64 * h, *qh = b + 128 + 32 * h;
            for (int j = 0; j < 4; j++) {
                for (int l = 0; l < 32; l++) {
                    const int lo =
                        (j & 2) ? ql[32 * (j & 1) + l] >> 4 : ql[32 * (j & 1) + l] & 0x0F;
                    const int q = (lo | (((qh[l] >> (2 * j)) & 3) << 4)) - 32;
                    y[128 * h + 32 * j + l] = d * (float)sc[8 * h + 2 * j + l / 16] * (float)q;
                }
            }
        }
        break;
    }
    }
}

/* ---- scalar twins: integer block dots, the same arithmetic as the SIMD paths -------------- */

/* n int8 x int8 -> int32: plain loops the compiler vectorizes (pmaddwd, NEON smlal/sdot) */
static inline int ts_dot_i8(const int8_t *a, const int8_t *b, int n) {
    int s = 0;
    for (int i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

static inline float ts_sdot_q8_0(const uint8_t *w, const XQ *x, int64_t nb) {
    float acc = 0.0f;
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = w + b * 34;
        const int isum = ts_dot_i8((const int8_t *)(blk + 2), x->q + b * 32, 32);
        acc += ts_load_f16(blk) * x->d[b] * (float)isum;
    }
    return acc;
}

/* Q4_0, Q4_1, Q5_0, Q5_1 (qtype a constant where inlined): sum(q * xq) over the unsigned values,
 * minus 8 / 16 * sum(xq) for the symmetric types; the stored min meets s = dx * sum(xq) */
static inline float ts_sdot_q4q5(int qtype, const uint8_t *w, const XQ *x, int64_t nb) {
    const int ts = ts_type_size(qtype);
    const int has_min = qtype == TS_Q4_1 || qtype == TS_Q5_1;
    const int five = qtype == TS_Q5_0 || qtype == TS_Q5_1;
    const int offset = has_min ? 0 : (five ? 16 : 8);
    const int qs_at = 2 + 2 * has_min + 4 * five;
    float acc = 0.0f;
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = w + b * ts, *qs = blk + qs_at;
        const int8_t *xq = x->q + b * 32;
        int isum = -offset * x->bs[b];
        for (int i = 0; i < 16; i++) isum += (qs[i] & 0x0F) * xq[i] + (qs[i] >> 4) * xq[i + 16];
        if (five) {
            uint32_t qh;
            memcpy(&qh, blk + 2 + 2 * has_min, 4);
            for (int i = 0; i < 32; i++) isum += (int)(((qh >> i) & 1) << 4) * xq[i];
        }
        acc += ts_load_f16(blk) * x->d[b] * (float)isum;
        if (has_min) acc += ts_load_f16(blk + 2) * x->s[b];
    }
    return acc;
}

/* K-quants against Q8_K-style activations (x->d one scale per 256 values) */
static inline float ts_sdot_q45_k(int qtype, const uint8_t *w, const XQ *x, int64_t nb) {
    const int five = qtype == TS_Q5_K, ts = ts_type_size(qtype);
    float acc = 0.0f;
    int8_t q[32];
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = w + b * ts, *qh = blk + 16, *qs = blk + (five ? 48 : 16);
        uint8_t sc[8], mn[8];
        ts_scale_min_k4(blk + 4, sc, mn);
        int isum = 0, imin = 0;
        for (int s = 0; s < 8; s++) {
            const uint8_t *src = qs + 32 * (s / 2);
            const int shift = 4 * (s & 1);
            for (int l = 0; l < 32; l++)
                q[l] = (int8_t)(((src[l] >> shift) & 0x0F) | (five ? ((qh[l] >> s) & 1) << 4 : 0));
            isum += sc[s] * ts_dot_i8(q, x->q + b * 256 + s * 32, 32);
            imin += mn[s] * x->bs[b * 8 + s];
        }
        acc += x->d[b] * (ts_load_f16(blk) * (float)isum - ts_load_f16(blk + 2) * (float)imin);
    }
    return acc;
}

static inline float ts_sdot_q6_k(const uint8_t *w, const XQ *x, int64_t nb) {
    float acc = 0.0f;
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = w + b * 210;
        const int8_t *sc = (const int8_t *)(blk + 192);
        int isum = 0;
        for (int h = 0; h < 2; h++) {
            const uint8_t *ql = blk + 64 * h, *qh = blk + 128 + 32 * h;
            for (int j = 0; j < 4; j++) {
                const uint8_t *src = ql + 32 * (j & 1);
                const int shift = 4 * (j >> 1);
                const int8_t *xq = x->q + b * 256 + 128 * h + 32 * j;
                int sub[2] = {0, 0};
                for (int half = 0; half < 2; half++) {
                    for (int l = 16 * half; l < 16 * half + 16; l++) {
                        const int q = ((src[l] >> shift) & 0x0F) | (((qh[l] >> (2 * j)) & 3) << 4);
                        sub[half] += (q - 32) * xq[l];
                    }
                }
                isum += sc[8 * h + 2 * j] * sub[0] + sc[8 * h + 2 * j + 1] * sub[1];
            }
        }
        acc += ts_load_f16(blk + 208) * x->d[b] * (float)isum;
    }
    return acc;
}

#define TS_SCALAR_ROW(name, expr)                                                                  \
    static void ts_row_##name##_scalar(const uint8_t *w, const XQ *xq, int64_t nb, int n_x,        \
                                       float *out, int64_t os) {                                   \
        for (int t = 0; t < n_x; t++) out[t * os] = (expr);                                        \
    }
TS_SCALAR_ROW(q8_0, ts_sdot_q8_0(w, xq + t, nb))
TS_SCALAR_ROW(q4_0, ts_sdot_q4q5(TS_Q4_0, w, xq + t, nb))
TS_SCALAR_ROW(q4_1, ts_sdot_q4q5(TS_Q4_1, w, xq + t, nb))
TS_SCALAR_ROW(q5_0, ts_sdot_q4q5(TS_Q5_0, w, xq + t, nb))
TS_SCALAR_ROW(q5_1, ts_sdot_q4q5(TS_Q5_1, w, xq + t, nb))
TS_SCALAR_ROW(q4_k, ts_sdot_q45_k(TS_Q4_K, w, xq + t, nb))
TS_SCALAR_ROW(q5_k, ts_sdot_q45_k(TS_Q5_K, w, xq + t, nb))
TS_SCALAR_ROW(q6_k, ts_sdot_q6_k(w, xq + t, nb))
#undef TS_SCALAR_ROW

static row_fn ts_row_fn_scalar(int qtype) {
    switch (qtype) {
    case TS_Q8_0: return ts_row_q8_0_scalar;
    case TS_Q4_0: return ts_row_q4_0_scalar;
    case TS_Q4_1: return ts_row_q4_1_scalar;
    case TS_Q5_0: return ts_row_q5_0_scalar;
    case TS_Q5_1: return ts_row_q5_1_scalar;
    case TS_Q4_K: return ts_row_q4_k_scalar;
    case TS_Q5_K: return ts_row_q5_k_scalar;
    case TS_Q6_K: return ts_row_q6_k_scalar;
    default: return 0;
    }
}

/* x row -> int8 blocks of qk (32 or 256): d = max|x| / 127, q = round-half-even(x / d); per
 * 32 values bs = sum(q) and s = d * bs */
static void ts_quantize_row_scalar(const float *x, int64_t k, int qk, int8_t *q, float *d, float *s,
                                   int16_t *bs, int16_t *b16) {
    for (int64_t b = 0; b < k / qk; b++) {
        const float *xb = x + b * qk;
        float amax = 0.0f;
        int bad = 0; /* a nan or inf: the block's scale becomes nan so the outputs show it */
        for (int i = 0; i < qk; i++) {
            amax = fmaxf(amax, fabsf(xb[i]));
            bad |= !(fabsf(xb[i]) <= FLT_MAX);
        }
        const float db = bad ? NAN : amax / 127.0f;
        const float id = bad || db == 0.0f ? 0.0f : 1.0f / db;
        for (int g = 0; g < qk / 32; g++) {
            int sum = 0, first16 = 0;
            for (int i = 32 * g; i < 32 * g + 32; i++) {
                const int v = (int)nearbyintf(xb[i] * id);
                q[b * qk + i] = (int8_t)v;
                sum += v;
                if (i < 32 * g + 16) first16 += v;
            }
            bs[b * (qk / 32) + g] = (int16_t)sum;
            if (qk == 256) {
                b16[2 * (b * 8 + g)] = (int16_t)first16;
                b16[2 * (b * 8 + g) + 1] = (int16_t)(sum - first16);
            }
            s[b * (qk / 32) + g] = db * (float)sum;
        }
        d[b] = db;
    }
}

/* one float weight row (bf16 bits, or float32) . n_x activation rows, summed in index order */
static void ts_row_bf16_scalar(const void *w, const void *xv, int64_t xs, int64_t k, int n_x,
                               float *out, int64_t os) {
    const uint16_t *wb = (const uint16_t *)w;
    const float *x = (const float *)xv;
    for (int t = 0; t < n_x; t++) {
        float acc = 0.0f;
        for (int64_t i = 0; i < k; i++) acc += ts_bf16_to_f32(wb[i]) * x[t * xs + i];
        out[t * os] = acc;
    }
}

static void ts_row_f32_scalar(const void *w, const void *xv, int64_t xs, int64_t k, int n_x,
                              float *out, int64_t os) {
    const float *wf = (const float *)w, *x = (const float *)xv;
    for (int t = 0; t < n_x; t++) {
        float acc = 0.0f;
        for (int64_t i = 0; i < k; i++) acc += wf[i] * x[t * xs + i];
        out[t * os] = acc;
    }
}

#endif /* TINYSERVE_QUANT_SCALAR_H */
