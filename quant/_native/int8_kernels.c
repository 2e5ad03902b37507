/* Fused passes around lowbit's int8 GEMM (torch._int_mm): per-token activation quantization before
 * it and the rescale after it, each one pass over memory instead of eager torch's three to five.
 *
 * Built by quant/_native/__init__.py on first use (cc -O3 -march=native -ffp-contract=off -fopenmp)
 * and called through ctypes. Every float operation is a single IEEE float32 operation in the order
 * quant.quantize does it (no FMA contraction, no fast-math), so the codes are bit-identical to
 * lowbit's numpy/torch implementation; the tests check that.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

/* below this many elements a parallel region costs more than it saves */
#define PARALLEL_MIN 65536

/* Per-token (per-row) symmetric quantization of x (rows x cols, row stride ld, float32), signed codes
 * with zero point 0, as quant.calibrate + quant.quantize do it:
 *   v = x * smooth (when smooth is not NULL), amax = max |v| over the row,
 *   scale = max(amax / half_range, eps), or for a row whose values are all one nonzero c,
 *   scale = max(|c| / (c > 0 ? qmax : -qmin), FLT_MIN) (c lands exactly on the end code);
 *   code = clamp(rint(v * (1 / scale)), qmin, qmax).
 * The row maximum is taken on the bit patterns of |v| (an integer max, which vectorizes; it orders
 * non-negative floats as their values do, and puts NaN above inf), so a row holding NaN or inf is
 * recognised: its scale is set to NaN, its codes are left unwritten, and it is counted in the
 * return value, so the caller can fall back to the reference path, which defines that case. */
int64_t lowbit_quantize_tokens(const float *x, int64_t rows, int64_t cols, int64_t ld, const float *smooth,
                               float half_range, float eps, float qmin, float qmax,
                               int8_t *codes, float *scales, int nthreads)
{
    int64_t bad = 0;
#pragma omp parallel for schedule(static) num_threads(nthreads) reduction(+ : bad) if (rows * cols >= PARALLEL_MIN)
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * ld;
        int8_t *qr = codes + r * cols;
        const float first = cols ? (smooth ? xr[0] * smooth[0] : xr[0]) : 0.0f;
        uint32_t first_bits;
        memcpy(&first_bits, &first, sizeof first_bits);
        uint32_t m = 0, differ = 0;
        if (smooth)
            for (int64_t c = 0; c < cols; c++) {
                float v = xr[c] * smooth[c];
                uint32_t u;
                memcpy(&u, &v, sizeof u);
                differ |= u ^ first_bits;
                u &= 0x7fffffffu;
                m = u > m ? u : m;
            }
        else
            for (int64_t c = 0; c < cols; c++) {
                uint32_t u;
                memcpy(&u, &xr[c], sizeof u);
                differ |= u ^ first_bits;
                u &= 0x7fffffffu;
                m = u > m ? u : m;
            }
        if (m >= 0x7f800000u) { /* inf or NaN */
            scales[r] = NAN;
            bad++;
            continue;
        }
        float amax;
        memcpy(&amax, &m, sizeof amax);
        float s;
        if (differ == 0 && first != 0.0f) {
            s = fabsf(first) / (first > 0.0f ? qmax : -qmin);
            s = s < FLT_MIN ? FLT_MIN : s;
        } else {
            s = amax / half_range;
            s = s < eps ? eps : s;
        }
        scales[r] = s;
        const float inv = 1.0f / s;
        if (smooth)
            _Pragma("GCC ivdep")
            for (int64_t c = 0; c < cols; c++) {
                float v = nearbyintf((xr[c] * smooth[c]) * inv);
                v = v < qmin ? qmin : v;
                v = v > qmax ? qmax : v;
                qr[c] = (int8_t)(int32_t)v;
            }
        else
            _Pragma("GCC ivdep")
            for (int64_t c = 0; c < cols; c++) {
                float v = nearbyintf(xr[c] * inv);
                v = v < qmin ? qmin : v;
                v = v > qmax ? qmax : v;
                qr[c] = (int8_t)(int32_t)v;
            }
    }
    return bad;
}

