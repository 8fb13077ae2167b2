/* Paged attention's inner loop for ext/kernels.pyx: the query heads that share a kv head, of
   one token or of a tile of one sequence's tokens, against that sequence's keys (each token its
   own [lo, hi]), read in place through its block table.

   Per block of BS keys: every key row is loaded once for all the heads of the group (GQA) and
   all the tokens of the tile, the block's scores are exponentiated together (a vectorized exp
   instead of one libm call per key), and the running max / sum / weighted values follow the
   online softmax:
       m' = max(m, max_j s_j),  l' = l e^(m - m') + sum_j e^(s_j - m'),
       acc' = acc e^(m - m') + sum_j e^(s_j - m') v_j,   out = acc / l.
   The score and value kernels here are AVX2's; kernels_attn_wide.h has their AVX-512 twins.
   Needs kernels_simd.h first (ts_dot, ts_hsum256, ts_exp256). */
#ifndef TINYSERVE_KERNELS_ATTN_H
#define TINYSERVE_KERNELS_ATTN_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "pool.h" /* ts_scratch */

#if defined(__AVX2__) && defined(__FMA__)
/* s[i] = e^(s[i] - m) for i < n; -> their sum */
static inline float ts_exp_sub_sum(float *s, int64_t n, float m) {
    const __m256 vm = _mm256_set1_ps(m);
    __m256 tot = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 e = ts_exp256(_mm256_sub_ps(_mm256_loadu_ps(s + i), vm));
        _mm256_storeu_ps(s + i, e);
        tot = _mm256_add_ps(tot, e);
    }
    if (i < n) { /* the tail through a padded copy: same exp for every key */
        float pad[8];
        for (int j = 0; j < 8; j++) pad[j] = i + j < n ? s[i + j] - m : -INFINITY;
        const __m256 e = ts_exp256(_mm256_loadu_ps(pad));
        _mm256_storeu_ps(pad, e);
        memcpy(s + i, pad, (size_t)(n - i) * sizeof(float));
        tot = _mm256_add_ps(tot, e);
    }
    return ts_hsum256(tot);
}
#else
static inline float ts_exp_sub_sum(float *s, int64_t n, float m) {
    float tot = 0.0f;
    for (int64_t i = 0; i < n; i++) {
        s[i] = expf(s[i] - m);
        tot += s[i];
    }
    return tot;
}
#endif

#if defined(__AVX2__) && defined(__FMA__)
/* The four keys' sums of a0 .. a3 (hadd twice: lane i and i + 4 hold halves of key i's) */
static inline __m128 ts_hsum4x256(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
    const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}
#endif

#include "kernels_attn_wide.h" /* the AVX-512 twins, after ts_hsum4x256 */

/* Scores of gi query heads (q: (gi, Dh), scale applied) against key rows j0 .. j1 - 1 of a block
   (row j at kb + j * rs): sc[g * BS + j - j0]. Keys in groups of four from j0, each key with its
   own accumulator and one horizontal reduction for the four; the rest by ts_dot. Two heads take
   a group together (eight independent FMA chains hide the FMA latency, and each key load serves
   both), which changes no head's chain: every score is the same bits for any gi. */
