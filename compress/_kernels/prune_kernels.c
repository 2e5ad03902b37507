/* Magnitude pruning of float32 data in a few passes (compress/_native.py).
 *
 * Selection: the bit patterns of |x| (x's bits without the sign) order the magnitudes of finite
 * floats as their values do, so the k-th smallest |x| is found exactly by a radix select on them:
 * a histogram of the high 16 bits finds the bin holding it, a histogram of the low 16 bits of the
 * values in that bin finds the value. Where a sample of the magnitudes brackets it, one pass finds it
 * instead (lowbit_magnitude_select). Ties at that value are pruned in index order, lowest first,
 * as compress.prune.smallest_k does.
 *
 * Apply: every element is pruned when its magnitude bits are below the threshold, or equal to it
 * and among the first `need` such elements; the mask (1 = kept) is packed eight per byte, first
 * element in the highest bit (numpy's packbits), the kept values are stored in order, the dense
 * result (kept values, +0 elsewhere) is written when asked for, and the error metrics of the dense
 * result against x are accumulated as precision/_kernels/metrics_sums.h defines them. The work is
 * split into chunks of a multiple of 8 elements: a counting pass gives each chunk its place in the
 * output and the ties before it, so the result does not depend on the thread count.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "../../precision/_kernels/metrics_sums.h"

#define BINS 65536
#define CHUNK (1 << 16) /* elements per chunk: a multiple of 8 */
#define RUN 1024

/* REVERSED[b]: b with its 8 bits in reverse order (a vector compare's mask has element 0 in bit 0, the
 * stored mask has it in bit 7) */
static const uint8_t REVERSED[256] = {
#define R2(n) n, n + 2 * 64, n + 1 * 64, n + 3 * 64
#define R4(n) R2(n), R2(n + 2 * 16), R2(n + 1 * 16), R2(n + 3 * 16)
#define R6(n) R4(n), R4(n + 2 * 4), R4(n + 1 * 4), R4(n + 3 * 4)
    R6(0), R6(2), R6(1), R6(3)
#undef R2
#undef R4
#undef R6
};

static inline uint32_t mag_bits(const float *x, int64_t i)
{
    uint32_t u;
    memcpy(&u, x + i, sizeof u);
    return u & 0x7fffffffu;
}

/* a[0..n) sorted ascending, by four counting passes of 8 bits through tmp (n values) */
static void radix_sort_u32(uint32_t *a, uint32_t *tmp, int64_t n)
{
    for (int shift = 0; shift < 32; shift += 8) {
        int64_t count[257] = {0};
        for (int64_t i = 0; i < n; i++) count[((a[i] >> shift) & 255u) + 1]++;
        for (int b = 0; b < 256; b++) count[b + 1] += count[b];
        for (int64_t i = 0; i < n; i++) tmp[count[(a[i] >> shift) & 255u]++] = a[i];
        uint32_t *t = a;
        a = tmp;
        tmp = t;
    }
}

/* The k-th smallest (1-based, 1 <= k <= n) of a[0..n), by two 16-bit histograms; hist: BINS int64 */
static uint32_t kth_smallest_u32(const uint32_t *a, int64_t n, int64_t k, int64_t *hist)
{
    memset(hist, 0, BINS * sizeof(int64_t));
    for (int64_t i = 0; i < n; i++) hist[a[i] >> 16]++;
    int64_t before = 0;
    uint32_t high = 0;
    while (before + hist[high] < k) before += hist[high++];
    memset(hist, 0, BINS * sizeof(int64_t));
    for (int64_t i = 0; i < n; i++)
        if ((a[i] >> 16) == high) hist[a[i] & 0xffffu]++;
    uint32_t low = 0;
    while (before + hist[low] < k) before += hist[low++];
    return (high << 16) | low;
}

#define SAMPLES 65536
#define SELECT_MIN (1 << 20) /* below this the two histogram passes cost little anyway */

