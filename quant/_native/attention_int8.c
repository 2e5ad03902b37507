/* int8 attention: softmax(Q K^T * scale + mask) V with both matrix products on int8 codes.
 *
 * Built by quant/_native/__init__.py on first use (cc -O3 -march=native -ffp-contract=off -fopenmp)
 * and called through ctypes by quant.attention. The scheme (quant.attention documents it and holds
 * the torch reference that the tests compare with):
 *   Q, K: symmetric int8 per row (per query / per key, over the head dimension), scale amax/127;
 *   scores s_ij = (sum_d q_id k_jd) * (sq_i * scale) * sk_j  (+ mask_ij, or -inf where a bool mask is 0);
 *   e_ij = exp(s_ij - max_j s_ij), in [0, 1];  P codes p_ij = rint(255 e_ij) (unsigned 8 bit);
 *   V: symmetric int8 per column (per head channel d, over the keys), scale amax/127;
 *   out_id = (sum_j p_ij v_jd) * sv_d * (1 / (255 * sum_j e_ij)).
 * Keys after the last one that any query of a batch row may attend (padding) get p = 0: they are left
 * out of the work and of V's scale. A row with every key masked gives 0, as torch's SDPA does.
 * All integer sums are exact, so the AVX-512 VNNI path and the portable loops give identical codes
 * and sums; the float steps are the same operations in the same order on both paths (the portable
 * path is selectable at run time so that the tests compare the two).
 *
 * Work is split over batch rows (or (batch, head) pairs when there are few rows); each head's codes
 * are packed into a private buffer of about 3 * L * D bytes, plus 256 * L bytes of products for a
 * block of 64 query rows, which stays in the core's L2 for the usual L <= 2048. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#define HAVE_VNNI 1
#else
#define HAVE_VNNI 0
#endif

#define MASK_NONE 0
#define MASK_ADD 1  /* float32, added to the scores */
#define MASK_KEEP 2 /* bool (uint8): nonzero keeps the key */
#define QBLOCK 64   /* query rows whose raw products are held at once (bounds the scratch for long sequences) */

static int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

/* exp(x) for x <= 0 (the softmax after subtracting the row max), relative error below 2e-7:
 * x = n ln2 + r, |r| <= ln2/2, exp(r) by its degree-6 Taylor polynomial, 2^n through the exponent
 * bits. Below -87.3 the result is 0 (exp underflows float32 there anyway); NaN stays NaN. */
static inline float exp_nonpos(float x)
{
    const int under = x < -87.3f;
    x = under ? -87.3f : x; /* branch-free, so the loops calling this vectorize */
    const float n = nearbyintf(x * 1.44269504f);
    const float r = (x - n * 0.693145752f) - n * 1.42860677e-6f;
    float p = 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float two_n;
    memcpy(&two_n, &bits, sizeof two_n);
    return under ? 0.0f : p * two_n;
}

static inline uint32_t abs_bits(float x)
{
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    return u & 0x7fffffffu;
}

static inline float from_bits(uint32_t u)
{
    float x;
    memcpy(&x, &u, sizeof x);
    return x;
}

/* symmetric int8 codes of one row of n floats; returns the scale (0 for an all-zero row: codes 0).
 * The row max is an integer max on |x|'s bit patterns (it vectorizes, and it puts NaN above inf):
 * sets *bad when the row holds NaN or inf. */
static inline float quantize_row(const float *x, int64_t n, int8_t *codes, int *bad)
{
    uint32_t mb = 0;
    for (int64_t d = 0; d < n; d++) {
        const uint32_t u = abs_bits(x[d]);
        mb = u > mb ? u : mb;
    }
    if (mb >= 0x7f800000u) *bad = 1;
    const float m = from_bits(mb);
    const float inv = m > 0.0f ? 127.0f / m : 0.0f;
    for (int64_t d = 0; d < n; d++) codes[d] = (int8_t)(int32_t)nearbyintf(x[d] * inv);
    return m / 127.0f;
}

typedef struct {
    int64_t Lq, Lk, D, Dg, Lkp, Jg, Dp;
    uint8_t *qu;      /* Lq x (4 Dg): q + 128 (0 codes pad to 128) */
    int8_t *k4;       /* [Lkp/16][Dg][16][4]: k codes, 4 consecutive d per key */
    int32_t *ksum128; /* Lkp: 128 * sum_d k_jd (removes the +128 of qu) */
    float *sq, *sk, *sv;
    float *vmax;      /* D: V column maxima (as bits), then their reciprocals */
    int8_t *v4;       /* [Dp/16][Jg][16][4]: v codes, 4 consecutive keys per channel */
    /* scratch shared by the heads of a task, used one head at a time: */
    int32_t *s;       /* QBLOCK x Lkp raw products of a block of query rows */
    float *e;         /* Lk */
    uint8_t *p;       /* 4 Jg */
    int8_t *row;      /* max(Lk, D) codes scratch */
} Work;

