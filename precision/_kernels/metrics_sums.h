/* The error sums of precision/metrics.py over float32 data, shared by the C passes that measure
 * (metrics_kernels.c, quant/_native/rtn_kernels.c).
 *
 * For reference x and approximation y (n elements each) one read of both computes, in double:
 * sum x^2, sum y^2, sum x*y, sum e^2 with e = y - x, max |e|, the count of non-finite y where x is
 * finite and the count of y == 0 where x != 0. Products of float32 values are exact in double.
 */
#ifndef LOWBIT_METRICS_SUMS_H
#define LOWBIT_METRICS_SUMS_H

#include <math.h>
#include <stdint.h>

#define SUM_LANES 8

typedef struct {
    double sxx, syy, sxy, see, mx;
    int64_t nonfinite, zeroed;
} Sums;

static inline void block_sums(const float *x, const float *y, int64_t n, Sums *out)
{
    double sxx[SUM_LANES] = {0}, syy[SUM_LANES] = {0}, sxy[SUM_LANES] = {0}, see[SUM_LANES] = {0},
           mx[SUM_LANES] = {0};
    int64_t nonfinite = 0, zeroed = 0, i = 0;
    for (; i + SUM_LANES <= n; i += SUM_LANES)
        for (int l = 0; l < SUM_LANES; l++) {
            const double a = x[i + l], b = y[i + l], e = b - a, ae = fabs(e);
            sxx[l] += a * a;
            syy[l] += b * b;
            sxy[l] += a * b;
            see[l] += e * e;
            mx[l] = ae > mx[l] ? ae : mx[l]; /* a NaN error is not a maximum */
            nonfinite += (!isfinite(b)) & (isfinite(a) != 0);
            zeroed += (b == 0.0) & (a != 0.0);
        }
    for (; i < n; i++) {
        const double a = x[i], b = y[i], e = b - a, ae = fabs(e);
        sxx[0] += a * a;
        syy[0] += b * b;
        sxy[0] += a * b;
        see[0] += e * e;
        mx[0] = ae > mx[0] ? ae : mx[0];
        nonfinite += (!isfinite(b)) & (isfinite(a) != 0);
        zeroed += (b == 0.0) & (a != 0.0);
    }
    Sums s = {0, 0, 0, 0, 0, nonfinite, zeroed};
    for (int l = 0; l < SUM_LANES; l++) {
        s.sxx += sxx[l];
        s.syy += syy[l];
        s.sxy += sxy[l];
        s.see += see[l];
        s.mx = mx[l] > s.mx ? mx[l] : s.mx;
    }
    *out = s;
}

/* t += s */
static inline void sums_add(Sums *t, const Sums *s)
{
    t->sxx += s->sxx;
    t->syy += s->syy;
    t->sxy += s->sxy;
    t->see += s->see;
    t->mx = s->mx > t->mx ? s->mx : t->mx;
    t->nonfinite += s->nonfinite;
    t->zeroed += s->zeroed;
}

/* out: sxx, syy, sxy, see, max |e|; counts: nonfinite, zeroed */
static inline void sums_store(const Sums *t, double *out, int64_t *counts)
{
    out[0] = t->sxx;
    out[1] = t->syy;
    out[2] = t->sxy;
    out[3] = t->see;
    out[4] = t->mx;
    counts[0] = t->nonfinite;
    counts[1] = t->zeroed;
}

/* the sums of n parts added in order (so the total does not depend on which thread made which part),
 * stored to out/counts */
static inline void sums_reduce_store(const Sums *part, int64_t n, double *out, int64_t *counts)
{
    Sums t = {0, 0, 0, 0, 0, 0, 0};
    for (int64_t c = 0; c < n; c++)
        sums_add(&t, part + c);
    sums_store(&t, out, counts);
}

#endif
