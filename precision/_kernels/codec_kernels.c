/* Codec passes for precision/codec.py (table lookups and the bf16 shift), one pass each where numpy
 * needs two to eight.
 *
 * Built and loaded by precision/_native.py. The tables are computed in Python by lowbit's exact
 * algorithm; these loops only index them, with the very index formula of the numpy path, so the
 * results are bit-identical to it (tests check both against each other and against ml_dtypes).
 *
 * The table passes deal blocks of BLOCK_BYTES of output to the threads round-robin, as the numpy path
 * does (the first write to a fresh output faults its pages in; contiguous halves measured the same
 * here); the bf16 shift takes contiguous halves, measured faster (see there).
 */
#include <stdint.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define BLOCK_BYTES (2 << 20)
#define PARALLEL_MIN (1 << 20)

/* float32 -> <=8-bit format with <= 6 mantissa bits: out = table[(sign << 16) | (2 * (|x| >> 16) +
 * (low 16 bits of |x| != 0))] over the float32 bit patterns x. Returns how many outputs are 0xFF
 * (the marker the table uses for NaN in formats without a NaN code). */
int64_t lowbit_encode_f32_byte(const uint32_t *x, int64_t n, const uint8_t *table, uint8_t *out, int nthreads)
{
    const int64_t block = BLOCK_BYTES;
    const int64_t nblocks = (n + block - 1) / block;
    int64_t marked = 0;
#pragma omp parallel for schedule(static, 1) num_threads(nthreads) reduction(+ : marked) if (n >= PARALLEL_MIN)
    for (int64_t k = 0; k < nblocks; k++) {
        const int64_t lo = k * block, hi = lo + block < n ? lo + block : n;
        int64_t m = 0, i = lo;
#ifdef __AVX512F__
        /* 16 lanes: the same index, a dword gather at byte offsets (the table carries 3 bytes of
         * padding so the last entry's dword read stays inside it), the low byte kept */
        const __m512i mag = _mm512_set1_epi32(0x7fffffff), ffff = _mm512_set1_epi32(0xffff);
        const __m512i sbit = _mm512_set1_epi32(0x10000), ff = _mm512_set1_epi32(0xff);
        for (; i + 16 <= hi; i += 16) {
            const __m512i c = _mm512_loadu_si512((const void *)(x + i));
            const __m512i a = _mm512_and_si512(c, mag);
            __m512i idx = _mm512_add_epi32(_mm512_srli_epi32(a, 16), _mm512_srli_epi32(_mm512_add_epi32(a, ffff), 16));
            idx = _mm512_add_epi32(idx, _mm512_and_si512(_mm512_srli_epi32(c, 15), sbit));
            const __m512i v = _mm512_and_si512(_mm512_i32gather_epi32(idx, (const void *)table, 1), ff);
            _mm_storeu_si128((__m128i *)(out + i), _mm512_cvtepi32_epi8(v));
            m += __builtin_popcount(_mm512_cmpeq_epi32_mask(v, ff));
        }
#endif
        for (; i < hi; i++) {
            const uint32_t c = x[i], a = c & 0x7fffffffu;
            const uint32_t idx = (a >> 16) + ((a + 0xffffu) >> 16) + ((c >> 15) & 0x10000u);
            const uint8_t v = table[idx];
            out[i] = v;
            m += v == 0xff;
        }
        marked += m;
    }
    return marked;
}

/* codes -> float32 bit patterns by table: out[i] = table[codes[i]], 8-bit codes. */
void lowbit_decode_u8(const uint8_t *codes, int64_t n, const uint32_t *table, uint32_t *out, int nthreads)
{
    const int64_t block = BLOCK_BYTES / 4;
    const int64_t nblocks = (n + block - 1) / block;
#pragma omp parallel for schedule(static, 1) num_threads(nthreads) if (n >= PARALLEL_MIN)
    for (int64_t k = 0; k < nblocks; k++) {
        const int64_t lo = k * block, hi = lo + block < n ? lo + block : n;
        int64_t i = lo;
#ifdef __AVX512F__
        for (; i + 16 <= hi; i += 16) {
            const __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(codes + i)));
            _mm512_storeu_si512((void *)(out + i), _mm512_i32gather_epi32(idx, (const void *)table, 4));
        }
#endif
        for (; i < hi; i++) out[i] = table[codes[i]];
    }
}

/* the same for 16-bit codes (the caller guarantees every code indexes the table) */
void lowbit_decode_u16(const uint16_t *codes, int64_t n, const uint32_t *table, uint32_t *out, int nthreads)
{
    const int64_t block = BLOCK_BYTES / 4;
    const int64_t nblocks = (n + block - 1) / block;
#pragma omp parallel for schedule(static, 1) num_threads(nthreads) if (n >= PARALLEL_MIN)
    for (int64_t k = 0; k < nblocks; k++) {
        const int64_t lo = k * block, hi = lo + block < n ? lo + block : n;
        int64_t i = lo;
#ifdef __AVX512F__
        for (; i + 16 <= hi; i += 16) {
            const __m512i idx = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(codes + i)));
            _mm512_storeu_si512((void *)(out + i), _mm512_i32gather_epi32(idx, (const void *)table, 4));
        }
#endif
        for (; i < hi; i++) out[i] = table[codes[i]];
    }
}

/* codes of a format that is the top of float32 (8 exponent bits, bias 127, ieee specials: bf16) ->
 * float32 bit patterns: out[i] = codes[i] << shift. Threads take contiguous parts: for this
 * store-bound loop that faulted a fresh output in fastest here (bf16, 16M codes: 6.0 ms against
 * 6.8 ms in 2 MiB blocks round-robin and 8.8 ms on one thread). */
void lowbit_decode_top16(const uint16_t *codes, int64_t n, int shift, uint32_t *out, int nthreads)
{
#pragma omp parallel for schedule(static) num_threads(nthreads) if (n >= PARALLEL_MIN)
    for (int64_t i = 0; i < n; i++) out[i] = (uint32_t)codes[i] << shift;
}