/* Buffers for n heads in one allocation: each head's codes and scales, and one set of the scratch
 * used head by head (products, scores, probability codes). Returns the block to free, or NULL. */
static void *work_alloc(Work *w, int64_t n, int64_t Lq, int64_t Lk, int64_t D)
{
    /* every size is computed with overflow checks: hostile (broadcast) shapes can claim any length */
    const int64_t LIM = (int64_t)1 << 40;
    if (n < 1 || Lq < 0 || Lk < 0 || D < 0 || Lq > LIM || Lk > LIM || D > LIM) return NULL;
    const int64_t Dg = (D + 3) / 4, Lkp = round_up(Lk, 16), Jg = (Lk + 3) / 4, Dp = round_up(D, 16);
    int64_t head[8], shared[4], t;
    int o = 0;
    o |= __builtin_mul_overflow(Lq, 4 * Dg, &head[0]);
    o |= __builtin_mul_overflow(Lkp, 4 * Dg, &head[1]);
    head[2] = Lkp * 4; head[3] = Lq * 4; head[4] = Lkp * 4; head[5] = Dp * 4; head[6] = Dp * 4;
    o |= __builtin_mul_overflow(Dp * 4, Jg, &head[7]);
    o |= __builtin_mul_overflow((Lq < QBLOCK ? Lq : QBLOCK) * 4, Lkp, &shared[0]);
    shared[1] = Lkp * 4; shared[2] = 4 * Jg; shared[3] = (Lk > D ? Lk : D) + Dp;
    int64_t per = 0, total = 0;
    for (int i = 0; i < 8; i++) o |= __builtin_add_overflow(per, round_up(head[i], 64), &per);
    for (int i = 0; i < 4; i++) o |= __builtin_add_overflow(total, round_up(shared[i], 64), &total);
    o |= __builtin_mul_overflow(n, per, &t);
    o |= __builtin_add_overflow(total, t, &total);
    if (o || total > LIM) return NULL;
    char *block = aligned_alloc(64, (size_t)total), *at = block;
    if (!block) return NULL;
#define TAKE(size) (at += round_up(size, 64), at - round_up(size, 64))
    int32_t *s = (int32_t *)TAKE(shared[0]);
    float *e = (float *)TAKE(shared[1]);
    uint8_t *p = (uint8_t *)TAKE(shared[2]);
    int8_t *row = (int8_t *)TAKE(shared[3]);
    for (int64_t h = 0; h < n; h++) {
        Work *x = w + h;
        x->Lq = Lq; x->Lk = Lk; x->D = D; x->Dg = Dg; x->Lkp = Lkp; x->Jg = Jg; x->Dp = Dp;
        x->qu = (uint8_t *)TAKE(head[0]);
        x->k4 = (int8_t *)TAKE(head[1]);
        x->ksum128 = (int32_t *)TAKE(head[2]);
        x->sq = (float *)TAKE(head[3]);
        x->sk = (float *)TAKE(head[4]);
        x->sv = (float *)TAKE(head[5]);
        x->vmax = (float *)TAKE(head[6]);
        x->v4 = (int8_t *)TAKE(head[7]);
        x->s = s; x->e = e; x->p = p; x->row = row;
    }
#undef TAKE
    return block;
}

