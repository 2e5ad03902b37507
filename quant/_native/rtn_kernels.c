/* Integer round-to-nearest of contiguous blocks in one pass (quant/_native/__init__.py: rtn_blocks).
 *
 * x holds nblocks blocks of len float32 values, one after the other (per-channel scales of a
 * row-major matrix, or groups along its last axis). For each block, with float32 arithmetic
 * exactly as quant.calibrate's minmax and quant.quantize do it:
 *   lo, hi = min, max of the block; lo_n = min(lo, 0), hi_p = max(hi, 0);
 *   symmetric: scale = max(max(-lo_n, hi_p) / half_range, eps), zero point zp = sym_zp; a block whose
 *     values are all one nonzero c gets scale = max(|c| / (c > 0 ? qmax - zp : zp - qmin), FLT_MIN);
 *   affine: scale = max((hi_p - lo_n) / (qmax - qmin), eps), zp = clamp(qmin - rint(lo_n / scale), qmin, qmax);
 *   v = clamp(rint(x * (1 / scale)), qmin - zp, qmax - zp); code = v + zp; value = v * scale.
 * Optionally the dequantized values are written, and the error metrics of the values against x
 * are accumulated as precision/_kernels/metrics_sums.h defines them: sums over runs of each block,
 * added per fixed chunk of blocks, the chunks added in order, so the result does not depend on the
 * thread count. A block holding NaN or inf, or whose scale is not
 * finite (a range wider than float32), makes the call return -2 with the codes unspecified; the
 * caller's reference path then raises its error.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../../precision/_kernels/block_range.h"
#include "../../precision/_kernels/metrics_sums.h"

#define CHUNK 65536 /* elements per metrics chunk (at least one block) */
#define RUN 1024    /* elements quantized into a local buffer before their metrics are added */

/* The block's scale and zero point; returns 0 when the scale is not finite. */
static int block_params(float lo, float hi, int32_t qmin, int32_t qmax, int symmetric, int32_t sym_zp,
                        float half_range, float eps, float *scale, int32_t *zp)
{
    const float lo_n = lo < 0.0f ? lo : 0.0f, hi_p = hi > 0.0f ? hi : 0.0f;
    float s;
    if (symmetric) {
        const float amax = -lo_n > hi_p ? -lo_n : hi_p;
        s = amax / half_range;
        s = s > eps ? s : eps;
        if (lo == hi && lo != 0.0f) {
            const float end = lo > 0.0f ? (float)(qmax - sym_zp) : (float)(sym_zp - qmin);
            s = fabsf(lo) / end;
            s = s > FLT_MIN ? s : FLT_MIN;
        }
        *zp = sym_zp;
    } else {
        s = (hi_p - lo_n) / (float)(qmax - qmin);
        s = s > eps ? s : eps;
        float z = (float)qmin - rintf(lo_n / s);
        z = z < (float)qmin ? (float)qmin : z;
        z = z > (float)qmax ? (float)qmax : z;
        *zp = (int32_t)z;
    }
    *scale = s;
    return isfinite(s);
}

/* codes (and values when not NULL) of n elements with one scale and zero point */
static inline void quantize_run(const float *x, int64_t n, float s, float inv, int32_t zp, float lo, float hi,
                                uint8_t *codes, float *values)
{
    for (int64_t i = 0; i < n; i++) {
        float v = rintf(x[i] * inv);
        v = v < lo ? lo : v;
        v = v > hi ? hi : v;
        codes[i] = (uint8_t)((int)v + zp);
        values[i] = (v + 0.0f) * s; /* as decoded from the integer code: rint's -0 becomes +0 */
    }
}

static inline void codes_run(const float *x, int64_t n, float inv, int32_t zp, float lo, float hi, uint8_t *codes)
{
    for (int64_t i = 0; i < n; i++) {
        float v = rintf(x[i] * inv);
        v = v < lo ? lo : v;
        v = v > hi ? hi : v;
        codes[i] = (uint8_t)((int)v + zp);
    }
}