static inline void ts_attn_scores(const float *q, int gi, int64_t Dh, const float *kb, int64_t rs,
                                  int64_t j0, int64_t j1, float *sc, int64_t BS) {
    int64_t j = j0;
#if defined(__AVX2__) && defined(__FMA__)
    if (Dh % 8 == 0) {
        for (; j + 4 <= j1; j += 4) {
            const float *k0 = kb + j * rs, *k1 = k0 + rs, *k2 = k1 + rs, *k3 = k2 + rs;
            int g = 0;
            for (; g + 2 <= gi; g += 2) {
                const float *qa = q + g * Dh, *qb = qa + Dh;
                __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
                __m256 b0 = a0, b1 = a0, b2 = a0, b3 = a0;
                for (int64_t d = 0; d < Dh; d += 8) {
                    const __m256 qv = _mm256_loadu_ps(qa + d), qw = _mm256_loadu_ps(qb + d);
                    const __m256 x0 = _mm256_loadu_ps(k0 + d), x1 = _mm256_loadu_ps(k1 + d);
                    a0 = _mm256_fmadd_ps(qv, x0, a0);
                    b0 = _mm256_fmadd_ps(qw, x0, b0);
                    a1 = _mm256_fmadd_ps(qv, x1, a1);
                    b1 = _mm256_fmadd_ps(qw, x1, b1);
                    const __m256 x2 = _mm256_loadu_ps(k2 + d), x3 = _mm256_loadu_ps(k3 + d);
                    a2 = _mm256_fmadd_ps(qv, x2, a2);
                    b2 = _mm256_fmadd_ps(qw, x2, b2);
                    a3 = _mm256_fmadd_ps(qv, x3, a3);
                    b3 = _mm256_fmadd_ps(qw, x3, b3);
                }
                _mm_storeu_ps(sc + g * BS + (j - j0), ts_hsum4x256(a0, a1, a2, a3));
                _mm_storeu_ps(sc + (g + 1) * BS + (j - j0), ts_hsum4x256(b0, b1, b2, b3));
            }
            for (; g < gi; g++) {
                const float *qg = q + g * Dh;
                __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
                for (int64_t d = 0; d < Dh; d += 8) {
                    const __m256 qv = _mm256_loadu_ps(qg + d);
                    a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + d), a0);
                    a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k1 + d), a1);
                    a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k2 + d), a2);
                    a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k3 + d), a3);
                }
                _mm_storeu_ps(sc + g * BS + (j - j0), ts_hsum4x256(a0, a1, a2, a3));
            }
        }
    }
#endif
    for (; j < j1; j++)
        for (int g = 0; g < gi; g++) sc[g * BS + j - j0] = ts_dot(q + g * Dh, kb + j * rs, Dh);
}

/* acc (gi, Dv) = acc * corr[g] + p (gi, nj; row stride BS) @ V (nj rows at vb, stride rs): the
   accumulators of 64 output dims stay in registers across the block's keys. */
static inline void ts_attn_pv(float *acc, const float *corr, const float *p, int gi, int64_t BS,
                              const float *vb, int64_t rs, int64_t nj, int64_t Dv) {
    for (int g = 0; g < gi; g++) {
        float *a = acc + g * Dv;
        const float *pg = p + g * BS;
        int64_t d0 = 0;
#if defined(__AVX2__) && defined(__FMA__)
        const __m256 c = _mm256_set1_ps(corr[g]);
        for (; d0 + 64 <= Dv; d0 += 64) {
            __m256 r[8];
            for (int i = 0; i < 8; i++) r[i] = _mm256_mul_ps(_mm256_loadu_ps(a + d0 + 8 * i), c);
            for (int64_t j = 0; j < nj; j++) {
                const __m256 pj = _mm256_set1_ps(pg[j]);
                const float *vr = vb + j * rs + d0;
                for (int i = 0; i < 8; i++)
                    r[i] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(vr + 8 * i), r[i]);
            }
            for (int i = 0; i < 8; i++) _mm256_storeu_ps(a + d0 + 8 * i, r[i]);
        }
        for (; d0 + 8 <= Dv; d0 += 8) {
            __m256 r = _mm256_mul_ps(_mm256_loadu_ps(a + d0), c);
            for (int64_t j = 0; j < nj; j++)
                r = _mm256_fmadd_ps(_mm256_set1_ps(pg[j]), _mm256_loadu_ps(vb + j * rs + d0), r);
            _mm256_storeu_ps(a + d0, r);
        }
#endif
        for (int64_t d = d0; d < Dv; d++) {
            float r = a[d] * corr[g];
            for (int64_t j = 0; j < nj; j++) r += pg[j] * vb[j * rs + d];
            a[d] = r;
        }
    }
}

/* a hint to fetch n rows of `bytes` each, `stride` bytes apart, into the cache */
static inline void ts_prefetch_rows(const char *p, int64_t n, int64_t bytes, int64_t stride) {
    for (int64_t j = 0; j < n; j++)
        for (int64_t c = 0; c < bytes; c += 64) __builtin_prefetch(p + j * stride + c);
}

#define TS_ATTN_AHEAD 2 /* blocks: far enough for a block's fetch to overlap two blocks' work */