/* Quantize and pack one (batch, head), any D. Returns 1 if Q, K or V holds NaN or inf. */
static int pack_portable(Work *w, const float *q, int64_t qsl, const float *k, int64_t ksl, const float *v, int64_t vsl)
{
    int bad = 0;
    const int64_t Lq = w->Lq, Lk = w->Lk, D = w->D, Dg = w->Dg;
    int8_t *c = w->row;
    for (int64_t i = 0; i < Lq; i++) {
        w->sq[i] = quantize_row(q + i * qsl, D, c, &bad);
        uint8_t *qi = w->qu + i * 4 * Dg;
        for (int64_t d = 0; d < 4 * Dg; d++) qi[d] = (uint8_t)((d < D ? c[d] : 0) + 128);
    }
    memset(w->k4, 0, (size_t)(w->Lkp * 4 * Dg));
    for (int64_t j = 0; j < w->Lkp; j++) {
        w->ksum128[j] = 0;
        w->sk[j] = 0.0f;
        if (j >= Lk) continue;
        w->sk[j] = quantize_row(k + j * ksl, D, c, &bad);
        int32_t sum = 0;
        int8_t *blk = w->k4 + (j / 16) * Dg * 64 + (j % 16) * 4;
        for (int64_t d = 0; d < D; d++) {
            sum += c[d];
            blk[(d / 4) * 64 + d % 4] = c[d];
        }
        w->ksum128[j] = 128 * sum;
    }
    /* V per channel: amax over keys (running over rows, so the inner loop is contiguous), then codes */
    uint32_t *mb = (uint32_t *)w->vmax;
    for (int64_t d = 0; d < D; d++) mb[d] = 0;
    for (int64_t j = 0; j < Lk; j++) {
        const float *vj = v + j * vsl;
        for (int64_t d = 0; d < D; d++) {
            const uint32_t u = abs_bits(vj[d]);
            mb[d] = u > mb[d] ? u : mb[d];
        }
    }
    float *inv = w->vmax;
    for (int64_t d = 0; d < w->Dp; d++) {
        if (d >= D) {
            w->sv[d] = 0.0f;
            continue;
        }
        if (mb[d] >= 0x7f800000u) bad = 1;
        const float m = from_bits(mb[d]);
        w->sv[d] = m / 127.0f;
        inv[d] = m > 0.0f ? 127.0f / m : 0.0f;
    }
    memset(w->v4, 0, (size_t)(w->Dp * 4 * w->Jg));
    for (int64_t j = 0; j < Lk; j++) {
        const float *vj = v + j * vsl;
        for (int64_t d = 0; d < D; d++) c[d] = (int8_t)(int32_t)nearbyintf(vj[d] * inv[d]);
        int8_t *blk = w->v4 + (j / 4) * 64 + j % 4;
        for (int64_t d = 0; d < D; d++) blk[(d / 16) * w->Jg * 64 + (d % 16) * 4] = c[d];
    }
    return bad;
}

#if HAVE_VNNI
static inline uint32_t reduce_max_bits(__m512i m) { return (uint32_t)_mm512_reduce_max_epu32(m); }

