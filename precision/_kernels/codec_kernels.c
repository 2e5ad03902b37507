/* Codec passes for precision/codec.py (table lookups and the bf16 shift), one pass each where numpy
 * needs two to eight.
 *
 * Built and loaded by precision/_native.py. The tables are computed in Python by lowbit's exact
 * algorithm; these loops only index them, with the very index formula of the numpy path, so the
 * results are bit-identical to it (tests check both against each other and against ml_dtypes).
 */
#include <math.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
static inline void spin_pause(void) { _mm_pause(); }
#else
static inline void spin_pause(void) {}
#endif

#include "block_range.h"

#define BLOCK_BYTES (2 << 20) /* of output: one huge page */
#define PARALLEL_MIN (1 << 20)

/* One block of work: elements [lo, hi). Returns a count the runner sums (or 0). */
typedef int64_t (*block_fn)(const void *args, int64_t lo, int64_t hi);

/* Run f over [0, n) in blocks of BLOCK_BYTES of output (itemsize bytes per element), on nthreads.
 *
 * These loops are so cheap that faulting in the fresh output's pages is most of their time, and two
 * threads faulting pages at once can stall each other. So one thread faults the pages in, a block at
 * a time, in order, and every thread (that one too, once done) processes each block as soon as its
 * pages are in: page faults never overlap and the work hides behind them. */
static int64_t run_blocks(int64_t n, int64_t itemsize, void *out, int nthreads, block_fn f, const void *args)
{
    const int64_t block = BLOCK_BYTES / itemsize;
    const int64_t nblocks = (n + block - 1) / block;
    if (n < PARALLEL_MIN || nthreads < 2)
        return f(args, 0, n);
    int64_t total = 0;
#ifdef _OPENMP
    _Atomic int64_t faulted = 0, next = 0;
#pragma omp parallel num_threads(nthreads) reduction(+ : total)
    {
        if (omp_get_thread_num() == 0) {
            volatile char *p = (volatile char *)out;
            for (int64_t k = 0; k < nblocks; k++) {
                const int64_t lo = k * block * itemsize, hi = (k + 1 < nblocks ? (k + 1) * block : n) * itemsize;
                for (int64_t b = lo; b < hi; b += 4096) p[b] = 0;
                p[hi - 1] = 0;
                atomic_store_explicit(&faulted, k + 1, memory_order_release);
            }
        }
        for (;;) {
            const int64_t k = atomic_fetch_add_explicit(&next, 1, memory_order_relaxed);
            if (k >= nblocks) break;
            while (atomic_load_explicit(&faulted, memory_order_acquire) <= k) spin_pause();
            total += f(args, k * block, k + 1 < nblocks ? (k + 1) * block : n);
        }
    }
#else
    (void)nblocks;
    (void)out;
    total = f(args, 0, n);
#endif
    return total;
}

/* ---- float32 -> <=8-bit format with <= 6 mantissa bits:
 * out = table[(sign << 16) | (2 * (|x| >> 16) + (low 16 bits of |x| != 0))] over the float32 bit
 * patterns x. Counts the outputs equal to 0xFF (the marker the table uses for NaN in formats
 * without a NaN code). */
struct encode_args {
    const uint32_t *x;
    const uint8_t *table;
    uint8_t *out;
};

static inline uint8_t encode_one(uint32_t c, const uint8_t *table)
{
    const uint32_t v0 = c & 0x7fffffffu;
    return table[(v0 >> 16) + ((v0 + 0xffffu) >> 16) + ((c >> 15) & 0x10000u)];
}

#ifdef __AVX512F__
/* encode_one on 16 lanes: the same index, a dword gather at byte offsets (the table carries 3 bytes
 * of padding so the last entry's dword read stays inside it), the low byte kept (as dwords) */
static inline __m512i encode16(__m512i c, const uint8_t *table)
{
    const __m512i v0 = _mm512_and_si512(c, _mm512_set1_epi32(0x7fffffff));
    __m512i idx = _mm512_add_epi32(_mm512_srli_epi32(v0, 16),
                                   _mm512_srli_epi32(_mm512_add_epi32(v0, _mm512_set1_epi32(0xffff)), 16));
    idx = _mm512_add_epi32(idx, _mm512_and_si512(_mm512_srli_epi32(c, 15), _mm512_set1_epi32(0x10000)));
    return _mm512_and_si512(_mm512_i32gather_epi32(idx, (const void *)table, 1), _mm512_set1_epi32(0xff));
}
#endif

static int64_t encode_block(const void *args, int64_t lo, int64_t hi)
{
    const struct encode_args *a = args;
    const uint32_t *x = a->x;
    const uint8_t *table = a->table;
    uint8_t *out = a->out;
    int64_t m = 0, i = lo;
#ifdef __AVX512F__
    const __m512i ff = _mm512_set1_epi32(0xff);
    for (; i + 16 <= hi; i += 16) {
        const __m512i v = encode16(_mm512_loadu_si512((const void *)(x + i)), table);
        _mm_storeu_si128((__m128i *)(out + i), _mm512_cvtepi32_epi8(v));
        m += __builtin_popcount(_mm512_cmpeq_epi32_mask(v, ff));
    }
#endif
    for (; i < hi; i++) {
        const uint8_t v = encode_one(x[i], table);
        out[i] = v;
        m += v == 0xff;
    }
    return m;
}

