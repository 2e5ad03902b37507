/* The minimum and maximum of a block of float32 values in one vectorizable pass, shared by the
 * integer round-to-nearest (quant/_native/rtn_kernels.c) and the scaled float casts
 * (codec_kernels.c). */
#ifndef LOWBIT_BLOCK_RANGE_H
#define LOWBIT_BLOCK_RANGE_H

#include <stdint.h>

#define RANGE_LANES 16

/* The block's minimum and maximum; returns 0 when it holds NaN or inf (v * 0 is NaN exactly then,
 * a float test that vectorizes with the comparisons). */
static int block_range(const float *x, int64_t n, float *lo_out, float *hi_out)
{
    float lo[RANGE_LANES], hi[RANGE_LANES], special[RANGE_LANES];
    for (int l = 0; l < RANGE_LANES; l++) {
        lo[l] = hi[l] = x[0];
        special[l] = 0.0f;
    }
    int64_t i = 0;
    for (; i + RANGE_LANES <= n; i += RANGE_LANES)
        for (int l = 0; l < RANGE_LANES; l++) {
            const float v = x[i + l];
            special[l] += v * 0.0f;
            lo[l] = v < lo[l] ? v : lo[l];
            hi[l] = v > hi[l] ? v : hi[l];
        }
    for (; i < n; i++) {
        special[0] += x[i] * 0.0f;
        lo[0] = x[i] < lo[0] ? x[i] : lo[0];
        hi[0] = x[i] > hi[0] ? x[i] : hi[0];
    }
    float a = lo[0], b = hi[0], nan = special[0];
    for (int l = 1; l < RANGE_LANES; l++) {
        a = lo[l] < a ? lo[l] : a;
        b = hi[l] > b ? hi[l] : b;
        nan += special[l];
    }
    *lo_out = a;
    *hi_out = b;
    return nan == 0.0f;
}

#endif