/* codes of 16 floats times inv, rounded half to even (as nearbyintf), as 16 int8 */
static inline __m128i codes16(__m512 x, __m512 inv)
{
    const __m512i i = _mm512_cvt_roundps_epi32(_mm512_mul_ps(x, inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return _mm512_cvtsepi32_epi8(i);
}

/* pack_portable for `n` heads of one batch row at once (head stride hq, hk, hv), for D a multiple of
 * 16, with AVX-512. The loops run over tokens outside and heads inside, so that the usual layout
 * (heads side by side in a linear layer's output row) is read front to back. */
static int pack_simd(Work *w, int64_t n, const float *q, int64_t hq, int64_t qsl, const float *k, int64_t hk,
                     int64_t ksl, const float *v, int64_t hv, int64_t vsl)
{
    const int64_t Lq = w->Lq, Lk = w->Lk, D = w->D, Dg = w->Dg, Lkp = w->Lkp, Jg = w->Jg, nb = D / 16;
    const __m512i absm = _mm512_set1_epi32(0x7fffffff);
    const __m128i flip = _mm_set1_epi8((char)0x80);
    uint32_t worst = 0;
    int8_t *c = w->row;
#define ROW_CODES(src, scale_out)                                                             \
    do {                                                                                      \
        __m512i mx = _mm512_setzero_si512();                                                  \
        for (int64_t d = 0; d < D; d += 16)                                                   \
            mx = _mm512_max_epu32(mx, _mm512_and_si512(_mm512_loadu_si512(src + d), absm));   \
        const uint32_t mb = reduce_max_bits(mx);                                              \
        worst = mb > worst ? mb : worst;                                                      \
        const float m = from_bits(mb);                                                        \
        const __m512 inv = _mm512_set1_ps(m > 0.0f ? 127.0f / m : 0.0f);                      \
        for (int64_t d = 0; d < D; d += 16)                                                   \
            _mm_storeu_si128((__m128i *)(c + d), codes16(_mm512_loadu_ps(src + d), inv));     \
        scale_out = m / 127.0f;                                                               \
    } while (0)
    for (int64_t i = 0; i < Lq; i++)
        for (int64_t h = 0; h < n; h++) {
            const float *qi = q + h * hq + i * qsl;
            ROW_CODES(qi, w[h].sq[i]);
            for (int64_t d = 0; d < D; d += 16) /* q + 128 as unsigned: flip the sign bit */
                _mm_storeu_si128((__m128i *)(w[h].qu + i * 4 * Dg + d),
                                 _mm_xor_si128(_mm_loadu_si128((const __m128i *)(c + d)), flip));
        }
    for (int64_t j = 0; j < Lkp; j++)
        for (int64_t h = 0; h < n; h++) {
            uint32_t *k4 = (uint32_t *)w[h].k4;
            if (j >= Lk) {
                w[h].sk[j] = 0.0f;
                w[h].ksum128[j] = 0;
                for (int64_t t = 0; t < Dg; t++) k4[((j / 16) * Dg + t) * 16 + j % 16] = 0;
                continue;
            }
            const float *kj = k + h * hk + j * ksl;
            ROW_CODES(kj, w[h].sk[j]);
            int32_t sum = 0;
            for (int64_t d = 0; d < D; d += 16)
                sum += _mm512_reduce_add_epi32(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(c + d))));
            w[h].ksum128[j] = 128 * sum;
            const uint32_t *cw = (const uint32_t *)c;
            for (int64_t t = 0; t < Dg; t++) k4[((j / 16) * Dg + t) * 16 + j % 16] = cw[t];
        }
#undef ROW_CODES
    /* V: per-channel maxima over the keys (as bits, in vmax), then 4 keys x 16 channels at a time,
     * byte-interleaved into v4 */
    for (int64_t h = 0; h < n; h++) memset(w[h].vmax, 0, sizeof(float) * (size_t)D);
    for (int64_t j = 0; j < Lk; j++)
        for (int64_t h = 0; h < n; h++) {
            uint32_t *mb = (uint32_t *)w[h].vmax;
            const float *vj = v + h * hv + j * vsl;
            for (int64_t db = 0; db < nb; db++)
                _mm512_storeu_si512(mb + db * 16, _mm512_max_epu32(_mm512_loadu_si512(mb + db * 16),
                                                                  _mm512_and_si512(_mm512_loadu_si512(vj + db * 16), absm)));
        }
    for (int64_t h = 0; h < n; h++)
        for (int64_t db = 0; db < nb; db++) {
            const __m512i bits = _mm512_loadu_si512(w[h].vmax + db * 16);
            const uint32_t mb = reduce_max_bits(bits);
            worst = mb > worst ? mb : worst;
            const __m512 m = _mm512_castsi512_ps(bits);
            _mm512_storeu_ps(w[h].sv + db * 16, _mm512_div_ps(m, _mm512_set1_ps(127.0f)));
            const __mmask16 pos = _mm512_cmp_ps_mask(m, _mm512_setzero_ps(), _CMP_GT_OQ);
            _mm512_storeu_ps(w[h].vmax + db * 16, _mm512_maskz_div_ps(pos, _mm512_set1_ps(127.0f), m));
        }
    for (int64_t g = 0; g < Jg; g++)
        for (int64_t h = 0; h < n; h++)
            for (int64_t db = 0; db < nb; db++) {
                const __m512 inv = _mm512_loadu_ps(w[h].vmax + db * 16);
                __m128i r[4];
                for (int b = 0; b < 4; b++) {
                    const int64_t j = 4 * g + b;
                    r[b] = j < Lk ? codes16(_mm512_loadu_ps(v + h * hv + j * vsl + db * 16), inv) : _mm_setzero_si128();
                }
                const __m128i lo01 = _mm_unpacklo_epi8(r[0], r[1]), hi01 = _mm_unpackhi_epi8(r[0], r[1]);
                const __m128i lo23 = _mm_unpacklo_epi8(r[2], r[3]), hi23 = _mm_unpackhi_epi8(r[2], r[3]);
                __m128i *dst = (__m128i *)(w[h].v4 + (db * Jg + g) * 64);
                _mm_store_si128(dst + 0, _mm_unpacklo_epi16(lo01, lo23));
                _mm_store_si128(dst + 1, _mm_unpackhi_epi16(lo01, lo23));
                _mm_store_si128(dst + 2, _mm_unpacklo_epi16(hi01, hi23));
                _mm_store_si128(dst + 3, _mm_unpackhi_epi16(hi01, hi23));
            }
    return worst >= 0x7f800000u;
}
#endif

/* quantize and pack n heads (w[0..n)); returns 1 if any of their Q, K or V holds NaN or inf */
static int pack(Work *w, int64_t n, const float *q, int64_t hq, int64_t qsl, const float *k, int64_t hk,
                int64_t ksl, const float *v, int64_t hv, int64_t vsl, int simd)
{
#if HAVE_VNNI
    if (simd && w->D % 16 == 0) return pack_simd(w, n, q, hq, qsl, k, hk, ksl, v, hv, vsl);
#endif
    (void)simd;
    int bad = 0;
    for (int64_t h = 0; h < n; h++) bad |= pack_portable(w + h, q + h * hq, qsl, k + h * hk, ksl, v + h * hv, vsl);
    return bad;
}

