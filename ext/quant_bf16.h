/* bf16 weights against bf16 activations with AVX-512 BF16's vdpbf16ps (the "bf16" ISA level).
 *
 * vdpbf16ps multiplies 32 bf16 pairs and adds them into 16 f32 lanes in one instruction: twice
 * the multiply-adds per instruction of widening bf16 to f32 and FMA-ing with f32 activations
 * (quant_simd.h's tile_wf), and no widening shifts. It needs the activations in bf16 too, so each
 * activation row is rounded to bf16 once per call (round to nearest even), as llama.cpp's bf16
 * vec_dot does. Each product of two bf16 values is exact in f32 (8 + 8 significant bits); what
 * the rounding of the activations costs is half a unit in their last of 8 significant bits: at
 * most 2^-8 of |x| per element.
 *
 * The arithmetic, fixed per output whatever the row count, tile or thread (batch invariance):
 *   activations  bf16(x) by vcvtne2ps2bf16: nearest even; nan stays nan (quieted), inf stays
 *                inf, finite values past bf16's largest round to inf, f32 denormals become zero
 *   lanes        the row is cut in 32-value blocks (the last one zero-padded); block b goes to
 *                accumulator b & 1 (two chains, so one vdpbf16ps need not wait for the last);
 *                lane j of block b takes values 2j and 2j + 1 of it
 *   per lane     acc += w[2j+1] x[2j+1], then acc += w[2j] x[2j], each an f32 add rounded to
 *                nearest even (the instruction's definition: Intel SDM, VDPBF16PS; bf16 denormal
 *                inputs and f32 denormal results are flushed to zero)
 *   reduction    the two accumulators lane by lane, then 16 -> 8 -> 4 -> 2 -> 1 lanes, each
 *                step adding lane j + half to lane j
 * tests/test_bf16_kernels.py models exactly this in NumPy and compares bit for bit.
 *
 * Float32 weights do not come here: rounding them to bf16 would lose 16 bits of each weight, so
 * they stay on the exact f32 FMA tiles. Included once, by quant.h, under a `#pragma GCC target`
 * that adds avx512bf16 to VNNI's set.
 */

/* x (k,) f32 -> y (kp,) bf16 bits, kp = k rounded up to 32; the padding is zeros */
static void ts_round_bf16_row(const float *x, int64_t k, uint16_t *y) {
    int64_t i = 0;
    for (; i + 32 <= k; i += 32) {
        const __m512 lo = _mm512_loadu_ps(x + i), hi = _mm512_loadu_ps(x + i + 16);
        _mm512_storeu_si512((void *)(y + i), (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    }
    if (i < k) { /* masked loads read nothing past k; the masked-off lanes convert to +0 */
        const int64_t r = k - i;
        const __mmask16 mlo = (__mmask16)(r >= 16 ? 0xFFFF : (1u << r) - 1);
        const __mmask16 mhi = (__mmask16)(r <= 16 ? 0 : (1u << (r - 16)) - 1);
        const __m512 lo = _mm512_maskz_loadu_ps(mlo, x + i);
        const __m512 hi = _mm512_maskz_loadu_ps(mhi, x + i + 16);
        _mm512_storeu_si512((void *)(y + i), (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    }
}

/* 16 lanes -> one float: lane j + half into lane j, halving each time (the documented order) */
static inline float ts_hsum16_bf16dp(__m512 v) {
    const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
    const __m256 s8 = _mm256_add_ps(_mm512_castps512_ps256(v), hi);
    __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    return _mm_cvtss_f32(_mm_add_ss(s4, _mm_movehdup_ps(s4)));
}

/* one weight row w (k,) bf16 . NT bf16 activation rows (row t at x + t * xs, zero-padded to a
 * multiple of 32) -> out[t * os]; the weight row is read once for all NT rows */
static inline __attribute__((always_inline)) void ts_tile_bf16dp(const uint16_t *w,
                                                                 const uint16_t *x, int64_t xs,
                                                                 int64_t k, int NT, float *out,
                                                                 int64_t os) {
    __m512 acc[2][8];
    for (int t = 0; t < NT; t++) acc[0][t] = acc[1][t] = _mm512_setzero_ps();
    const int64_t nb = k / 32;
    int64_t b = 0;
    for (; b + 2 <= nb; b += 2) { /* blocks b (even) and b + 1 (odd) */
        const __m512bh w0 = (__m512bh)_mm512_loadu_si512((const void *)(w + 32 * b));
        const __m512bh w1 = (__m512bh)_mm512_loadu_si512((const void *)(w + 32 * b + 32));
        for (int t = 0; t < NT; t++) {
            const uint16_t *xt = x + t * xs + 32 * b;
            acc[0][t] = _mm512_dpbf16_ps(acc[0][t], w0,
                                         (__m512bh)_mm512_loadu_si512((const void *)xt));
            acc[1][t] = _mm512_dpbf16_ps(acc[1][t], w1,
                                         (__m512bh)_mm512_loadu_si512((const void *)(xt + 32)));
        }
    }
    if (b < nb) { /* an odd count of whole blocks: the last one (b even) to accumulator 0 */
        const __m512bh wv = (__m512bh)_mm512_loadu_si512((const void *)(w + 32 * b));
        for (int t = 0; t < NT; t++)
            acc[0][t] = _mm512_dpbf16_ps(
                acc[0][t], wv, (__m512bh)_mm512_loadu_si512((const void *)(x + t * xs + 32 * b)));
        b++;
    }
    if (32 * b < k) { /* the partial last block: the weight's lanes past k masked to zero (the
                       * file's row may end there), meeting the activations' zero padding */
        const __mmask32 live = (__mmask32)((1u << (k - 32 * b)) - 1); /* k - 32 b < 32 */
        const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(live, (const void *)(w + 32 * b));
        /* its accumulator by its parity, each branch with constant indices (registers) */
        if (b & 1) {
            for (int t = 0; t < NT; t++)
                acc[1][t] = _mm512_dpbf16_ps(acc[1][t], wv,
                                             (__m512bh)_mm512_loadu_si512(x + t * xs + 32 * b));
        } else {
            for (int t = 0; t < NT; t++)
                acc[0][t] = _mm512_dpbf16_ps(acc[0][t], wv,
                                             (__m512bh)_mm512_loadu_si512(x + t * xs + 32 * b));
        }
    }
    for (int t = 0; t < NT; t++)
        out[t * os] = ts_hsum16_bf16dp(_mm512_add_ps(acc[0][t], acc[1][t]));
}

/* one weight row against n_x (<= 8) activation rows, as quant_simd.h's row kernels */
static void ts_row_bf16dp(const void *w, const void *x, int64_t xs, int64_t k, int n_x,
                          float *out, int64_t os) {
    const uint16_t *wb = (const uint16_t *)w, *xb = (const uint16_t *)x;
    switch (n_x) {
    case 8: ts_tile_bf16dp(wb, xb, xs, k, 8, out, os); break;
    case 7: ts_tile_bf16dp(wb, xb, xs, k, 7, out, os); break;
    case 6: ts_tile_bf16dp(wb, xb, xs, k, 6, out, os); break;
    case 5: ts_tile_bf16dp(wb, xb, xs, k, 5, out, os); break;
    case 4: ts_tile_bf16dp(wb, xb, xs, k, 4, out, os); break;
    case 3: ts_tile_bf16dp(wb, xb, xs, k, 3, out, os); break;
    case 2: ts_tile_bf16dp(wb, xb, xs, k, 2, out, os); break;
    default: ts_tile_bf16dp(wb, xb, xs, k, 1, out, os); break;
    }
}
