/* The routed experts of one MoE layer at decode sizes, in one call on one CPU core (AVX-512 BF16).
 *
 * Built at first use by moemesh.kernels.native (no torch headers: raw pointers in, called through ctypes).
 * At a handful of tokens a step is bound by reading weights, and a oneDNN call's fixed set-up (15-20 us)
 * costs more than reading a small expert; these kernels stream each weight row once, keep every chosen
 * token in registers against it, and cost a few microseconds per call. No software prefetch: an expert's
 * rows are read in ascending order (bf16_common.h's dot_block), a stream the hardware prefetchers follow; the
 * prefetches that helped the earlier order cost 1.1-1.3x here (AMD Zen 4).
 *
 * Layout legend: T tokens, D hidden, E experts, K experts per token, I expert intermediate size.
 * Every matrix is row-major and contiguous; bf16 values travel as uint16_t bit patterns.
 */
#include "bf16_common.h"

/* ---- routed experts ---------------------------------------------------------------------------------- */

/* out[T, D] = sum over k of topk_weights[t, k] * W2_e(silu(G_e x_t) * U_e x_t), e = topk_ids[t, k], plus
 * `shared` [T, D] when not NULL; x, out, shared bf16; w13 [E, 2I, D] (gate rows then up rows), w2 [E, D, I]
 * bf16; topk_ids [T, K] int64; topk_weights [T, K] float32. The (token, expert) pairs are grouped by expert,
 * so each chosen expert's weights are read once; sums in float32, rounded to bf16 once at the end (the
 * SwiGLU activation is rounded to bf16 on its way into the down projection, as in the eager math).
 * Returns 0, -1 for an expert id outside [0, E), -2 when out of memory. */
int moe_bf16_experts(int64_t T, int64_t D, int64_t I, int64_t E, int64_t K, const bf16 *x,
                     const int64_t *topk_ids, const float *topk_weights, const bf16 *w13, const bf16 *w2,
                     const bf16 *shared, bf16 *out) {
    int64_t P = T * K;
    for (int64_t p = 0; p < P; p++)
        if (topk_ids[p] < 0 || topk_ids[p] >= E) return -1;
    int64_t *start = calloc((size_t)E + 1, sizeof(int64_t));
    int64_t *tok = malloc(sizeof(int64_t) * (size_t)(P > 0 ? P : 1));
    float *wt = malloc(sizeof(float) * (size_t)(P > 0 ? P : 1));
    float *acc = calloc((size_t)(T * D > 0 ? T * D : 1), sizeof(float));
    bf16 *act = malloc(sizeof(bf16) * (size_t)(P * I > 0 ? P * I : 1))  /* P: ids may repeat */;
    int rc = 0;
    if (!start || !tok || !wt || !acc || !act) {
        rc = -2;
        goto done;
    }
    /* counting sort of the pairs by expert, stable in token order */
    for (int64_t p = 0; p < P; p++) start[topk_ids[p] + 1]++;
    for (int64_t e = 0; e < E; e++) start[e + 1] += start[e];
    {
        int64_t *fill = malloc(sizeof(int64_t) * (size_t)(E ? E : 1));
        if (!fill) {
            rc = -2;
            goto done;
        }
        memcpy(fill, start, sizeof(int64_t) * (size_t)E);
        for (int64_t p = 0; p < P; p++) {
            int64_t s = fill[topk_ids[p]]++;
            tok[s] = p / K;
            wt[s] = topk_weights[p];
        }
        free(fill);
    }
    for (int64_t e = 0; e < E; e++) {
        int64_t n = start[e + 1] - start[e];
        if (!n) continue;
        const int64_t *etok = tok + start[e];
        const float *ewt = wt + start[e];
        const bf16 *g = w13 + e * 2 * I * D, *wd = w2 + e * D * I;
        const bf16 *rows[16], *group[4];
        float res[16];
        _Alignas(64) float silu[16];
        /* gate-up, 8 columns (8 gate rows + 8 up rows) at a time; those 16 rows stay in L1 while the token
         * groups pass over them. A block of R rows holds R/2 gate rows then the matching R/2 up rows, so gate
         * lane t*R + j pairs with up lane t*R + R/2 + j. */
        for (int64_t col = 0; col < I; col += 8) {
            for (int64_t t0 = 0, take; t0 < n; t0 += take) {
                int R = block_shape(n - t0, &take), h = R / 2, nt = 16 / R;
                for (int t = 0; t < nt; t++) group[t] = x + etok[t0 + (t < take ? t : 0)] * D;
                for (int b = 0; b < 16 / R; b++) {
                    int64_t c0 = col + b * h;
                    for (int j = 0; j < h; j++) {
                        int64_t cc = c0 + j < I ? c0 + j : I - 1;  /* padding repeats a valid row, dropped */
                        rows[j] = g + cc * D;
                        rows[h + j] = g + (I + cc) * D;
                    }
                    dot_rows(R, rows, group, D, res);
                    __m512 v = _mm512_loadu_ps(res);
                    __m512 one = _mm512_set1_ps(1.0f);
                    _mm512_store_ps(silu, _mm512_div_ps(v, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), v)))));
                    for (int64_t t = 0; t < take; t++)
                        for (int j = 0; j < h && c0 + j < I; j++)
                            act[(t0 + t) * I + c0 + j] = to_bf16(silu[t * R + j] * res[t * R + h + j]);
                }
            }
        }
        /* down projection, 16 rows of w2[e] at a time, each result weighted into its token's sum */
        for (int64_t row = 0; row < D; row += 16) {
            for (int64_t t0 = 0, take; t0 < n; t0 += take) {
                int R = block_shape(n - t0, &take), nt = 16 / R;
                for (int t = 0; t < nt; t++) group[t] = act + (t0 + (t < take ? t : 0)) * I;
                for (int b = 0; b < 16 / R; b++) {
                    int64_t r0 = row + b * R;
                    for (int r = 0; r < R; r++) rows[r] = wd + (r0 + r < D ? r0 + r : D - 1) * I;
                    dot_rows(R, rows, group, I, res);
                    for (int64_t t = 0; t < take; t++) {
                        float *dst = acc + etok[t0 + t] * D, w = ewt[t0 + t];
                        for (int r = 0; r < R && r0 + r < D; r++) dst[r0 + r] += w * res[t * R + r];
                    }
                }
            }
        }
    }
    for (int64_t i = 0; i < T * D; i++) {
        float v = acc[i];
        if (shared) {
            uint32_t u = (uint32_t)shared[i] << 16;
            float s;
            memcpy(&s, &u, 4);
            v += s;
        }
        out[i] = to_bf16(v);
    }
done:
    free(start);
    free(tok);
    free(wt);
    free(acc);
    free(act);
    return rc;
}