/* raw products s_ij = sum_d (q_id + 128) k_jd for queries i0 <= i < i1 and all keys j, into row i - i0
 * of w->s (the +128 is removed later) */
static void qk(const Work *w, int64_t i0, int64_t i1, int simd)
{
    const int64_t Dg = w->Dg, Lkp = w->Lkp;
    int32_t *const s = w->s - i0 * Lkp;
#if HAVE_VNNI
    if (simd) {
        const uint32_t *qu = (const uint32_t *)w->qu;
        for (int64_t jb = 0; jb < Lkp / 16; jb++) {
            const __m512i *kb = (const __m512i *)(w->k4 + jb * Dg * 64);
            int64_t i = i0;
            for (; i + 4 <= i1; i += 4) {
                __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
                for (int64_t t = 0; t < Dg; t++) {
                    const __m512i kv = _mm512_load_si512(kb + t);
                    a0 = _mm512_dpbusd_epi32(a0, _mm512_set1_epi32((int)qu[(i + 0) * Dg + t]), kv);
                    a1 = _mm512_dpbusd_epi32(a1, _mm512_set1_epi32((int)qu[(i + 1) * Dg + t]), kv);
                    a2 = _mm512_dpbusd_epi32(a2, _mm512_set1_epi32((int)qu[(i + 2) * Dg + t]), kv);
                    a3 = _mm512_dpbusd_epi32(a3, _mm512_set1_epi32((int)qu[(i + 3) * Dg + t]), kv);
                }
                _mm512_storeu_si512(s + (i + 0) * Lkp + jb * 16, a0);
                _mm512_storeu_si512(s + (i + 1) * Lkp + jb * 16, a1);
                _mm512_storeu_si512(s + (i + 2) * Lkp + jb * 16, a2);
                _mm512_storeu_si512(s + (i + 3) * Lkp + jb * 16, a3);
            }
            for (; i < i1; i++) {
                __m512i a0 = _mm512_setzero_si512();
                for (int64_t t = 0; t < Dg; t++)
                    a0 = _mm512_dpbusd_epi32(a0, _mm512_set1_epi32((int)qu[i * Dg + t]), _mm512_load_si512(kb + t));
                _mm512_storeu_si512(s + i * Lkp + jb * 16, a0);
            }
        }
        return;
    }
#endif
    (void)simd;
    for (int64_t i = i0; i < i1; i++)
        for (int64_t jb = 0; jb < Lkp / 16; jb++) {
            int32_t acc[16] = {0};
            for (int64_t t = 0; t < Dg; t++) {
                const uint8_t *qa = w->qu + (i * Dg + t) * 4;
                const int8_t *kb = w->k4 + (jb * Dg + t) * 64;
                for (int l = 0; l < 16; l++)
                    for (int b = 0; b < 4; b++) acc[l] += (int32_t)qa[b] * (int32_t)kb[l * 4 + b];
            }
            memcpy(s + i * Lkp + jb * 16, acc, sizeof acc);
        }
}