/* The magnitude bits `thr` of the k-th smallest |x| (1 <= k <= n) and `need` = k - #{|x| < thr}, what
 * the two histogram passes below find, in one pass when a sample brackets it: the magnitudes of SAMPLES
 * evenly spaced elements, sorted, give bounds lo <= hi a few standard errors of the sample quantile
 * either side of k / n; one pass counts the elements below lo and collects those in [lo, hi]; the k-th
 * smallest is then selected among those. Exact whatever the sample: when the bounds do not hold it, or
 * more fall between them than room was made for, it returns 0 and the caller takes the histogram
 * passes. Returns 1 (found), 0 (not found), -1 without memory. */
int lowbit_magnitude_select(const float *x, int64_t n, int64_t k, uint32_t *thr_out, int64_t *need_out, int nthreads)
{
    if (n < SELECT_MIN || k < 1 || k > n) return 0;
    uint32_t *sample = malloc(2 * SAMPLES * sizeof(uint32_t));
    if (!sample) return -1;
    for (int64_t j = 0; j < SAMPLES; j++) sample[j] = mag_bits(x, (int64_t)((double)j * (double)n / SAMPLES));
    radix_sort_u32(sample, sample + SAMPLES, SAMPLES);
    const double p = (double)k / (double)n, d = 4.0 * sqrt(p * (1.0 - p) / SAMPLES) + 8.0 / SAMPLES;
    const int64_t li = (int64_t)floor((p - d) * SAMPLES), hi_i = (int64_t)ceil((p + d) * SAMPLES);
    const uint32_t lo = li <= 0 ? 0u : sample[li], hi = hi_i >= SAMPLES ? 0xffffffffu : sample[hi_i];
    free(sample);
    int nt = nthreads < 1 ? 1 : nthreads, used = 1;
#ifndef _OPENMP
    nt = 1;
#endif
    const int64_t per = (n + nt - 1) / nt;
    /* room for twice the expected share of candidates, per thread */
    const int64_t cap = (int64_t)(4.0 * d * (double)per) + 4096;
    uint32_t *cand = malloc(sizeof(uint32_t) * (size_t)(cap * nt));
    int64_t *below = calloc((size_t)nt, sizeof(int64_t)), *found = calloc((size_t)nt, sizeof(int64_t));
    int64_t *hist = malloc(BINS * sizeof(int64_t));
    int result = -1;
    if (!cand || !below || !found || !hist) goto done;
#pragma omp parallel num_threads(nt)
    {
        int t = 0, tn = 1;
#ifdef _OPENMP
        t = omp_get_thread_num();
        tn = omp_get_num_threads();
#endif
        if (t == 0) used = tn;
        /* a runtime that gives fewer threads leaves elements unread: the count check below then fails */
        const int64_t a = t * per, b = a + per < n ? a + per : n;
        uint32_t *mine = cand + t * cap;
        int64_t nb = 0, nc = 0, i = a;
#if defined(__AVX512F__)
        const __m512i absm = _mm512_set1_epi32(0x7fffffff), vlo = _mm512_set1_epi32((int)lo),
                      vhi = _mm512_set1_epi32((int)hi);
        for (; i + 16 <= b; i += 16) {
            const __m512i u = _mm512_and_si512(_mm512_loadu_si512((const void *)(x + i)), absm);
            const __mmask16 under = _mm512_cmplt_epu32_mask(u, vlo);
            const __mmask16 in = (__mmask16)(~under & _mm512_cmple_epu32_mask(u, vhi));
            nb += __builtin_popcount((unsigned)under);
            if (in) {
                const int c = __builtin_popcount((unsigned)in);
                if (nc + c > cap) { /* no room: the caller takes the histograms, so stop reading */
                    nc = cap + 1;
                    break;
                }
                _mm512_mask_storeu_epi32(mine + nc, (__mmask16)((1u << c) - 1), _mm512_maskz_compress_epi32(in, u));
                nc += c;
            }
        }
        if (nc > cap) i = b;
#endif
        for (; i < b; i++) {
            const uint32_t u = mag_bits(x, i);
            nb += u < lo;
            if (u >= lo && u <= hi) {
                if (nc == cap) {
                    nc = cap + 1;
                    break;
                }
                mine[nc++] = u;
            }
        }
        below[t] = nb;
        found[t] = nc;
    }
    int64_t nbelow = 0, ncand = 0, overflow = used != nt;
    for (int t = 0; t < used; t++) {
        nbelow += below[t];
        overflow |= found[t] > cap;
        if (found[t] <= cap) { /* the candidates, packed to the front */
            memmove(cand + ncand, cand + t * cap, sizeof(uint32_t) * (size_t)found[t]);
            ncand += found[t];
        }
    }
    result = 0;
    if (overflow || !(nbelow < k && k <= nbelow + ncand)) goto done;
    const uint32_t thr = kth_smallest_u32(cand, ncand, k - nbelow, hist);
    int64_t less = nbelow;
    for (int64_t j = 0; j < ncand; j++) less += cand[j] < thr;
    *thr_out = thr;
    *need_out = k - less;
    result = 1;
done:
    free(cand);
    free(below);
    free(found);
    free(hist);
    return result;
}