int64_t lowbit_encode_f32_byte(const uint32_t *x, int64_t n, const uint8_t *table, uint8_t *out, int nthreads)
{
    const struct encode_args a = {x, table, out};
    return run_blocks(n, 1, out, nthreads, encode_block, &a);
}

/* ---- the same encode of x / scale[row] (x: rows x cols float32, one float32 scale per row), the
 * division done here as one IEEE float32 division per element (what numpy's a / scale does), so a
 * scaled cast needs no float32 temporary of the whole tensor. */
struct encode_scaled_args {
    const float *x;
    const float *scale;
    int64_t cols;
    const uint8_t *table;
    uint8_t *out;
};

static int64_t encode_scaled_block(const void *args, int64_t lo, int64_t hi)
{
    const struct encode_scaled_args *a = args;
    const uint8_t *table = a->table;
    int64_t i = lo;
    while (i < hi) {
        const int64_t row = i / a->cols, end = (row + 1) * a->cols < hi ? (row + 1) * a->cols : hi;
        const float s = a->scale[row];
#ifdef __AVX512F__
        const __m512 sv = _mm512_set1_ps(s);
        for (; i + 16 <= end; i += 16) {
            const __m512i c = _mm512_castps_si512(_mm512_div_ps(_mm512_loadu_ps(a->x + i), sv));
            _mm_storeu_si128((__m128i *)(a->out + i), _mm512_cvtepi32_epi8(encode16(c, table)));
        }
#endif
        for (; i < end; i++) {
            const float q = a->x[i] / s;
            uint32_t c;
            memcpy(&c, &q, sizeof c);
            a->out[i] = encode_one(c, table);
        }
    }
    return 0;
}

void lowbit_encode_f32_byte_scaled(const float *x, int64_t rows, int64_t cols, const float *scale, const uint8_t *table,
                                   uint8_t *out, int nthreads)
{
    const struct encode_scaled_args a = {x, scale, cols, table, out};
    run_blocks(rows * cols, 1, out, nthreads, encode_scaled_block, &a);
}

/* ---- float32 -> an 8-bit-or-narrower IEEE-like format (ieee specials: inf and NaN at the top
 * exponent), nearest-even, ieee overflow, by integer arithmetic on the float32 bits instead of a table
 * gather: normal results re-bias the exponent and round the dropped bits to nearest even in one add;
 * subnormal results add a power of two whose float32 ulp is the smallest subnormal, so the float add
 * itself rounds |x| to nearest even in those units (the sum's low bits are then the code); |x| at or
 * above the overflow threshold gives inf, NaN gives
 * the format's canonical NaN; the sign is copied. The same rounding as the exact algorithm (tested over
 * every float32 pattern against it and ml_dtypes). */
struct ieee8_args {
    const uint32_t *x;
    uint8_t *out;
    uint32_t shift, rebias, min_normal, threshold, inf_code, nan_code, magic_bits, sign_shift;
    float magic;
};

static int64_t ieee8_block(const void *args, int64_t lo, int64_t hi)
{
    const struct ieee8_args *a = args;
    const uint32_t *x = a->x;
    uint8_t *out = a->out;
    const uint32_t shift = a->shift, rebias = a->rebias, half = (1u << (shift - 1)) - 1;
    for (int64_t i = lo; i < hi; i++) {
        const uint32_t b = x[i], v = b & 0x7fffffffu, s = (b >> 31) << a->sign_shift;
        float f;
        memcpy(&f, &v, sizeof f);
        const uint32_t normal = (v + rebias + half + ((v >> shift) & 1u)) >> shift;
        const float g = f + a->magic; /* the value is discarded below unless |x| is subnormal in the format */
        uint32_t gb;
        memcpy(&gb, &g, sizeof gb);
        const uint32_t sub = gb - a->magic_bits;
        uint32_t c = v < a->min_normal ? sub : normal;
        c = v >= a->threshold ? a->inf_code : c;
        c = v > 0x7f800000u ? a->nan_code : c;
        out[i] = (uint8_t)(c | s);
    }
    return 0;
}

void lowbit_encode_f32_ieee8(const uint32_t *x, int64_t n, int bits, int mantissa_bits, int bias, uint32_t threshold,
                             int inf_code, int nan_code, uint8_t *out, int nthreads)
{
    /* the float32 whose ulp is 2^(1 - bias - m), the smallest subnormal of the format */
    const float magic = ldexpf(1.0f, 24 - bias - mantissa_bits);
    uint32_t magic_bits;
    memcpy(&magic_bits, &magic, sizeof magic_bits);
    struct ieee8_args a = {x, out, (uint32_t)(23 - mantissa_bits), (uint32_t)(bias - 127) << 23,
                           (uint32_t)(128 - bias) << 23, threshold, (uint32_t)inf_code, (uint32_t)nan_code,
                           magic_bits, (uint32_t)(bits - 1), magic};
    run_blocks(n, 1, out, nthreads, ieee8_block, &a);
}