/* out_d = (sum_j p_j v_jd) * sv_d * rs for one query row */
static void pv(const Work *w, float rs, float *out, int simd)
{
    const int64_t Jg = w->Jg, D = w->D;
#if HAVE_VNNI
    if (simd) {
        const uint32_t *pu = (const uint32_t *)w->p;
        for (int64_t db = 0; db < w->Dp / 16; db++) {
            const __m512i *vb = (const __m512i *)(w->v4 + db * Jg * 64);
            /* four independent sums: the dot-product instruction's latency spans several issue slots */
            __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
            int64_t g = 0;
            for (; g + 4 <= Jg; g += 4) {
                a0 = _mm512_dpbusd_epi32(a0, _mm512_set1_epi32((int)pu[g]), _mm512_load_si512(vb + g));
                a1 = _mm512_dpbusd_epi32(a1, _mm512_set1_epi32((int)pu[g + 1]), _mm512_load_si512(vb + g + 1));
                a2 = _mm512_dpbusd_epi32(a2, _mm512_set1_epi32((int)pu[g + 2]), _mm512_load_si512(vb + g + 2));
                a3 = _mm512_dpbusd_epi32(a3, _mm512_set1_epi32((int)pu[g + 3]), _mm512_load_si512(vb + g + 3));
            }
            for (; g < Jg; g++) a0 = _mm512_dpbusd_epi32(a0, _mm512_set1_epi32((int)pu[g]), _mm512_load_si512(vb + g));
            a0 = _mm512_add_epi32(a0, a2);
            a1 = _mm512_add_epi32(a1, a3);
            int32_t acc[16];
            _mm512_storeu_si512(acc, _mm512_add_epi32(a0, a1));
            for (int l = 0; l < 16 && db * 16 + l < D; l++)
                out[db * 16 + l] = ((float)acc[l] * w->sv[db * 16 + l]) * rs;
        }
        return;
    }
#endif
    (void)simd;
    for (int64_t db = 0; db < w->Dp / 16; db++) {
        int32_t acc[16] = {0};
        for (int64_t g = 0; g < Jg; g++) {
            const uint8_t *pa = w->p + g * 4;
            const int8_t *vb = w->v4 + (db * Jg + g) * 64;
            for (int l = 0; l < 16; l++)
                for (int b = 0; b < 4; b++) acc[l] += (int32_t)pa[b] * (int32_t)vb[l * 4 + b];
        }
        for (int l = 0; l < 16 && db * 16 + l < D; l++)
            out[db * 16 + l] = ((float)acc[l] * w->sv[db * 16 + l]) * rs;
    }
}

/* Probability codes of one query row (si: its raw products) into w->p (and the sum of its e_j into *sum): scores from the raw
 * products, the mask, the row max, e_j = exp(s_j - max), p_j = rint(255 e_j). Returns 0 when every
 * key is masked, -1 when a score overflowed to +inf. mrow: the row's mask (float32 to add, or uint8 keep flags) with stride mstride. */
static int probs_portable(Work *w, const int32_t *si, float a, const void *mrow, int kind, int64_t mstride,
                          float *sum)
{
    const int64_t Lk = w->Lk;
    float *e = w->e;
    for (int64_t j = 0; j < Lk; j++) e[j] = ((float)(si[j] - w->ksum128[j]) * a) * w->sk[j];
    if (kind == MASK_ADD)
        for (int64_t j = 0; j < Lk; j++) e[j] = e[j] + ((const float *)mrow)[j * mstride];
    else if (kind == MASK_KEEP)
        for (int64_t j = 0; j < Lk; j++) e[j] = ((const uint8_t *)mrow)[j * mstride] ? e[j] : -INFINITY;
    float m = -INFINITY;
    int nan = 0;
    for (int64_t j = 0; j < Lk; j++) {
        m = e[j] > m ? e[j] : m;
        nan |= e[j] != e[j]; /* an overflowed score plus a -inf mask: inf - inf */
    }
    if (nan || m == INFINITY) return -1;
    if (m == -INFINITY) return 0;
    float sm[16] = {0};
    for (int64_t j = Lk; j < 4 * w->Jg; j++) w->p[j] = 0;
    for (int64_t j = 0; j < Lk; j++) {
        const float x = exp_nonpos(e[j] - m);
        sm[j % 16] += x;
        w->p[j] = (uint8_t)(int32_t)nearbyintf(x * 255.0f);
    }
    float t = 0.0f;
    for (int l = 0; l < 16; l++) t += sm[l];
    *sum = t;
    return 1;
}

#if HAVE_VNNI
/* exp_nonpos on 16 lanes, the same operations in the same order */
static inline __m512 exp16(__m512 x)
{
    const __mmask16 under = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.3f), _CMP_LT_OQ);
    x = _mm512_mask_blend_ps(under, x, _mm512_set1_ps(-87.3f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 r = _mm512_sub_ps(_mm512_sub_ps(x, _mm512_mul_ps(n, _mm512_set1_ps(0.693145752f))),
                                   _mm512_mul_ps(n, _mm512_set1_ps(1.42860677e-6f)));
    __m512 p = _mm512_set1_ps(1.0f / 720.0f);
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(0.5f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.0f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.0f));
    const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_maskz_mul_ps((__mmask16)~under, p, _mm512_castsi512_ps(bits));
}