/* hist[b] = count of elements whose magnitude bits have (bits >> 16) == b when high != 0, or, with
 * high == 0, (bits & 0xffff) == b among those whose high 16 bits equal `bin`. hist: BINS int64, zeroed
 * here. Returns 0, or -1 without memory. */
int lowbit_magnitude_histogram(const float *x, int64_t n, int high, uint32_t bin, int64_t *hist, int nthreads)
{
    const int64_t nchunks = (n + CHUNK - 1) / CHUNK;
    int nt = nthreads < 1 ? 1 : nthreads;
    if (nt > nchunks) nt = nchunks > 0 ? (int)nchunks : 1;
    int64_t *local = calloc((size_t)nt * BINS, sizeof(int64_t));
    if (!local) return -1;
    int failed = 0;
#pragma omp parallel num_threads(nt) reduction(| : failed)
    {
        int t = 0, tn = 1;
#ifdef _OPENMP
        t = omp_get_thread_num();
        tn = omp_get_num_threads();
#endif
        int64_t *h = local + (int64_t)t * BINS;
        const int64_t per = (n + tn - 1) / tn, lo = t * per, hi = lo + per < n ? lo + per : n;
        if (high) {
            /* four counters per bin, for elements i mod 4: neighbours in one bin (the usual case) then
             * do not wait on each other's increments; 32-bit, added into h every 2^30 elements. The
             * sign bit is cleared, so the high 16 bits are below 2^15. */
            uint32_t *sub = calloc(4 * (BINS / 2), sizeof(uint32_t));
            if (!sub)
                failed = 1;
            else {
                for (int64_t p = lo; p < hi; p += (int64_t)1 << 30) {
                    const int64_t q = hi - p < ((int64_t)1 << 30) ? hi : p + ((int64_t)1 << 30);
                    int64_t i = p;
                    for (; i + 4 <= q; i += 4)
                        for (int j = 0; j < 4; j++)
                            sub[j * (BINS / 2) + (mag_bits(x, i + j) >> 16)]++;
                    for (; i < q; i++)
                        sub[mag_bits(x, i) >> 16]++;
                    for (int j = 0; j < 4; j++)
                        for (int64_t b = 0; b < BINS / 2; b++) {
                            h[b] += sub[j * (BINS / 2) + b];
                            sub[j * (BINS / 2) + b] = 0;
                        }
                }
                free(sub);
            }
        } else {
            int64_t i = lo;
#if defined(__AVX512F__)
            /* most elements lie outside the bin: a compare of sixteen at a time finds the few inside */
            const __m512i absm = _mm512_set1_epi32(0x7fffffff), vbin = _mm512_set1_epi32((int)bin);
            for (; i + 16 <= hi; i += 16) {
                const __m512i u = _mm512_and_si512(_mm512_loadu_si512((const void *)(x + i)), absm);
                for (unsigned k = _mm512_cmpeq_epi32_mask(_mm512_srli_epi32(u, 16), vbin); k; k &= k - 1)
                    h[mag_bits(x, i + __builtin_ctz(k)) & 0xffffu]++;
            }
#endif
            for (; i < hi; i++) {
                const uint32_t u = mag_bits(x, i);
                if ((u >> 16) == bin) h[u & 0xffffu]++;
            }
        }
    }
    if (failed) {
        free(local);
        return -1;
    }
    memset(hist, 0, BINS * sizeof(int64_t));
    for (int t = 0; t < nt; t++)
        for (int64_t b = 0; b < BINS; b++)
            hist[b] += local[(int64_t)t * BINS + b];
    free(local);
    return 0;
}