/* ---- codes -> float32 bit patterns by table: out[i] = table[codes[i] & mask], codes of 1 or 2 bytes.
 * The table has mask + 1 entries (a power of two). The caller checks every code, but another thread
 * may change the codes while this pass reads them without the GIL: the mask keeps every read inside
 * the table whatever the codes hold then. */
struct decode_args {
    const void *codes;
    int width;
    const uint32_t *table;
    uint32_t mask;
    uint32_t *out;
};

static inline uint32_t code_at(const struct decode_args *a, int64_t i)
{
    return (a->width == 1 ? ((const uint8_t *)a->codes)[i] : ((const uint16_t *)a->codes)[i]) & a->mask;
}

static int64_t decode_block(const void *args, int64_t lo, int64_t hi)
{
    const struct decode_args *a = args;
    int64_t i = lo;
#ifdef __AVX512F__
    for (; i + 16 <= hi; i += 16) {
        const __m512i idx = a->width == 1
            ? _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)((const uint8_t *)a->codes + i)))
            : _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)a->codes + i)));
        const __m512i in = _mm512_and_si512(idx, _mm512_set1_epi32((int)a->mask));
        _mm512_storeu_si512((void *)(a->out + i), _mm512_i32gather_epi32(in, (const void *)a->table, 4));
    }
#endif
    for (; i < hi; i++) a->out[i] = a->table[code_at(a, i)];
    return 0;
}

void lowbit_decode_table(const void *codes, int width, int64_t n, const uint32_t *table, int64_t table_size,
                         uint32_t *out, int nthreads)
{
    if (table_size < 1 || (table_size & (table_size - 1)) || table_size > 65536) return;
    const struct decode_args a = {codes, width, table, (uint32_t)(table_size - 1), out};
    run_blocks(n, 4, out, nthreads, decode_block, &a);
}

/* ---- codes of a format that is the top of float32 (8 exponent bits, bias 127, ieee specials: bf16)
 * -> float32 bit patterns: out[i] = codes[i] << shift */
struct shift_args {
    const uint16_t *codes;
    int shift;
    uint32_t *out;
};

static int64_t shift_block(const void *args, int64_t lo, int64_t hi)
{
    const struct shift_args *a = args;
    const uint16_t *codes = a->codes;
    uint32_t *out = a->out;
    const int shift = a->shift;
    for (int64_t i = lo; i < hi; i++) out[i] = (uint32_t)codes[i] << shift;
    return 0;
}

void lowbit_decode_top16(const uint16_t *codes, int64_t n, int shift, uint32_t *out, int nthreads)
{
    const struct shift_args a = {codes, shift, out};
    run_blocks(n, 4, out, nthreads, shift_block, &a);
}

/* amax[r] = max(max of row r, -min of row r) for the rows x cols float32 matrix x: what the scaled
 * casts' numpy path computes (precision/cast.py), in one read. Rows are cut into blocks of RANGE_BLOCK
 * values spread over the threads; a minimum or maximum is exact in any order, so the result does not
 * depend on the thread count. Returns 1, 0 when a value is NaN or inf (amax unspecified), -1 without
 * memory. */
#define RANGE_BLOCK 65536
int lowbit_row_absmax(const float *x, int64_t rows, int64_t cols, float *amax, int nthreads)
{
    if (rows <= 0 || cols <= 0) return 1;
    const int64_t per = (cols + RANGE_BLOCK - 1) / RANGE_BLOCK, nb = rows * per;
    float *lo = malloc(sizeof(float) * (size_t)nb), *hi = malloc(sizeof(float) * (size_t)nb);
    if (!lo || !hi) {
        free(lo);
        free(hi);
        return -1;
    }
    int finite = 1;
#pragma omp parallel for num_threads(nthreads) schedule(static) reduction(& : finite) if (nb > 1 && rows * cols >= PARALLEL_MIN)
    for (int64_t b = 0; b < nb; b++) {
        const int64_t r = b / per, c0 = (b % per) * RANGE_BLOCK, len = cols - c0 < RANGE_BLOCK ? cols - c0 : RANGE_BLOCK;
        finite &= block_range(x + r * cols + c0, len, lo + b, hi + b);
    }
    for (int64_t r = 0; r < rows; r++) {
        float a = lo[r * per], b = hi[r * per];
        for (int64_t k = 1; k < per; k++) {
            a = lo[r * per + k] < a ? lo[r * per + k] : a;
            b = hi[r * per + k] > b ? hi[r * per + k] : b;
        }
        amax[r] = b > -a ? b : -a;
    }
    free(lo);
    free(hi);
    return finite;
}
