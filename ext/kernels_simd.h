/* Small float32 vector helpers for ext/kernels.pyx.

   AVX2+FMA intrinsics when the compiler targets them (setup.py passes -mavx2 -mfma on x86-64),
   otherwise plain loops the compiler may vectorize (`omp simd` licenses the reassociation that
   -O3 alone would refuse for float reductions). Results differ from a sequential sum only by
   float rounding, which the tests bound. */
#ifndef TINYSERVE_KERNELS_SIMD_H
#define TINYSERVE_KERNELS_SIMD_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "half.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define TS_SIMD_LEVEL "avx2+fma"

static inline float ts_hsum256(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
    return _mm_cvtss_f32(lo);
}

/* e^x for 8 floats: 2^n * p(r), x = n ln2 + r, |r| <= ln2/2; Cephes' degree-5 polynomial
   (relative error ~2e-7, as libm's expf to float rounding); x < -87.3 gives 0 */
static inline __m256 ts_exp256(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.33654f), hi = _mm256_set1_ps(88.3762626647949f);
    const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    x = _mm256_max_ps(_mm256_min_ps(x, hi), lo);
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n),
                                                         _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

/* sum_i a[i] * b[i] */
static inline float ts_dot(const float *a, const float *b, int64_t n) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
    }
    for (; i + 8 <= n; i += 8)
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    float s = ts_hsum256(_mm256_add_ps(s0, s1));
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* y[i] = y[i] * c + a * x[i] */
static inline void ts_scale_axpy(float *y, float c, float a, const float *x, int64_t n) {
    __m256 vc = _mm256_set1_ps(c), va = _mm256_set1_ps(a);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i),
                                                _mm256_mul_ps(vc, _mm256_loadu_ps(y + i))));
    for (; i < n; i++) y[i] = y[i] * c + a * x[i];
}

/* y[i] += a * x[i] */
static inline void ts_axpy(float *y, float a, const float *x, int64_t n) {
    __m256 va = _mm256_set1_ps(a);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    for (; i < n; i++) y[i] += a * x[i];
}

/* sum_i x[i]^2 */
static inline float ts_sumsq(const float *x, int64_t n) { return ts_dot(x, x, n); }

#else
#define TS_SIMD_LEVEL "scalar"

static inline float ts_dot(const float *a, const float *b, int64_t n) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

static inline void ts_scale_axpy(float *y, float c, float a, const float *x, int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; i++) y[i] = y[i] * c + a * x[i];
}

static inline void ts_axpy(float *y, float a, const float *x, int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; i++) y[i] += a * x[i];
}

static inline float ts_sumsq(const float *x, int64_t n) { return ts_dot(x, x, n); }
#endif

/* y[i] = x[i] * r * w[i]  (RMSNorm's scaling step) */
static inline void ts_scale_mul(float *y, const float *x, float r, const float *w, int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; i++) y[i] = x[i] * r * w[i];
}

/* y[i] = silu(g[i]) * u[i] */
static inline void ts_silu_mul(float *y, const float *g, const float *u, int64_t n) {
    int64_t i = 0;
#if defined(__AVX2__) && defined(__FMA__)
    const __m256 one = _mm256_set1_ps(1.0f);
    for (; i + 8 <= n; i += 8) {
        const __m256 gv = _mm256_loadu_ps(g + i);
        const __m256 e = ts_exp256(_mm256_sub_ps(_mm256_setzero_ps(), gv));
        _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_div_ps(gv, _mm256_add_ps(one, e)),
                                              _mm256_loadu_ps(u + i)));
    }
#endif
    for (; i < n; i++) y[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

/* y[i] = gelu_tanh(g[i]) * u[i]: 0.5 g (1 + tanh(z)) = g / (1 + exp(-2z)), z = sqrt(2/pi) (g + 0.044715 g^3) */
static inline void ts_gelu_tanh_mul(float *y, const float *g, const float *u, int64_t n) {
    const float c = 0.7978845608028654f, a = 0.044715f;
    int64_t i = 0;
#if defined(__AVX2__) && defined(__FMA__)
    const __m256 one = _mm256_set1_ps(1.0f), m2c = _mm256_set1_ps(-2.0f * c), av = _mm256_set1_ps(a);
    for (; i + 8 <= n; i += 8) {
        const __m256 gv = _mm256_loadu_ps(g + i);
        const __m256 inner = _mm256_fmadd_ps(_mm256_mul_ps(av, gv), _mm256_mul_ps(gv, gv), gv);
        const __m256 e = ts_exp256(_mm256_mul_ps(m2c, inner));
        _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_div_ps(gv, _mm256_add_ps(one, e)),
                                              _mm256_loadu_ps(u + i)));
    }
#endif
    for (; i < n; i++) y[i] = g[i] / (1.0f + expf(-2.0f * c * (g[i] + a * g[i] * g[i] * g[i]))) * u[i];
}

/* IEEE half <-> float rows (the float16 KV cache): F16C when compiled for it, else portable C
   with the same round-to-nearest-even */
static inline void ts_half_to_float_row(const uint16_t *src, float *dst, int64_t n) {
    int64_t i = 0;
#if defined(__F16C__) && defined(__AVX2__)
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
#endif
    for (; i < n; i++) dst[i] = ts_f16_to_f32(src[i]);
}

static inline void ts_float_to_half_row(const float *src, uint16_t *dst, int64_t n) {
    int64_t i = 0;
#if defined(__F16C__) && defined(__AVX2__)
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(dst + i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
#endif
    for (; i < n; i++) dst[i] = ts_f32_to_f16(src[i]);
}

static inline const char *ts_simd_level(void) { return TS_SIMD_LEVEL; }

#endif