#if defined(__AVX512F__)
/* block_sums(x, y, m) for y = x where `mask` (packed bits, element 0 in the highest bit of byte 0) keeps
 * an element and +0 where it prunes it, without y: the same lanes and the same operations on each, so
 * the same bits (a kept element's error is +0, a pruned one's is -x; x * +0 and +0 add nothing). */
static inline void pruned_sums(const float *x, const uint8_t *mask, int64_t m, Sums *out)
{
    double sxx[SUM_LANES] = {0}, syy[SUM_LANES] = {0}, sxy[SUM_LANES] = {0}, see[SUM_LANES] = {0},
           mx[SUM_LANES] = {0};
    int64_t zeroed = 0, i = 0;
    __m512d vxx[2], vyy[2], vee[2], vmx[2];
    for (int h = 0; h < 2; h++)
        vxx[h] = vyy[h] = vee[h] = vmx[h] = _mm512_setzero_pd();
    const __m512d sign = _mm512_castsi512_pd(_mm512_set1_epi64(0x7fffffffffffffffLL)), nan = _mm512_set1_pd(NAN);
    const __m512i expo = _mm512_set1_epi32(0x7f800000);
    for (; i + SUM_LANES <= m; i += SUM_LANES) {
        const __mmask16 keep = (__mmask16)(REVERSED[mask[i / 8]] | (REVERSED[mask[i / 8 + 1]] << 8));
        const __m512 xs = _mm512_loadu_ps(x + i);
        zeroed += __builtin_popcount((unsigned)(~keep & _mm512_cmp_ps_mask(xs, _mm512_setzero_ps(), _CMP_NEQ_UQ) & 0xffffu));
        /* a kept inf or NaN has the error x - x = NaN, as block_sums finds */
        const __mmask16 bad = keep & _mm512_cmpeq_epi32_mask(_mm512_and_si512(_mm512_castps_si512(xs), expo), expo);
        for (int h = 0; h < 2; h++) {
            const __mmask8 kh = (__mmask8)(keep >> (8 * h));
            const __m512d a = _mm512_cvtps_pd(half(xs, h)), sq = _mm512_mul_pd(a, a);
            vxx[h] = _mm512_add_pd(vxx[h], sq);
            vyy[h] = _mm512_add_pd(vyy[h], _mm512_maskz_mov_pd(kh, sq));
            vee[h] = _mm512_add_pd(vee[h], _mm512_mask_mov_pd(_mm512_maskz_mov_pd((__mmask8)~kh, sq),
                                                              (__mmask8)(bad >> (8 * h)), nan));
            vmx[h] = _mm512_max_pd(_mm512_maskz_mov_pd((__mmask8)~kh, _mm512_and_pd(a, sign)), vmx[h]);
        }
    }
    for (int h = 0; h < 2; h++) {
        _mm512_storeu_pd(sxx + 8 * h, vxx[h]);
        _mm512_storeu_pd(syy + 8 * h, vyy[h]);
        _mm512_storeu_pd(sxy + 8 * h, vyy[h]); /* x * y = x * x where kept, and adds nothing elsewhere */
        _mm512_storeu_pd(see + 8 * h, vee[h]);
        _mm512_storeu_pd(mx + 8 * h, vmx[h]);
    }
    for (; i < m; i++) { /* the tail exactly as block_sums takes it */
        const double a = x[i], b = (mask[i / 8] >> (7 - i % 8)) & 1 ? a : 0.0, e = b - a, ae = fabs(e);
        sxx[0] += a * a;
        syy[0] += b * b;
        sxy[0] += a * b;
        see[0] += e * e;
        mx[0] = ae > mx[0] ? ae : mx[0];
        zeroed += (b == 0.0) & (a != 0.0);
    }
    lanes_store(sxx, syy, sxy, see, mx, 0, zeroed, out);
}
#endif

