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

typedef struct {
    double sxx, syy, sxy, see, mx;
    int64_t nonfinite, zeroed;
} Sums;

/* Lane l of the sums takes elements l, l + SUM_LANES, ... of a call; the tail (n mod SUM_LANES) goes
 * to lane 0 and the lanes are added in order at the end. The AVX-512 body below keeps exactly these
 * lanes (two vectors of 8 doubles) with the same separate multiply and add per element, so both
 * bodies give the same bits and a report does not depend on the CPU a worker runs on. */
#define SUM_LANES 16

#if defined(__AVX512F__)
#include <immintrin.h>

/* floats 8h .. 8h + 7 of v */
static inline __m256 half(__m512 v, int h)
{
    return h ? _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)) : _mm512_castps512_ps256(v);
}
#endif

/* *out = the lanes added in order (the one reduction every body of the sums ends with) */
static inline void lanes_store(const double *sxx, const double *syy, const double *sxy, const double *see,
                               const double *mx, int64_t nonfinite, int64_t zeroed, Sums *out)
{
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

static inline void block_sums(const float *x, const float *y, int64_t n, Sums *out)
{
    double sxx[SUM_LANES] = {0}, syy[SUM_LANES] = {0}, sxy[SUM_LANES] = {0}, see[SUM_LANES] = {0},
           mx[SUM_LANES] = {0};
    int64_t nonfinite = 0, zeroed = 0, i = 0;
#if defined(__AVX512F__)
    {
        __m512d vxx[2], vyy[2], vxy[2], vee[2], vmx[2];
        for (int h = 0; h < 2; h++)
            vxx[h] = vyy[h] = vxy[h] = vee[h] = vmx[h] = _mm512_setzero_pd();
        const __m512i expo = _mm512_set1_epi32(0x7f800000);
        const __m512d sign = _mm512_castsi512_pd(_mm512_set1_epi64(0x7fffffffffffffffLL));
        for (; i + SUM_LANES <= n; i += SUM_LANES) {
            const __m512 xs = _mm512_loadu_ps(x + i), ys = _mm512_loadu_ps(y + i);
            const __m512i xb = _mm512_castps_si512(xs), yb = _mm512_castps_si512(ys);
            /* not finite: all exponent bits set; x != 0 and y == 0 as float compares (as in double) */
            const __mmask16 xfin = _mm512_cmpneq_epi32_mask(_mm512_and_si512(xb, expo), expo);
            const __mmask16 ybad = _mm512_cmpeq_epi32_mask(_mm512_and_si512(yb, expo), expo);
            const __mmask16 z = _mm512_cmp_ps_mask(ys, _mm512_setzero_ps(), _CMP_EQ_OQ) &
                                _mm512_cmp_ps_mask(xs, _mm512_setzero_ps(), _CMP_NEQ_UQ);
            nonfinite += __builtin_popcount((unsigned)(xfin & ybad));
            zeroed += __builtin_popcount((unsigned)z);
            for (int h = 0; h < 2; h++) {
                const __m512d a = _mm512_cvtps_pd(half(xs, h));
                const __m512d b = _mm512_cvtps_pd(half(ys, h));
                const __m512d e = _mm512_sub_pd(b, a);
                vxx[h] = _mm512_add_pd(vxx[h], _mm512_mul_pd(a, a));
                vyy[h] = _mm512_add_pd(vyy[h], _mm512_mul_pd(b, b));
                vxy[h] = _mm512_add_pd(vxy[h], _mm512_mul_pd(a, b));
                vee[h] = _mm512_add_pd(vee[h], _mm512_mul_pd(e, e));
                /* max_pd returns its second operand when the first is NaN: a NaN error is not a maximum */
                vmx[h] = _mm512_max_pd(_mm512_and_pd(e, sign), vmx[h]);
            }
        }
        for (int h = 0; h < 2; h++) {
            _mm512_storeu_pd(sxx + 8 * h, vxx[h]);
            _mm512_storeu_pd(syy + 8 * h, vyy[h]);
            _mm512_storeu_pd(sxy + 8 * h, vxy[h]);
            _mm512_storeu_pd(see + 8 * h, vee[h]);
            _mm512_storeu_pd(mx + 8 * h, vmx[h]);
        }
    }
#endif
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
    lanes_store(sxx, syy, sxy, see, mx, nonfinite, zeroed, out);
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
