/* The routed experts of one MoE layer at prefill sizes, in one call on one CPU core (AVX-512 BF16).
 *
 * A prefill chunk gives each expert tens to hundreds of rows; oneDNN's per-expert matmuls (two per expert, ~15-20
 * us of set-up each, and blocking tuned for large matrices) ran the small benchmark shape's experts at ~85
 * GFLOP/s. Here the weights are kept pair-interleaved ("VNNI" layout: for each pair of input columns, every output
 * row's two values side by side), so that one AVX-512 BF16 dot-product instruction multiplies 16 output columns by
 * two inputs of one token with no horizontal sums; a 4-token x 64-column block keeps its 16 accumulators in
 * registers over the whole input dimension.
 *
 * Layout legend: T tokens, D hidden, E experts, K experts per token, I expert intermediate size.
 */
#include "bf16_common.h"

/* c[m][0..16 NV) = sum over k of x_m[k] * W[n0 + j, k] for MR rows x_m (bf16, K long, K even) and NV vectors of
 * 16 columns from n0; p is W's pairs [K/2, N]. */
ALWAYS_INLINE void gemm_block(const int MR, const int NV, const bf16 *const *xr, const uint32_t *p, int64_t N,
                              int64_t K2, int64_t n0, float *c) {
    __m512 acc[4][4];
#pragma GCC unroll 4
    for (int m = 0; m < MR; m++)
#pragma GCC unroll 4
        for (int v = 0; v < NV; v++) acc[m][v] = _mm512_setzero_ps();
    const uint32_t *col = p + n0;
    for (int64_t k2 = 0; k2 < K2; k2++, col += N) {
        __m512bh w[4];
#pragma GCC unroll 4
        for (int v = 0; v < NV; v++) w[v] = (__m512bh)_mm512_loadu_si512(col + 16 * v);
#pragma GCC unroll 4
        for (int m = 0; m < MR; m++) {
            uint32_t pair;
            memcpy(&pair, xr[m] + 2 * k2, 4);
            __m512bh xb = (__m512bh)_mm512_set1_epi32((int)pair);
#pragma GCC unroll 4
            for (int v = 0; v < NV; v++) acc[m][v] = _mm512_dpbf16_ps(acc[m][v], w[v], xb);
        }
    }
#pragma GCC unroll 4
    for (int m = 0; m < MR; m++)
#pragma GCC unroll 4
        for (int v = 0; v < NV; v++) _mm512_storeu_ps(c + m * 64 + 16 * v, acc[m][v]);
}

#define GEMM_VARIANT(MR, NV) \
    static void gemm_##MR##x##NV(const bf16 *const *xr, const uint32_t *p, int64_t N, int64_t K2, int64_t n0, \
                                 float *c) { gemm_block(MR, NV, xr, p, N, K2, n0, c); }
GEMM_VARIANT(4, 4) GEMM_VARIANT(3, 4) GEMM_VARIANT(2, 4) GEMM_VARIANT(1, 4)
GEMM_VARIANT(4, 1) GEMM_VARIANT(3, 1) GEMM_VARIANT(2, 1) GEMM_VARIANT(1, 1)

typedef void (*gemm_fn)(const bf16 *const *, const uint32_t *, int64_t, int64_t, int64_t, float *);
static const gemm_fn WIDE[5] = {0, gemm_1x4, gemm_2x4, gemm_3x4, gemm_4x4};
static const gemm_fn NARROW[5] = {0, gemm_1x1, gemm_2x1, gemm_3x1, gemm_4x1};

/* For rows xr[0..mr) (mr <= 4) against W's pairs p [K/2, N] (N a multiple of 16): hand each 64- or 16-column
 * block's results c [mr][64] to `use`. */
#define FOR_EACH_BLOCK(mr, xr, p, N, K2, c, n0, width, BODY)                                  \
    for (int64_t n0 = 0; n0 < (N);) {                                                          \
        int64_t width = (N) - n0 >= 64 ? 64 : 16;                                              \
        (width == 64 ? WIDE : NARROW)[mr](xr, p, N, K2, n0, c);                                \
        BODY                                                                                   \
        n0 += width;                                                                           \
    }

/* out[T, D] = sum over k of topk_weights[t, k] * W2_e(silu(G_e x_t) * U_e x_t), e = topk_ids[t, k]; x, out bf16;
 * p13 [E, D/2, 2I] and p2 [E, I/2, D] the experts' pairs (pack_pairs_bf16 of w13[e] [2I, D] and w2[e] [D, I]);
 * D and I even, D and 2I multiples of 16; topk_ids [T, K] int64; topk_weights [T, K] float32. Sums in float32,
 * the activation rounded to bf16 on its way into the down projection, the output rounded once.
 * Returns 0, -1 for an expert id outside [0, E), -2 when out of memory. */