/* Per-token (per-row) affine quantization of x (rows x cols, row stride ld, float32), signed codes
 * with one zero point per row, as quant.calibrate + quant.quantize do it for an affine spec:
 *   v = x * smooth (when smooth is not NULL), lo = min(min v, 0), hi = max(max v, 0),
 *   scale = max((hi - lo) / (qmax - qmin), eps), zp = clamp(qmin - rint(lo / scale), qmin, qmax),
 *   code = clamp(rint(v * (1 / scale)), qmin - zp, qmax - zp) + zp.
 * A row holding NaN or inf (found, as in lowbit_quantize_tokens, from the bit patterns of |v|) gets a
 * NaN scale, unwritten codes, and is counted in the return value. */
int64_t lowbit_quantize_tokens_affine(const float *x, int64_t rows, int64_t cols, int64_t ld, const float *smooth,
                                      float eps, float qmin, float qmax, int8_t *codes, float *scales,
                                      int32_t *zero_points, int nthreads)
{
    int64_t bad = 0;
#pragma omp parallel for schedule(static) num_threads(nthreads) reduction(+ : bad) if (rows * cols >= PARALLEL_MIN)
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * ld;
        int8_t *qr = codes + r * cols;
        /* min and max on order-preserving integer keys of the floats (negative ones have their magnitude
         * bits flipped), which vectorize where float min/max reductions do not; starting from 0's key
         * puts 0 in the range. |v|'s bit maximum finds inf and NaN, as in lowbit_quantize_tokens. */
        uint32_t m = 0;
        int32_t klo = 0, khi = 0;
        if (smooth)
            for (int64_t c = 0; c < cols; c++) {
                float v = xr[c] * smooth[c];
                int32_t k;
                memcpy(&k, &v, sizeof k);
                uint32_t u = (uint32_t)k & 0x7fffffffu;
                m = u > m ? u : m;
                k ^= (k >> 31) & 0x7fffffff;
                klo = k < klo ? k : klo;
                khi = k > khi ? k : khi;
            }
        else
            for (int64_t c = 0; c < cols; c++) {
                int32_t k;
                memcpy(&k, &xr[c], sizeof k);
                uint32_t u = (uint32_t)k & 0x7fffffffu;
                m = u > m ? u : m;
                k ^= (k >> 31) & 0x7fffffff;
                klo = k < klo ? k : klo;
                khi = k > khi ? k : khi;
            }
        if (m >= 0x7f800000u) { /* inf or NaN */
            scales[r] = NAN;
            bad++;
            continue;
        }
        klo ^= (klo >> 31) & 0x7fffffff;
        khi ^= (khi >> 31) & 0x7fffffff;
        float lo, hi;
        memcpy(&lo, &klo, sizeof lo);
        memcpy(&hi, &khi, sizeof hi);
        float s = (hi - lo) / (qmax - qmin);
        s = s < eps ? eps : s;
        float z = qmin - nearbyintf(lo / s);
        z = z < qmin ? qmin : z;
        z = z > qmax ? qmax : z;
        scales[r] = s;
        zero_points[r] = (int32_t)z;
        const float inv = 1.0f / s, cmin = qmin - z, cmax = qmax - z;
        if (smooth)
            _Pragma("GCC ivdep")
            for (int64_t c = 0; c < cols; c++) {
                float v = nearbyintf((xr[c] * smooth[c]) * inv);
                v = v < cmin ? cmin : v;
                v = v > cmax ? cmax : v;
                qr[c] = (int8_t)(int32_t)(v + z);
            }
        else
            _Pragma("GCC ivdep")
            for (int64_t c = 0; c < cols; c++) {
                float v = nearbyintf(xr[c] * inv);
                v = v < cmin ? cmin : v;
                v = v > cmax ? cmax : v;
                qr[c] = (int8_t)(int32_t)(v + z);
            }
    }
    return bad;
}

