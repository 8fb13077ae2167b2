/* Selection and ordering helpers for the top-k / top-p filter in ext/kernels.pyx. */
#ifndef TINYSERVE_KERNELS_SAMPLE_H
#define TINYSERVE_KERNELS_SAMPLE_H

#include <stdint.h>
#include <stdlib.h>

/* The k-th largest of x[0:n] (1-based k, duplicates counted), as np.partition(x, -k)[-k].
   Reorders x in place (quickselect, median of three). */
static double ts_kth_largest(double *x, int64_t n, int64_t k) {
    int64_t target = n - k, lo = 0, hi = n - 1;  /* index of the answer in ascending order */
    while (lo < hi) {
        int64_t mid = lo + (hi - lo) / 2;
        double a = x[lo], b = x[mid], c = x[hi];
        double pivot = (a < b) ? ((b < c) ? b : ((a < c) ? c : a)) : ((a < c) ? a : ((b < c) ? c : b));
        int64_t i = lo, j = hi;
        while (i <= j) {
            while (x[i] < pivot) i++;
            while (x[j] > pivot) j--;
            if (i <= j) {
                double t = x[i]; x[i] = x[j]; x[j] = t;
                i++; j--;
            }
        }
        if (target <= j) hi = j;
        else if (target >= i) lo = i;
        else return x[target];
    }
    return x[target];
}

typedef struct { double p; int64_t i; } ts_prob_idx;

/* Descending probability, ties by ascending index: the order of np.argsort(-p, kind="stable"). */
static int ts_cmp_prob_desc(const void *a, const void *b) {
    const ts_prob_idx *x = (const ts_prob_idx *)a, *y = (const ts_prob_idx *)b;
    if (x->p > y->p) return -1;
    if (x->p < y->p) return 1;
    return (x->i > y->i) - (x->i < y->i);
}

static void ts_sort_prob_desc(ts_prob_idx *v, int64_t n) { qsort(v, (size_t)n, sizeof(ts_prob_idx), ts_cmp_prob_desc); }

#endif