/* One query of a span: its gi heads' rows (scale applied), its keys [lo, hi] (none: hi < lo),
   and where its online softmax lands: acc (gi, Dv), then m (gi,), then l (gi,). */
typedef struct {
    const float *q;
    int64_t lo, hi;
    float *acc;
} ts_attn_query;

/* The online softmax of nq queries, each of gi heads sharing one kv head, over keys of one
   sequence read in place through its block table: on return each query's acc holds
   sum_j e^(s_j - m) v_j over its own keys, m the max score, l sum_j e^(s_j - m) (m = -inf, l = 0
   for an empty span). Blocks are visited once for all the queries (the block outer, the queries
   inner), so its key and value rows are read from memory once and reused from L1; each query's
   arithmetic is what it would do alone, as its block's key range [j0, j1) depends only on its
   own lo and hi. k, v: the layer's pools at the kv head's offset, float32 or (f16) IEEE half;
   key p at table[p / BS] * block_stride + (p % BS) * row_stride elements (v: its own strides).
   A half block's rows are widened into work first. work: gi * BS + gi + (f16) BS * (Dh + Dv)
   floats. wide: the AVX-512 kernels (kernels_attn_wide.h), for every query of the CPU alike. */
static inline void ts_attn_span(const ts_attn_query *qs, int64_t nq, int gi, int64_t Dh,
                                int64_t Dv, const void *k, const void *v, int f16, int wide,
                                int64_t block_stride, int64_t row_stride, int64_t v_block_stride,
                                int64_t v_row_stride, const int32_t *table, int64_t BS,
                                float *work) {
    float *sc = work, *corr = sc + gi * BS, *kw = corr + gi, *vw = kw + BS * Dh;
    const int64_t es = f16 ? 2 : 4; /* bytes per element */
    int64_t lo = INT64_MAX, hi = -1; /* the keys any query reads */
    for (int64_t i = 0; i < nq; i++) {
        float *m = qs[i].acc + gi * Dv, *l = m + gi;
        memset(qs[i].acc, 0, (size_t)(gi * Dv) * sizeof(float));
        for (int g = 0; g < gi; g++) {
            m[g] = -INFINITY;
            l[g] = 0.0f;
        }
        if (qs[i].hi < qs[i].lo) continue;
        lo = qs[i].lo < lo ? qs[i].lo : lo;
        hi = qs[i].hi > hi ? qs[i].hi : hi;
    }
    if (hi < lo) return;
    for (int64_t b = lo / BS; b <= hi / BS; b++) {
        const int64_t first = b * BS, last = first + BS - 1; /* the block's keys */
        const char *kb = (const char *)k + table[b] * block_stride * es;
        const char *vb = (const char *)v + table[b] * v_block_stride * es;
        /* the blocks ahead lie elsewhere in the pool: fetch them meanwhile, TS_ATTN_AHEAD
           blocks ahead (the first block also asks for those in between) */
        for (int64_t n = b == lo / BS ? b + 1 : b + TS_ATTN_AHEAD; n <= b + TS_ATTN_AHEAD; n++) {
            if (n > hi / BS) break;
            ts_prefetch_rows((const char *)k + table[n] * block_stride * es, BS, Dh * es,
                             row_stride * es);
            ts_prefetch_rows((const char *)v + table[n] * v_block_stride * es, BS, Dv * es,
                             v_row_stride * es);
        }
        const float *kf = (const float *)kb, *vf = (const float *)vb; /* row j: j * krs, j * vrs */
        int64_t krs = row_stride, vrs = v_row_stride;
        if (f16) { /* widen the rows some query reads, [u0, u1), once for all of them */
            int64_t u0 = BS, u1 = 0;
            for (int64_t i = 0; i < nq; i++) {
                if (qs[i].hi < qs[i].lo || qs[i].hi < first || qs[i].lo > last) continue;
                const int64_t j0 = qs[i].lo > first ? qs[i].lo - first : 0;
                const int64_t j1 = qs[i].hi < last ? qs[i].hi - first + 1 : BS;
                u0 = j0 < u0 ? j0 : u0;
                u1 = j1 > u1 ? j1 : u1;
            }
            for (int64_t j = u0; j < u1; j++) {
                ts_half_to_float_row((const uint16_t *)kb + j * row_stride, kw + j * Dh, Dh);
                ts_half_to_float_row((const uint16_t *)vb + j * v_row_stride, vw + j * Dv, Dv);
            }
            kf = kw;
            vf = vw;
            krs = Dh;
            vrs = Dv;
        }
        for (int64_t i = 0; i < nq; i++) {
            if (qs[i].hi < qs[i].lo || qs[i].hi < first || qs[i].lo > last) continue;
            const int64_t j0 = qs[i].lo > first ? qs[i].lo - first : 0;
            const int64_t j1 = qs[i].hi < last ? qs[i].hi - first + 1 : BS, nj = j1 - j0;
            float *acc = qs[i].acc, *m = acc + gi * Dv, *l = m + gi;
#if TS_ATTN_WIDE
            if (wide && Dh % 16 == 0)
                ts_attn_scores_wide(qs[i].q, gi, Dh, kf, krs, j0, j1, sc, BS);
            else
#endif
                ts_attn_scores(qs[i].q, gi, Dh, kf, krs, j0, j1, sc, BS);
            for (int g = 0; g < gi; g++) {
                float *s = sc + g * BS, bm = -INFINITY;
                for (int64_t j = 0; j < nj; j++) bm = s[j] > bm ? s[j] : bm;
                const float m_new = m[g] > bm ? m[g] : bm;
                corr[g] = expf(m[g] - m_new); /* rescales what came before (0 at the start) */
                l[g] = l[g] * corr[g] + ts_exp_sub_sum(s, nj, m_new);
                m[g] = m_new;
            }
#if TS_ATTN_WIDE
            if (wide)
                ts_attn_pv_wide(acc, corr, sc, gi, BS, vf + j0 * vrs, vrs, nj, Dv);
            else
#endif
                ts_attn_pv(acc, corr, sc, gi, BS, vf + j0 * vrs, vrs, nj, Dv);
        }
    }
}