/* The codes (and values) of one block; with sums, the values go through a local buffer of RUN
 * elements (or the values array) and their metrics are added run by run. */
static void quantize_block(const float *x, int64_t n, float s, int32_t zp, int32_t qmin, int32_t qmax,
                           uint8_t *codes, float *values, Sums *sums)
{
    const float inv = 1.0f / s, lo = (float)(qmin - zp), hi = (float)(qmax - zp);
    if (!sums) {
        if (values)
            quantize_run(x, n, s, inv, zp, lo, hi, codes, values);
        else
            codes_run(x, n, inv, zp, lo, hi, codes);
        return;
    }
    float buf[RUN];
    for (int64_t i = 0; i < n; i += RUN) {
        const int64_t m = n - i < RUN ? n - i : RUN;
        float *y = values ? values + i : buf;
        quantize_run(x + i, m, s, inv, zp, lo, hi, codes + i, y);
        Sums part;
        block_sums(x + i, y, m, &part);
        sums_add(sums, &part);
    }
}

/* codes: nblocks * len bytes (int8 or uint8 codes as their bytes); scale, zp: nblocks each;
 * values: nblocks * len floats or NULL; sums: 5 doubles and counts: 2 int64 (sxx, syy, sxy, see,
 * max |e|; non-finite, zeroed), or NULL for no metrics. Returns 0, -1 without memory, -2 for a
 * block holding NaN or inf or whose scale is not finite. */
int64_t lowbit_rtn_f32(const float *x, int64_t nblocks, int64_t len, int32_t qmin, int32_t qmax, int symmetric,
                       int32_t sym_zp, float half_range, float eps, uint8_t *codes, float *scale, int32_t *zp,
                       float *values, double *sums, int64_t *counts, int nthreads)
{
    if (nblocks <= 0 || len <= 0) {
        if (sums) memset(sums, 0, 5 * sizeof(double));
        if (counts) counts[0] = counts[1] = 0;
        return 0;
    }
    const int64_t per = len >= CHUNK ? 1 : CHUNK / len; /* blocks per metrics chunk */
    const int64_t nchunks = (nblocks + per - 1) / per;
    Sums *part = sums ? calloc((size_t)nchunks, sizeof(Sums)) : NULL;
    if (sums && !part) return -1;
    int64_t bad = 0;
#pragma omp parallel for num_threads(nthreads) schedule(static) reduction(+ : bad) if (nchunks > 1 && nblocks * len >= (1 << 18))
    for (int64_t c = 0; c < nchunks; c++) {
        const int64_t b1 = (c + 1) * per < nblocks ? (c + 1) * per : nblocks;
        for (int64_t b = c * per; b < b1; b++) {
            const float *xb = x + b * len;
            float lo, hi;
            if (!block_range(xb, len, &lo, &hi) ||
                !block_params(lo, hi, qmin, qmax, symmetric, sym_zp, half_range, eps, scale + b, zp + b)) {
                bad++;
                continue;
            }
            quantize_block(xb, len, scale[b], zp[b], qmin, qmax, codes + b * len, values ? values + b * len : NULL,
                           part ? part + c : NULL);
        }
    }
    if (part) {
        sums_reduce_store(part, nchunks, sums, counts);
        free(part);
    }
    return bad ? -2 : 0;
}

/* Codes of 4 bits or fewer as stored (quant/storage.py pack_codes): code - qmin, two per byte, low
 * nibble first; an odd count leaves the last high nibble 0. out holds (n + 1) / 2 bytes. */
void lowbit_pack_nibbles(const int8_t *codes, int64_t n, int32_t qmin, uint8_t *out, int nthreads)
{
    const int64_t pairs = n / 2;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (pairs >= (1 << 20))
    for (int64_t i = 0; i < pairs; i++)
        out[i] = (uint8_t)(((codes[2 * i] - qmin) & 0x0F) | (((codes[2 * i + 1] - qmin) & 0x0F) << 4));
    if (n % 2) out[pairs] = (uint8_t)((codes[n - 1] - qmin) & 0x0F);
}