/* The apply pass over elements [lo, hi) (a whole chunk): `*tie` ties seen and `*out` kept values written
 * before it, both advanced; kept values go to values[*out ..] below `end` (past it to a sink, still
 * counted); sums added to *part when not NULL. */
static void apply_chunk(const float *x, int64_t lo, int64_t hi, uint32_t thr, int64_t need, int64_t *tie_io,
                        int64_t *out_io, int64_t end, uint8_t *mask, float *values, float *dense, Sums *part)
{
    int64_t tie = *tie_io, out = *out_io;
    float buf[RUN], sink;
    uint8_t keep[RUN];
    for (int64_t r = lo; r < hi; r += RUN) {
        const int64_t m = hi - r < RUN ? hi - r : RUN; /* a multiple of 8 except at the very end */
        const float *xr = x + r;
        float *y = dense ? dense + r : buf;
        int64_t i = 0;
#if defined(__AVX512F__)
        /* sixteen at a time while no element ties the threshold and the kept values stay within
         * this chunk's share; the scalar body below takes over from the first vector that does not */
        const __m512i vthr = _mm512_set1_epi32((int)thr), absm = _mm512_set1_epi32(0x7fffffff);
        for (; i + 16 <= m; i += 16) {
            const __m512 v = _mm512_loadu_ps(xr + i);
            const __m512i u = _mm512_and_si512(_mm512_castps_si512(v), absm);
            if (_mm512_cmpeq_epi32_mask(u, vthr)) break;
            const __mmask16 k = _mm512_cmpgt_epu32_mask(u, vthr);
            const int cnt = __builtin_popcount((unsigned)k);
            if (out + cnt > end) break;
            if (dense) _mm512_storeu_ps(y + i, _mm512_maskz_mov_ps(k, v));
            _mm512_mask_storeu_ps(values + out, (__mmask16)((1u << cnt) - 1), _mm512_maskz_compress_ps(k, v));
            out += cnt;
            mask[(r + i) / 8] = REVERSED[k & 0xff];
            mask[(r + i) / 8 + 1] = REVERSED[k >> 8];
        }
#endif
        if (i < m) {
            const int64_t i0 = i;
            int any_tie = 0;
            for (; i < m; i++) { /* vectorized: compares and a select */
                const uint32_t u = mag_bits(xr, i);
                keep[i] = u > thr;
                any_tie |= u == thr;
            }
            if (any_tie) /* ties are pruned lowest index first until `need` of them are */
                for (i = i0; i < m; i++)
                    if (mag_bits(xr, i) == thr) keep[i] = tie++ >= need;
            for (i = i0; i < m; i++)
                y[i] = keep[i] ? xr[i] : 0.0f;
            for (i = i0; i < m; i += 8) {
                const int64_t m8 = m - i < 8 ? m - i : 8;
                uint8_t byte = 0;
                for (int64_t j = 0; j < m8; j++)
                    byte |= (uint8_t)(keep[i + j] << (7 - j));
                mask[(r + i) / 8] = byte;
            }
            /* branch-free compaction: every value is written and the position advances when kept;
             * a write past this chunk's share would race the next chunk, so it goes to a sink */
            for (i = i0; i < m; i++) {
                *(out < end ? values + out : &sink) = xr[i];
                out += keep[i];
            }
        }
        if (part) {
            Sums sm;
#if defined(__AVX512F__)
            pruned_sums(xr, mask + r / 8, m, &sm);
#else
            block_sums(xr, y, m, &sm);
#endif
            sums_add(part, &sm);
        }
    }
    *tie_io = tie;
    *out_io = out;
}