/* The work items of one paged attention call. A token's keys [lo, hi] are cut at fixed
   positions, multiples of TS_ATTN_PIECE: each piece's online softmax leaves (acc, m, l), and the
   pieces are combined in order (ts_attn_merge, the flash-decoding merge). The cuts and the merge
   depend only on the token's own position, never on the step: a token's output is the same bits
   alone or in a batch, at any thread count. Only who computes a piece depends on the step: with
   n_spans > 1 (few tokens: a decode step) item = (token, kv head, piece) and the pieces of one
   token spread over the threads, leaving their partials in part; with n_spans == 1 item = (tile,
   kv head), a tile being up to TS_ATTN_QTILE tokens of one sequence (a prefill chunk) whose
   pieces run one after another in its own scratch, each piece for all the tile's tokens at once
   (ts_attn_span: its blocks are read once for the tile). */
#define TS_ATTN_PIECE 256
#define TS_ATTN_QTILE 32 /* tokens per tile at most */

typedef struct {
    const float *q; /* (N, H, Dh) */
    const void *k, *v; /* pools (NB, BS, KVH, Dh), (NB, BS, KVH, Dv): float32, or half if kv_f16 */
    int64_t v_block, v_row; /* elements between v's blocks and rows: values may be a view into
                               the key rows (MLA's latent, after its rope dims) */
    int kv_f16;
    int wide; /* the AVX-512 kernels: only where the CPU runs them (TS_ATTN_WIDE, the vnni level) */
    const int64_t *seq_of, *seq_lens, *positions; /* (N,), (S,), (N,) */
    const int32_t *block_tables; /* (S, max_blocks) */
    int64_t max_blocks, H, Dh, Dv, BS, KVH, window;
    int64_t n_spans; /* > 1: pieces per item slot (ts_attn_max_pieces); 1: a tile per item */
    float scale;
    float *out; /* (N, H, Dv) */
    float *part; /* n_spans > 1: (N, KVH, n_spans, G, Dv + 2) */
    const int64_t *tokens; /* the flat tokens the items cover, in order; NULL: all N */
    const int64_t *tile_start; /* n_spans == 1: tile i is tokens [tile_start[i], tile_start[i + 1])
                                  of the list above, all of one sequence */
} ts_attn_job;