/* probs_portable with AVX-512 (contiguous mask rows only) */
static int probs_simd(Work *w, const int32_t *si, float a, const void *mrow, int kind, float *sum)
{
    const int64_t Lk = w->Lk;
    float *e = w->e;
    const __m512 va = _mm512_set1_ps(a), ninf = _mm512_set1_ps(-INFINITY);
    __m512 mx = ninf;
    __mmask16 nan = 0;
    for (int64_t j = 0; j < Lk; j += 16) {
        const __mmask16 k = Lk - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (Lk - j)) - 1);
        const __m512i raw = _mm512_sub_epi32(_mm512_loadu_si512(si + j), _mm512_loadu_si512(w->ksum128 + j));
        __m512 x = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(raw), va), _mm512_loadu_ps(w->sk + j));
        if (kind == MASK_ADD)
            x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(k, (const float *)mrow + j));
        else if (kind == MASK_KEEP) {
            const __m128i keep = _mm_maskz_loadu_epi8(k, (const uint8_t *)mrow + j);
            x = _mm512_mask_blend_ps(_mm_cmpeq_epi8_mask(keep, _mm_setzero_si128()), x, ninf);
        }
        x = _mm512_mask_blend_ps(k, ninf, x);
        _mm512_storeu_ps(e + j, x); /* e has room for whole blocks */
        nan |= _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
        mx = _mm512_max_ps(mx, x);
    }
    const float m = _mm512_reduce_max_ps(mx);
    if (nan || m == INFINITY) return -1;
    if (m == -INFINITY) return 0;
    const __m512 vm = _mm512_set1_ps(m), v255 = _mm512_set1_ps(255.0f);
    __m512 sm = _mm512_setzero_ps();
    for (int64_t j = 0; j < Lk; j += 16) {
        const __mmask16 k = Lk - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (Lk - j)) - 1);
        const __m512 x = _mm512_maskz_mov_ps(k, exp16(_mm512_sub_ps(_mm512_loadu_ps(e + j), vm)));
        sm = _mm512_add_ps(sm, x);
        const __m512i c = _mm512_cvt_roundps_epi32(_mm512_mul_ps(x, v255), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        /* whole 16-byte stores (p has room up to Lkp; lanes past Lk hold code 0): masked stores are slow on some CPUs */
        _mm_storeu_si128((__m128i *)(w->p + j), _mm512_cvtusepi32_epi8(c));
    }
    float lanes[16];
    _mm512_storeu_ps(lanes, sm);
    float t = 0.0f;
    for (int l = 0; l < 16; l++) t += lanes[l];
    *sum = t;
    return 1;
}
#endif

static int probs(Work *w, const int32_t *si, float a, const void *mrow, int kind, int64_t mstride, int simd,
                 float *sum)
{
#if HAVE_VNNI
    if (simd && (kind == MASK_NONE || mstride == 1)) return probs_simd(w, si, a, mrow, kind, sum);
#endif
    (void)simd;
    return probs_portable(w, si, a, mrow, kind, mstride, sum);
}

/* Keys after the last one that any query of batch row b (any head) may attend get probability 0:
 * they are left out, and so is their value in V's per-channel scale. Returns how many keys remain. */
static int64_t kept_keys(const void *mask, int kind, const int64_t *ms, int64_t b, int64_t H, int64_t Lq,
                         int64_t Lk)
{
    if (kind == MASK_NONE) return Lk;
    const int64_t nh = ms[1] ? H : 1, nq = ms[2] ? Lq : 1;
    for (int64_t j = Lk - 1; j >= 0; j--)
        for (int64_t h = 0; h < nh; h++)
            for (int64_t i = 0; i < nq; i++) {
                const int64_t at = b * ms[0] + h * ms[1] + i * ms[2] + j * ms[3];
                if (kind == MASK_KEEP ? ((const uint8_t *)mask)[at] != 0 : ((const float *)mask)[at] != -INFINITY)
                    return j + 1;
            }
    return 0;
}

/* 0 when rows [lo, hi) of one head's (rows, D) matrix (row stride rs) hold NaN or inf: the keys and
 * queries the kernel skips still decide, as in float attention, whether the result is finite */
static int rows_finite(const float *x, int64_t rs, int64_t lo, int64_t hi, int64_t D)
{
    uint32_t worst = 0;
    for (int64_t r = lo; r < hi; r++)
        for (int64_t d = 0; d < D; d++) {
            const uint32_t b = abs_bits(x[r * rs + d]);
            worst = b > worst ? b : worst;
        }
    return worst < 0x7f800000u;
}

/* set the key count of n heads' buffers (allocated for at least that many keys) */
static void use_keys(Work *w, int64_t n, int64_t Lk)
{
    for (int64_t h = 0; h < n; h++) {
        w[h].Lk = Lk;
        w[h].Lkp = round_up(Lk, 16);
        w[h].Jg = (Lk + 3) / 4;
    }
}

/* 1 when this build uses the AVX-512 VNNI path */
int lowbit_attention_has_vnni(void) { return HAVE_VNNI; }