/* mask: (n + 7) / 8 bytes; values: room for `capacity` floats; dense: n floats or NULL; sums (5) and
 * counts (2) or NULL. `thr` is the threshold's magnitude bits, `need` how many elements equal to it
 * are pruned (in index order). Returns the number of kept elements, -1 without memory, or -2 when they
 * would not be exactly `capacity` (the outputs then hold nothing to use; nothing is written past them).
 * On one thread the chunks run in order, carrying the tie count and the output position; on several a
 * counting pass first gives each chunk its place. The results are the same. */
int64_t lowbit_magnitude_apply(const float *x, int64_t n, uint32_t thr, int64_t need, uint8_t *mask, float *values,
                               int64_t capacity, float *dense, double *sums, int64_t *counts, int nthreads)
{
    const int64_t nchunks = (n + CHUNK - 1) / CHUNK;
    int64_t *less = calloc((size_t)(nchunks > 0 ? nchunks : 1), sizeof(int64_t));
    int64_t *equal = calloc((size_t)(nchunks > 0 ? nchunks : 1), sizeof(int64_t));
    Sums *part = sums ? calloc((size_t)(nchunks > 0 ? nchunks : 1), sizeof(Sums)) : NULL;
    int64_t result = -1;
    if (!less || !equal || (sums && !part)) goto done;
    if (nthreads <= 1 || nchunks <= 1) {
        int64_t tie = 0, out = 0;
        for (int64_t c = 0; c < nchunks; c++)
            apply_chunk(x, c * CHUNK, c * CHUNK + CHUNK < n ? c * CHUNK + CHUNK : n, thr, need, &tie, &out, capacity,
                        mask, values, dense, part ? part + c : NULL);
        if (out != capacity) {
            result = -2;
            goto done;
        }
    } else {
#pragma omp parallel for num_threads(nthreads) schedule(static)
        for (int64_t c = 0; c < nchunks; c++) {
            const int64_t lo = c * CHUNK, hi = lo + CHUNK < n ? lo + CHUNK : n;
            int64_t l = 0, e = 0;
            for (int64_t i = lo; i < hi; i++) {
                const uint32_t u = mag_bits(x, i);
                l += u < thr;
                e += u == thr;
            }
            less[c] = l;
            equal[c] = e;
        }
        /* exclusive prefixes: ties seen before each chunk and kept values written before it */
        int64_t ties = 0, kept = 0;
        for (int64_t c = 0; c < nchunks; c++) {
            const int64_t lo = c * CHUNK, len = (lo + CHUNK < n ? lo + CHUNK : n) - lo;
            const int64_t t = equal[c], pruned_ties = ties >= need ? 0 : (need - ties < t ? need - ties : t);
            equal[c] = ties;
            ties += t;
            const int64_t k = len - less[c] - pruned_ties;
            less[c] = kept;
            kept += k;
        }
        if (kept != capacity) {
            result = -2;
            goto done;
        }
#pragma omp parallel for num_threads(nthreads) schedule(static)
        for (int64_t c = 0; c < nchunks; c++) {
            /* the kept values of this chunk end where the next chunk's begin */
            int64_t tie = equal[c], out = less[c];
            apply_chunk(x, c * CHUNK, c * CHUNK + CHUNK < n ? c * CHUNK + CHUNK : n, thr, need, &tie, &out,
                        c + 1 < nchunks ? less[c + 1] : kept, mask, values, dense, part ? part + c : NULL);
        }
    }
    if (part) sums_reduce_store(part, nchunks, sums, counts);
    result = capacity;
done:
    free(less);
    free(equal);
    free(part);
    return result;
}
