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

/* y[j] = table[code j] for m codes of `width` bytes from `codes` (bfloat16 bits shifted into float32
 * bits when table is NULL, NaN made the table's quiet NaN of the same sign), times s when scaled; returns how many codes were not below table_size
 * (their y is table[0]). */
static inline int64_t decode_run(const void *codes, int width, const float *table, int64_t table_size, int64_t m,
                                 int scaled, float s, float *y)
{
    int64_t bad = 0, j = 0;
#if defined(__AVX512F__)
    const __m512 vs = _mm512_set1_ps(s);
    const __m512i limit = _mm512_set1_epi32((int)(table_size < 65536 ? table_size : 65536));
    /* a table of at most 256 values sits in 16 registers: lookups by permutes, not gathers (slow on
     * many CPUs); entries past table_size hold table[0], and their codes are counted as bad anyway */
    __m512 reg[16];
    const int groups = table && width == 1 && table_size <= 256 ? (int)((table_size + 31) / 32) : 0;
    for (int g = 0; g < 2 * groups; g++) {
        float pad[16];
        for (int k = 0; k < 16; k++) pad[k] = 16 * g + k < table_size ? table[16 * g + k] : table[0];
        reg[g] = _mm512_loadu_ps(pad);
    }
    for (; j + 16 <= m; j += 16) {
        __m512 v;
        if (groups) {
            const __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)((const uint8_t *)codes + j)));
            const __m512i hi = _mm512_srli_epi32(c, 5);
            bad += 16 - __builtin_popcount((unsigned)_mm512_cmplt_epi32_mask(c, limit));
            v = _mm512_permutex2var_ps(reg[0], c, reg[1]); /* index bits 0-4 */
            for (int g = 1; g < groups; g++)
                v = _mm512_mask_blend_ps(_mm512_cmpeq_epi32_mask(hi, _mm512_set1_epi32(g)), v,
                                         _mm512_permutex2var_ps(reg[2 * g], c, reg[2 * g + 1]));
        } else if (!table) {
            const __m256i c = _mm256_loadu_si256((const __m256i *)((const uint16_t *)codes + j));
            const __m512i u = _mm512_slli_epi32(_mm512_cvtepu16_epi32(c), 16);
            const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                                          _mm512_set1_epi32(0x7f800000));
            v = _mm512_castsi512_ps(_mm512_mask_mov_epi32(u, nan, _mm512_or_si512(
                    _mm512_and_si512(u, _mm512_set1_epi32((int)0x80000000u)), _mm512_set1_epi32(0x7fc00000))));
        } else {
            const __m512i c = width == 1 ? _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)((const uint8_t *)codes + j)))
                                         : _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)codes + j)));
            const __mmask16 ok = _mm512_cmplt_epi32_mask(c, limit);
            bad += 16 - __builtin_popcount((unsigned)ok);
            v = _mm512_mask_i32gather_ps(_mm512_set1_ps(table[0]), ok, c, table, 4);
        }
        _mm512_storeu_ps(y + j, scaled ? _mm512_mul_ps(v, vs) : v);
    }
#endif
    for (; j < m; j++) {
        const int64_t code = width == 1 ? ((const uint8_t *)codes)[j] : ((const uint16_t *)codes)[j];
        float v;
        if (!table) {
            uint32_t u = (uint32_t)code << 16;
            if ((u & 0x7fffffffu) > 0x7f800000u) u = (u & 0x80000000u) | 0x7fc00000u; /* the table's NaN */
            memcpy(&v, &u, 4);
        } else {
            const int ok = code < table_size;
            bad += !ok;
            v = table[ok ? code : 0];
        }
        y[j] = scaled ? v * s : v;
    }
    return bad;
}

/* Decode and measure in one pass: y = table[code] (times scale, one per row of `cols` elements, or
 * one for all when nscale == 1; none when scale is NULL) for n codes of `width` bytes (1 or 2), each
 * below table_size; with table NULL the codes are bfloat16 bits (width 2), decoded exactly by a shift.
 * y is written to values when that is not NULL, and the sums of metrics_sums.h of y against x go to
 * out/counts. Rows are split into runs, whole rows per chunk, the chunks added in order, so the result
 * does not depend on the thread count. Returns 0, -1 without memory, -2 for a code outside the table
 * (nothing to trust then). */
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
    if (cols <= 0 || (width != 1 && width != 2) || (!table && width != 2)) return -2;
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
                bad += decode_run((const char *)codes + i * width, width, table, table_size, m, scale != NULL, s, y);
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
