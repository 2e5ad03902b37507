/* Error metrics of an approximation in one pass (precision/metrics.py), float32 inputs.
 *
 * The sums of metrics_sums.h run in fixed blocks of BLOCK elements, and the block sums are added in
 * block order, so the result is the same for any thread count. Built and loaded by
 * precision/_native.py; the numpy path in metrics.py is the fallback and the tests compare them.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "metrics_sums.h"

#define BLOCK 65536

/* out: sxx, syy, sxy, see, max |e|; counts: nonfinite, zeroed. Returns 0, or -1 without memory. */
int64_t lowbit_metrics_f32(const float *x, const float *y, int64_t n, double *out, int64_t *counts, int nthreads)
{
    const int64_t nb = n > 0 ? (n + BLOCK - 1) / BLOCK : 0;
    Sums *part = malloc(sizeof(Sums) * (size_t)(nb > 0 ? nb : 1));
    if (!part) return -1;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (nb > 4)
    for (int64_t k = 0; k < nb; k++) {
        const int64_t lo = k * BLOCK, hi = lo + BLOCK < n ? lo + BLOCK : n;
        block_sums(x + lo, y + lo, hi - lo, part + k);
    }
    Sums t = {0, 0, 0, 0, 0, 0, 0};
    for (int64_t k = 0; k < nb; k++)
        sums_add(&t, part + k);
    free(part);
    sums_store(&t, out, counts);
    return 0;
}

/* 1 when none of the n float32 values is NaN or inf (all exponent bits set), else 0. */
int lowbit_all_finite_f32(const float *x, int64_t n, int nthreads)
{
    const uint32_t *u = (const uint32_t *)x;
    uint32_t bad = 0;
#pragma omp parallel for num_threads(nthreads) schedule(static) reduction(| : bad) if (n >= 4 * BLOCK)
    for (int64_t i = 0; i < n; i++)
        bad |= (u[i] & 0x7f800000u) == 0x7f800000u;
    return !bad;
}
