/* NVFP4 block encoding for precision/blocks.py in two passes instead of numpy's dozen.
 *
 * Built and loaded by precision/_native.py. Each step is the numpy path's own arithmetic:
 *   pass 1: each block's float32 amax (and the tensor's);
 *   pass 2: the block scale (amax / 6) / t in float32, clipped to [2**-6, 448], rounded to e4m3 (nearest
 *           even; every such value is a normal e4m3 number, so the rounding is of the float32 bits), then
 *           each element x / (scale * t) rounded to fp4 e2m1 nearest-even with saturation, decided by
 *           exact comparisons (see lowbit_nvfp4_encode): the exact single rounding the numpy path does.
 * Finite input only (the caller checks). The tests compare both paths bit for bit.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

/* pass 1: amax of each block of k floats; returns the largest */
float lowbit_block_amax(const float *x, int64_t nblocks, int64_t k, float *amax, int nthreads)
{
    float top = 0.0f;
#pragma omp parallel for num_threads(nthreads) schedule(static) reduction(max : top) if (nblocks * k >= (1 << 20))
    for (int64_t b = 0; b < nblocks; b++) {
        const float *p = x + b * k;
        float m = 0.0f;
        for (int64_t i = 0; i < k; i++) {
            const float a = fabsf(p[i]);
            m = a > m ? a : m;
        }
        amax[b] = m;
        top = m > top ? m : top;
    }
    return top;
}

/* e4m3fn code of a float32 in [2**-6, 448], nearest even */
static inline uint8_t e4m3_code(float v)
{
    uint32_t bits;
    memcpy(&bits, &v, 4);
    int32_t e = (int32_t)(bits >> 23) - 127;
    const uint32_t m = bits & 0x7fffffu;
    uint32_t r = (m + 0x7ffffu + ((m >> 20) & 1u)) >> 20; /* 23 -> 3 mantissa bits, ties to even */
    if (r == 8u) {
        r = 0u;
        e += 1;
    }
    return (uint8_t)(((uint32_t)(e + 7) << 3) | r);
}

static inline double e4m3_value(uint8_t c) /* a normal e4m3 code: (1 + m/8) * 2**(e - 7), built as double bits */
{
    const uint64_t bits = ((uint64_t)((c >> 3) - 7 + 1023) << 52) | ((uint64_t)(c & 7u) << 49);
    double v;
    memcpy(&v, &bits, 8);
    return v;
}

/* float32 bounds of a positive double v: the largest float32 <= v and the smallest float32 >= v (the
 * neighbours of a positive float32 are its bit pattern minus and plus one) */
static inline float f32_step(float f, int32_t by)
{
    uint32_t b;
    memcpy(&b, &f, 4);
    b = (uint32_t)((int32_t)b + by);
    memcpy(&f, &b, 4);
    return f;
}

static inline float f32_down(double v)
{
    const float f = (float)v;
    return (double)f > v ? f32_step(f, -1) : f;
}

static inline float f32_up(double v)
{
    const float f = (float)v;
    return (double)f < v ? f32_step(f, 1) : f;
}

/* the element codes of one block of K floats against its seven bounds */
#define E2M1_CODES(K)                                                                                           \
    for (int64_t i = 0; i < (K); i++) {                                                                         \
        const uint32_t bits = p[i];                                                                             \
        const uint32_t mag = bits & 0x7fffffffu;                                                                \
        float a;                                                                                                \
        memcpy(&a, &mag, 4);                                                                                    \
        const uint32_t c = (uint32_t)(a > m0) + (uint32_t)(a >= m1) + (uint32_t)(a > m2) + (uint32_t)(a >= m3) + \
                           (uint32_t)(a > m4) + (uint32_t)(a >= m5) + (uint32_t)(a > m6);                       \
        o[i] = (uint8_t)(c | ((bits >> 28) & 8u));                                                              \
    }

/* pass 2: block scales (e4m3 codes) and element codes (one byte each). Instead of dividing, each |x| is
 * compared with e2m1's midpoints times the divisor: those products are exact in double (3 bits times 28),
 * so comparing with them decides as comparing the exact quotient with the midpoint would. For a float32
 * |x|, "|x| > m" is "|x| > the largest float32 <= m" and "|x| >= m" is "|x| >= the smallest float32 >= m",
 * so the loop compares float32s only. */
void lowbit_nvfp4_encode(const float *x, const float *amax, int64_t nblocks, int64_t k, float t, float eps,
                         uint8_t *scales, uint8_t *codes, int nthreads)
{
#pragma omp parallel for num_threads(nthreads) schedule(static) if (nblocks * k >= (1 << 20))
    for (int64_t b = 0; b < nblocks; b++) {
        float s = (amax[b] / 6.0f) / t;
        s = s < eps ? eps : (s > 448.0f ? 448.0f : s);
        const uint8_t sc = e4m3_code(s);
        scales[b] = sc;
        const double d = e4m3_value(sc) * (double)t;
        /* ties to even: 0.25 -> 0, 0.75 -> 1.0, 1.25 -> 1.0, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4 */
        const float m0 = f32_down(0.25 * d), m1 = f32_up(0.75 * d), m2 = f32_down(1.25 * d), m3 = f32_up(1.75 * d);
        const float m4 = f32_down(2.5 * d), m5 = f32_up(3.5 * d), m6 = f32_down(5.0 * d);
        const uint32_t *p = (const uint32_t *)(x + b * k);
        uint8_t *o = codes + b * k;
        if (k == 16) { /* NVFP4's block: a fixed count the compiler turns into one vector step */
            E2M1_CODES(16)
        } else {
            E2M1_CODES(k)
        }
    }
}