/* The key range [lo, hi] token t attends to (causal, sliding window). */
static inline void ts_attn_range(const ts_attn_job *j, int64_t t, int64_t *lo, int64_t *hi) {
    const int64_t s = j->seq_of[t], pos = j->positions[t];
    *hi = pos < j->seq_lens[s] - 1 ? pos : j->seq_lens[s] - 1;
    *lo = j->window > 0 && pos - j->window + 1 > 0 ? pos - j->window + 1 : 0;
}

/* The most pieces a token of a sequence of max_len keys has: a bound for part's n_spans. */
static inline int64_t ts_attn_max_pieces(int64_t max_len) { return max_len / TS_ATTN_PIECE + 1; }

/* How many pieces keys [lo, hi] are cut into. */
static inline int64_t ts_attn_n_pieces(int64_t lo, int64_t hi) {
    return hi < lo ? 0 : hi / TS_ATTN_PIECE - lo / TS_ATTN_PIECE + 1;
}

/* Piece c of a token's [lo, hi]: [*a, *b], empty (*b < *a) past its last piece. */
static inline void ts_attn_piece_range(int64_t lo, int64_t hi, int64_t c, int64_t *a, int64_t *b) {
    const int64_t start = (lo / TS_ATTN_PIECE + c) * TS_ATTN_PIECE;
    *a = start > lo ? start : lo;
    *b = start + TS_ATTN_PIECE - 1 < hi ? start + TS_ATTN_PIECE - 1 : hi;
}

/* ts_attn_span over kv head kvh of the sequence of token t (every query of qs is one of its) */
static inline void ts_attn_pieces(const ts_attn_job *j, int64_t t, int64_t kvh,
                                  const ts_attn_query *qs, int64_t nq, float *span_work) {
    const int64_t es = j->kv_f16 ? 2 : 4;
    ts_attn_span(qs, nq, (int)(j->H / j->KVH), j->Dh, j->Dv, (const char *)j->k + kvh * j->Dh * es,
                 (const char *)j->v + kvh * j->Dv * es, j->kv_f16, j->wide, j->BS * j->KVH * j->Dh,
                 j->KVH * j->Dh, j->v_block, j->v_row,
                 j->block_tables + j->seq_of[t] * j->max_blocks, j->BS, span_work);
}

/* o (Dv,) = head g's n pieces at p0 (stride floats apart) combined in order:
   sum_c e^(m_c - M) acc_c / sum_c e^(m_c - M) l_c, M the largest m_c; empty pieces add nothing */
static inline void ts_attn_merge(const float *p0, int64_t stride, int64_t n, int64_t G,
                                 int64_t Dv, int64_t g, float *o) {
    float M = -INFINITY, L = 0.0f;
    for (int64_t c = 0; c < n; c++) {
        const float mc = p0[c * stride + G * Dv + g];
        M = mc > M ? mc : M;
    }
    for (int64_t d = 0; d < Dv; d++) o[d] = 0.0f;
    for (int64_t c = 0; c < n; c++) {
        const float *pc = p0 + c * stride;
        const float lc = pc[G * Dv + G + g];
        if (lc == 0.0f) continue; /* an empty piece */
        const float w = expf(pc[G * Dv + g] - M);
        L += w * lc;
        for (int64_t d = 0; d < Dv; d++) o[d] += w * pc[g * Dv + d];
    }
    for (int64_t d = 0; d < Dv; d++) o[d] /= L;
}