int moe_bf16_experts_pairs(int64_t T, int64_t D, int64_t I, int64_t E, int64_t K, const bf16 *x,
                           const int64_t *topk_ids, const float *topk_weights, const uint32_t *p13,
                           const uint32_t *p2, bf16 *out) {
    int64_t P = T * K, I2 = 2 * I;
    for (int64_t p = 0; p < P; p++)
        if (topk_ids[p] < 0 || topk_ids[p] >= E) return -1;
    int64_t *start = calloc((size_t)E + 1, sizeof(int64_t));
    int64_t *fill = malloc(sizeof(int64_t) * (size_t)(E + 1));
    int64_t *tok = malloc(sizeof(int64_t) * (size_t)(P + 1));
    float *wt = malloc(sizeof(float) * (size_t)(P + 1));
    float *acc = calloc((size_t)(T * D + 1), sizeof(float));
    bf16 *act = malloc(sizeof(bf16) * (size_t)(4 * I + 1));
    float *c = aligned_alloc(64, sizeof(float) * 4 * 64);
    int rc = 0;
    if (!start || !fill || !tok || !wt || !acc || !act || !c) {
        rc = -2;
        goto done;
    }
    for (int64_t p = 0; p < P; p++) start[topk_ids[p] + 1]++;
    for (int64_t e = 0; e < E; e++) start[e + 1] += start[e];
    memcpy(fill, start, sizeof(int64_t) * (size_t)E);
    for (int64_t p = 0; p < P; p++) {
        int64_t s = fill[topk_ids[p]]++;
        tok[s] = p / K;
        wt[s] = topk_weights[p];
    }
    for (int64_t e = 0; e < E; e++) {
        const uint32_t *g = p13 + e * (D / 2) * I2, *dn = p2 + e * (I / 2) * D;
        for (int64_t s0 = start[e]; s0 < start[e + 1]; s0 += 4) {
            int mr = start[e + 1] - s0 < 4 ? (int)(start[e + 1] - s0) : 4;
            const bf16 *xr[4], *ar[4];
            for (int m = 0; m < mr; m++) {
                xr[m] = x + tok[s0 + m] * D;
                ar[m] = act + m * I;
            }
            /* gate and up for these rows: columns [j, j + 64) of the gate and of the up half meet in act */
            for (int64_t j = 0; j < I;) {
                int64_t width = I - j >= 64 ? 64 : 16;
                float cu[4 * 64];
                (width == 64 ? WIDE : NARROW)[mr](xr, g, I2, D / 2, j, c);
                (width == 64 ? WIDE : NARROW)[mr](xr, g, I2, D / 2, I + j, cu);
                for (int m = 0; m < mr; m++)
                    for (int64_t q = 0; q < width; q += 16) {
                        __m512 gv = _mm512_loadu_ps(c + m * 64 + q), uv = _mm512_loadu_ps(cu + m * 64 + q);
                        __m512 sv = _mm512_div_ps(gv, _mm512_add_ps(_mm512_set1_ps(1.0f),
                                                                    exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv))));
                        _Alignas(64) float r[16];
                        _mm512_store_ps(r, _mm512_mul_ps(sv, uv));
                        for (int i = 0; i < 16; i++) act[m * I + j + q + i] = to_bf16(r[i]);
                    }
                j += width;
            }
            /* down projection, weighted into each token's float32 sum */
            FOR_EACH_BLOCK(mr, ar, dn, D, I / 2, c, n0, width, {
                for (int m = 0; m < mr; m++) {
                    float *dst = acc + tok[s0 + m] * D + n0;
                    __m512 w = _mm512_set1_ps(wt[s0 + m]);
                    for (int64_t q = 0; q < width; q += 16)
                        _mm512_storeu_ps(dst + q, _mm512_fmadd_ps(w, _mm512_loadu_ps(c + m * 64 + q),
                                                                   _mm512_loadu_ps(dst + q)));
                }
            })
        }
    }
    for (int64_t i = 0; i < T * D; i++) out[i] = to_bf16(acc[i]);
done:
    free(start);
    free(fill);
    free(tok);
    free(wt);
    free(acc);
    free(act);
    free(c);
    return rc;
}
