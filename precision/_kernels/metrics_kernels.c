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
    sums_reduce_store(part, nb, out, counts);
    free(part);
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

/* Decode and measure in one pass: y = table[code] (times scale, one per row of `cols` elements, or
 * one for all when nscale == 1; none when scale is NULL) for n codes of `width` bytes (1 or 2), each
 * below table_size; y is written to values when that is not NULL, and the sums of metrics_sums.h of
 * y against x go to out/counts. Rows are split into runs, whole rows per chunk, the chunks added in
 * order, so the result does not depend on the thread count. Returns 0, -1 without memory, -2 for
 * a code outside the table (nothing to trust then). */
#define RUN 1024
int64_t lowbit_decode_measure(const void *codes, int width, const float *table, int64_t table_size, const float *x,
                              int64_t n, int64_t cols, const float *scale, int64_t nscale, float *values,
                              double *out, int64_t *counts, int nthreads)
{
    if (n <= 0) {
        Sums z = {0, 0, 0, 0, 0, 0, 0};
        sums_store(&z, out, counts);
        return 0;
    }
    if (cols <= 0 || (width != 1 && width != 2)) return -2;
    const int64_t rows = (n + cols - 1) / cols;
    const int64_t per = cols >= BLOCK ? 1 : BLOCK / cols; /* rows per chunk */
    const int64_t nchunks = (rows + per - 1) / per;
    Sums *part = calloc((size_t)nchunks, sizeof(Sums));
    if (!part) return -1;
    int64_t bad = 0;
#pragma omp parallel for num_threads(nthreads) schedule(static) reduction(+ : bad) if (nchunks > 1 && n >= 4 * BLOCK)
    for (int64_t c = 0; c < nchunks; c++) {
        float buf[RUN];
        const int64_t r1 = (c + 1) * per < rows ? (c + 1) * per : rows;
        for (int64_t r = c * per; r < r1; r++) {
            const float s = scale ? scale[nscale == 1 ? 0 : r] : 1.0f;
            const int64_t lo = r * cols, hi = lo + cols < n ? lo + cols : n;
            for (int64_t i = lo; i < hi; i += RUN) {
                const int64_t m = hi - i < RUN ? hi - i : RUN;
                float *y = values ? values + i : buf;
                for (int64_t j = 0; j < m; j++) {
                    const int64_t code = width == 1 ? ((const uint8_t *)codes)[i + j] : ((const uint16_t *)codes)[i + j];
                    const int ok = code < table_size;
                    bad += !ok;
                    const float v = table[ok ? code : 0];
                    y[j] = scale ? v * s : v;
                }
                Sums sm;
                block_sums(x + i, y, m, &sm);
                sums_add(part + c, &sm);
            }
        }
    }
    sums_reduce_store(part, nchunks, out, counts);
    free(part);
    return bad ? -2 : 0;
}