static void ts_attn_task(void *ctx, int64_t item) {
    const ts_attn_job *j = (const ts_attn_job *)ctx;
    const int64_t G = j->H / j->KVH, Dh = j->Dh, Dv = j->Dv, stride = G * (Dv + 2);
    const int64_t spans = j->n_spans, kvh = item / spans % j->KVH, unit = item / spans / j->KVH;
    /* the item's tokens: list entries [i0, i1) */
    const int64_t i0 = spans > 1 ? unit : j->tile_start[unit];
    const int64_t i1 = spans > 1 ? unit + 1 : j->tile_start[unit + 1], T = i1 - i0;
    int64_t lo[TS_ATTN_QTILE], hi[TS_ATTN_QTILE], n = 0, p_lo = INT64_MAX, p_hi = -1;
    for (int64_t i = 0; i < T; i++) {
        const int64_t t = j->tokens ? j->tokens[i0 + i] : i0 + i;
        ts_attn_range(j, t, &lo[i], &hi[i]);
        n += ts_attn_n_pieces(lo[i], hi[i]);
        if (hi[i] < lo[i]) continue;
        p_lo = lo[i] / TS_ATTN_PIECE < p_lo ? lo[i] / TS_ATTN_PIECE : p_lo;
        p_hi = hi[i] / TS_ATTN_PIECE > p_hi ? hi[i] / TS_ATTN_PIECE : p_hi;
    }
    /* work: q scaled (T, G, Dh) | the span's (G, BS + 1) + widened rows | spans == 1: pieces */
    const int64_t span_floats = G * (j->BS + 1) + j->BS * (Dh + Dv);
    const int64_t own = spans == 1 ? n * stride : 0;
    float *work = (float *)ts_scratch(2, sizeof(float) * (size_t)(T * G * Dh + span_floats + own));
    if (!work) abort(); /* a few hundred KB at most */
    float *qs = work, *span_work = qs + T * G * Dh, *pieces = span_work + span_floats;
    const int64_t t0 = j->tokens ? j->tokens[i0] : i0;
    for (int64_t i = 0; i < T; i++) {
        const int64_t t = j->tokens ? j->tokens[i0 + i] : i0 + i;
        const float *qt = j->q + (t * j->H + kvh * G) * Dh;
        for (int64_t e = 0; e < G * Dh; e++) qs[i * G * Dh + e] = qt[e] * j->scale;
    }
    ts_attn_query qv[TS_ATTN_QTILE];
    if (spans > 1) { /* one piece, left in part for ts_attn_merge_task */
        const int64_t c = item % spans;
        qv[0].q = qs;
        qv[0].acc = j->part + ((t0 * j->KVH + kvh) * spans + c) * stride;
        ts_attn_piece_range(lo[0], hi[0], c, &qv[0].lo, &qv[0].hi);
        ts_attn_pieces(j, t0, kvh, qv, 1, span_work);
        return;
    }
    /* absolute piece p of every token that has one, token i's pieces from first[i] on */
    int64_t first[TS_ATTN_QTILE];
    for (int64_t i = 0, at = 0; i < T; i++) {
        first[i] = at;
        at += ts_attn_n_pieces(lo[i], hi[i]);
    }
    for (int64_t p = p_lo; p <= p_hi; p++) {
        int64_t nq = 0;
        for (int64_t i = 0; i < T; i++) {
            const int64_t c = p - lo[i] / TS_ATTN_PIECE;
            if (hi[i] < lo[i] || c < 0 || c >= ts_attn_n_pieces(lo[i], hi[i])) continue;
            qv[nq].q = qs + i * G * Dh;
            qv[nq].acc = pieces + (first[i] + c) * stride;
            ts_attn_piece_range(lo[i], hi[i], c, &qv[nq].lo, &qv[nq].hi);
            nq++;
        }
        if (nq) ts_attn_pieces(j, t0, kvh, qv, nq, span_work);
    }
    for (int64_t i = 0; i < T; i++) {
        const int64_t t = j->tokens ? j->tokens[i0 + i] : i0 + i;
        float *o = j->out + (t * j->H + kvh * G) * Dv;
        for (int64_t g = 0; g < G; g++)
            ts_attn_merge(pieces + first[i] * stride, stride, ts_attn_n_pieces(lo[i], hi[i]), G,
                          Dv, g, o + g * Dv);
    }
}

/* n_spans > 1: out (t, h) = the token's pieces in part combined */
static void ts_attn_merge_task(void *ctx, int64_t th) {
    const ts_attn_job *j = (const ts_attn_job *)ctx;
    const int64_t G = j->H / j->KVH, Dv = j->Dv, h = th % j->H;
    const int64_t t = j->tokens ? j->tokens[th / j->H] : th / j->H;
    const int64_t kvh = h / G, stride = G * (Dv + 2);
    int64_t lo, hi;
    ts_attn_range(j, t, &lo, &hi);
    ts_attn_merge(j->part + (t * j->KVH + kvh) * j->n_spans * stride, stride,
                  ts_attn_n_pieces(lo, hi), G, Dv, h % G, j->out + (t * j->H + h) * Dv);
}

#endif