/* y = float(acc) * row_scale[r] * col_scale[c] (+ bias[c]), in that order, each step rounded to float32;
 * with row_zp (affine inputs) acc is first replaced by acc - row_zp[r] * col_sum[c] (int32, exact: the
 * accumulation over code - zero point, col_sum being the weight codes' sum over the input axis).
 * acc is rows x cols int32, contiguous; y (float32, contiguous) may be the same memory as acc (each
 * element is read before it is written, so the loops are vectorized regardless: ivdep).
 * col_scale has cols entries, or one (per-tensor weights). */
void lowbit_rescale(const int32_t *acc, int64_t rows, int64_t cols, const float *row_scale,
                    const float *col_scale, int64_t n_col_scale, const float *bias, const int32_t *row_zp,
                    const int32_t *col_sum, float *y, int nthreads)
{
#pragma omp parallel for schedule(static) num_threads(nthreads) if (rows * cols >= PARALLEL_MIN)
    for (int64_t r = 0; r < rows; r++) {
        const int32_t *ar = acc + r * cols;
        float *yr = y + r * cols;
        const float s = row_scale[r];
        if (row_zp) { /* affine inputs: the exact integer sum over (code - zp) */
            const int32_t z = row_zp[r];
            int32_t *aw = (int32_t *)yr;
            _Pragma("GCC ivdep")
            for (int64_t c = 0; c < cols; c++) aw[c] = ar[c] - z * col_sum[c];
            ar = aw;
        }
        if (n_col_scale == 1) {
            const float w = col_scale[0];
            if (bias)
                _Pragma("GCC ivdep")
                for (int64_t c = 0; c < cols; c++) yr[c] = ((float)ar[c] * s) * w + bias[c];
            else
                _Pragma("GCC ivdep")
                for (int64_t c = 0; c < cols; c++) yr[c] = ((float)ar[c] * s) * w;
        } else if (bias) {
            _Pragma("GCC ivdep")
            for (int64_t c = 0; c < cols; c++) yr[c] = ((float)ar[c] * s) * col_scale[c] + bias[c];
        } else {
            _Pragma("GCC ivdep")
            for (int64_t c = 0; c < cols; c++) yr[c] = ((float)ar[c] * s) * col_scale[c];
        }
    }
}

/* w = ((float)codes - (float)zp[g]) * scale[g] for int8 codes (rows x cols, contiguous), one scale and zero
 * point per group of `group` columns of a row (group = cols: per row); zp NULL means 0. Written as float32
 * (out32) or, rounded to nearest even, as bfloat16 bits (out16): the arithmetic of
 * quant.quantize.dequantize_tensor followed by torch's float32 -> bfloat16 conversion, in one pass. */
void lowbit_dequantize_int8(const int8_t *codes, int64_t rows, int64_t cols, int64_t group, const float *scale,
                            const int32_t *zp, float *out32, uint16_t *out16, int nthreads)
{
    const int64_t groups = cols / group;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (rows * cols >= PARALLEL_MIN)
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t g = 0; g < groups; g++) {
            const float s = scale[r * groups + g];
            const float z = zp ? (float)zp[r * groups + g] : 0.0f;
            const int8_t *cr = codes + r * cols + g * group;
            if (out32) {
                float *o = out32 + r * cols + g * group;
                _Pragma("GCC ivdep")
                for (int64_t c = 0; c < group; c++) o[c] = ((float)cr[c] - z) * s;
            } else {
                uint16_t *o = out16 + r * cols + g * group;
                _Pragma("GCC ivdep")
                for (int64_t c = 0; c < group; c++) {
                    const float v = ((float)cr[c] - z) * s;
                    uint32_t b;
                    memcpy(&b, &v, 4);
                    o[c] = (uint16_t)((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
                }
            }
        }
    }
}