/* Strides are in elements: (batch, head, row) for q, k, v and out (the channel stride must be 1);
 * (batch, head, query, key) for the mask, 0 where it broadcasts. Returns how many (batch, head)
 * pairs held NaN or inf in Q, K or V or a score that overflowed (their output rows are not all written:
 * the caller falls back),
 * or -1 when scratch memory could not be allocated (nothing usable written). */
int64_t lowbit_attention_int8(const float *q, const int64_t *qs, const float *k, const int64_t *ks,
                              const float *v, const int64_t *vs, int64_t B, int64_t H, int64_t Lq,
                              int64_t Lk, int64_t D, const void *mask, int mask_kind, const int64_t *ms,
                              float scale, float *out, const int64_t *os, int simd, int nthreads)
{
    int64_t bad = 0, oom = 0;
    /* a task is a batch row with all its heads (read front to back), or one head when there are too
     * few batch rows to keep every thread busy */
    const int64_t hc = B >= 2 * nthreads ? H : 1, ntask = B * (H / hc);
#pragma omp parallel num_threads(nthreads) reduction(+ : bad, oom)
    {
        Work *w = calloc((size_t)hc, sizeof(Work));
        void *block = w ? work_alloc(w, hc, Lq, Lk, D) : NULL;
        const int ok = block != NULL;
        if (!ok) oom++;
#pragma omp for schedule(static)
        for (int64_t task = 0; task < ntask; task++) {
            if (!ok) continue;
            const int64_t b = task / (H / hc), h0 = (task % (H / hc)) * hc;
            const int64_t keys = kept_keys(mask, mask_kind, ms, b, H, Lq, Lk);
            int skipped_finite = 1;
            for (int64_t hh = 0; hh < hc; hh++) {
                const int64_t h = h0 + hh;
                if (keys == 0) skipped_finite &= rows_finite(q + b * qs[0] + h * qs[1], qs[2], 0, Lq, D);
                skipped_finite &= rows_finite(k + b * ks[0] + h * ks[1], ks[2], keys, Lk, D);
                skipped_finite &= rows_finite(v + b * vs[0] + h * vs[1], vs[2], keys, Lk, D);
            }
            if (!skipped_finite) { /* non-finite input where the kernel would not look: the float path decides */
                bad++;
                continue;
            }
            if (keys == 0) { /* every key masked for every query: zero outputs, as torch */
                for (int64_t hh = 0; hh < hc; hh++)
                    for (int64_t i = 0; i < Lq; i++)
                        memset(out + b * os[0] + (h0 + hh) * os[1] + i * os[2], 0, sizeof(float) * (size_t)D);
                continue;
            }
            use_keys(w, hc, keys);
            if (pack(w, hc, q + b * qs[0] + h0 * qs[1], qs[1], qs[2], k + b * ks[0] + h0 * ks[1], ks[1], ks[2],
                     v + b * vs[0] + h0 * vs[1], vs[1], vs[2], simd)) {
                bad++;
                continue;
            }
            for (int64_t hh = 0; hh < hc; hh++) {
                Work *wh = w + hh;
                const int64_t h = h0 + hh;
                const char *mbh = mask_kind == MASK_ADD ? (const char *)mask + 4 * (b * ms[0] + h * ms[1])
                                : mask_kind == MASK_KEEP ? (const char *)mask + b * ms[0] + h * ms[1] : NULL;
                int stop = 0;
                for (int64_t i = 0; i < Lq && !stop; i++) {
                    if (i % QBLOCK == 0) qk(wh, i, i + QBLOCK < Lq ? i + QBLOCK : Lq, simd);
                    const int64_t mi = i * ms[2];
                    const void *mrow = mask_kind == MASK_ADD ? (const void *)((const float *)mbh + mi)
                                     : mask_kind == MASK_KEEP ? (const void *)((const uint8_t *)mbh + mi) : NULL;
                    float *o = out + b * os[0] + h * os[1] + i * os[2];
                    float sum;
                    const int alive = probs(wh, wh->s + (i % QBLOCK) * wh->Lkp, wh->sq[i] * scale, mrow, mask_kind,
                                            ms[3], simd, &sum);
                    if (alive < 0) { /* a score overflowed float32: the caller's float path defines the result */
                        bad++;
                        stop = 1;
                        continue;
                    }
                    if (!alive) {
                        for (int64_t d = 0; d < D; d++) o[d] = 0.0f; /* every key masked: a zero output, as torch */
                        continue;
                    }
                    pv(wh, 1.0f / (sum * 255.0f), o, simd);
                }
            }
        }
        free(block);
        free(w);
    }
    return oom ? -1 : bad;
}
