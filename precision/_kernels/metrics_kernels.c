/* Error metrics of an approximation in one pass (precision/metrics.py), float32 inputs.
 *
 * For reference x and approximation y (n elements each) one read of both computes, in double:
 * sum x^2, sum y^2, sum x*y, sum e^2 with e = y - x, max |e|, the count of non-finite y where x is
 * finite and the count of y == 0 where x != 0. Products of float32 values are exact in double; the
 * sums run in fixed blocks of BLOCK elements with eight accumulators each, and the block sums are
 * added in block order, so the result is the same for any thread count. Built and loaded by
 * precision/_native.py; the numpy path in metrics.py is the fallback and the tests compare them.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 65536
#define LANES 8

typedef struct {
    double sxx, syy, sxy, see, mx;
    int64_t nonfinite, zeroed;
} Sums;

static void block_sums(const float *x, const float *y, int64_t n, Sums *out)
{
    double sxx[LANES] = {0}, syy[LANES] = {0}, sxy[LANES] = {0}, see[LANES] = {0}, mx[LANES] = {0};
    int64_t nonfinite = 0, zeroed = 0, i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int l = 0; l < LANES; l++) {
            const double a = x[i + l], b = y[i + l], e = b - a, ae = fabs(e);
            sxx[l] += a * a;
            syy[l] += b * b;
            sxy[l] += a * b;
            see[l] += e * e;
            mx[l] = ae > mx[l] ? ae : mx[l]; /* a NaN error is not a maximum */
            nonfinite += !isfinite(b) & isfinite(a);
            zeroed += (b == 0.0) & (a != 0.0);
        }
    for (; i < n; i++) {
        const double a = x[i], b = y[i], e = b - a, ae = fabs(e);
        sxx[0] += a * a;
        syy[0] += b * b;
        sxy[0] += a * b;
        see[0] += e * e;
        mx[0] = ae > mx[0] ? ae : mx[0];
        nonfinite += !isfinite(b) & isfinite(a);
        zeroed += (b == 0.0) & (a != 0.0);
    }
    Sums s = {0, 0, 0, 0, 0, nonfinite, zeroed};
    for (int l = 0; l < LANES; l++) {
        s.sxx += sxx[l];
        s.syy += syy[l];
        s.sxy += sxy[l];
        s.see += see[l];
        s.mx = mx[l] > s.mx ? mx[l] : s.mx;
    }
    *out = s;
}

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
    for (int64_t k = 0; k < nb; k++) {
        t.sxx += part[k].sxx;
        t.syy += part[k].syy;
        t.sxy += part[k].sxy;
        t.see += part[k].see;
        t.mx = part[k].mx > t.mx ? part[k].mx : t.mx;
        t.nonfinite += part[k].nonfinite;
        t.zeroed += part[k].zeroed;
    }
    free(part);
    out[0] = t.sxx;
    out[1] = t.syy;
    out[2] = t.sxy;
    out[3] = t.see;
    out[4] = t.mx;
    counts[0] = t.nonfinite;
    counts[1] = t.zeroed;
    return 0;
}
