/* DeepSeek-V3's router ("noaux_tc": sigmoid scores, a bias that steers the choice, group-limited top-k) for a few
 * tokens on one CPU core, in float32 as the model's torch form computes it.
 *
 * The torch form is ~18 small ops per MoE layer (the gate's matmul, sigmoid, the group scores' top-2 sums, the
 * group mask, two top-k, a gather and the normalisation), 50-60 us at decode sizes for a few microseconds of
 * arithmetic.
 */
#include "bf16_common.h"

/* ids [T, K] int64 and weights [T, K] float32 for tokens x [T, D] bf16 against the gate w [E, D] float32:
 * s = sigmoid(x w^T); the choice ranks s + bias [E] among the experts of the `topk_group` groups (of G equal
 * groups) whose two best biased scores sum highest; weights are the chosen experts' s, divided by their sum (plus
 * 1e-20) when `norm`, times `scaling`. Ties go to the lower index. Returns 0, -1 when the groups cannot hold the
 * choice (E not a multiple of G, topk_group outside [1, G], K above the chosen groups' experts), -2 when out of
 * memory. */
int router_noaux_bf16(int64_t T, int64_t D, int64_t E, int64_t G, int64_t topk_group, int64_t K, const bf16 *x,
                      const float *w, const float *bias, int norm, float scaling, int64_t *ids, float *weights) {
    if (G < 1 || E % G || topk_group < 1 || topk_group > G || K < 1 || K > topk_group * (E / G)) return -1;
    float *xf = malloc(sizeof(float) * (size_t)(D + 16)), *s = malloc(sizeof(float) * (size_t)E);
    float *b = malloc(sizeof(float) * (size_t)E), *gs = malloc(sizeof(float) * (size_t)G);
    char *take = malloc((size_t)E), *gtake = malloc((size_t)G);
    int rc = 0;
    if (!xf || !s || !b || !gs || !take || !gtake) {
        rc = -2;
        goto done;
    }
    int64_t per = E / G;
    for (int64_t t = 0; t < T; t++) {
        for (int64_t j = 0; j < D; j += 16) _mm512_storeu_ps(xf + j, load16_bf16(x + t * D + j, D - j));
        for (int64_t e = 0; e < E; e++) {
            __m512 acc = _mm512_setzero_ps();
            const float *we = w + e * D;
            int64_t j = 0;
            for (; j + 16 <= D; j += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(we + j), _mm512_loadu_ps(xf + j), acc);
            if (j < D) {
                __mmask16 m = (__mmask16)((1u << (D - j)) - 1);
                acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, we + j), _mm512_maskz_loadu_ps(m, xf + j), acc);
            }
            s[e] = 1.0f / (1.0f + expf(-_mm512_reduce_add_ps(acc)));
            b[e] = s[e] + bias[e];
            take[e] = 0;
        }
        for (int64_t g = 0; g < G; g++) {  /* a group's score: its two best biased scores */
            float m1 = -INFINITY, m2 = -INFINITY;
            for (int64_t e = g * per; e < (g + 1) * per; e++) {
                if (b[e] > m1) {
                    m2 = m1;
                    m1 = b[e];
                } else if (b[e] > m2) {
                    m2 = b[e];
                }
            }
            gs[g] = per > 1 ? m1 + m2 : m1;
            gtake[g] = 0;
        }
        for (int64_t n = 0; n < topk_group; n++) {
            int64_t best = -1;
            for (int64_t g = 0; g < G; g++)
                if (!gtake[g] && (best < 0 || gs[g] > gs[best])) best = g;
            if (best < 0) break;
            gtake[best] = 1;
        }
        float sum = 0.0f;
        for (int64_t k = 0; k < K; k++) {
            int64_t best = -1;
            for (int64_t e = 0; e < E; e++)
                if (gtake[e / per] && !take[e] && (best < 0 || b[e] > b[best])) best = e;
            if (best < 0) break;
            take[best] = 1;
            ids[t * K + k] = best;
            weights[t * K + k] = s[best];
            sum += s[best];
        }
        for (int64_t k = 0; k < K; k++) {
            float v = weights[t * K + k];
            weights[t * K + k] = (norm ? v / (sum + 1e-20f) : v) * scaling;
        }
    }
done:
    free(xf);
    free(s);
    free(b);
    free(gs);
    free(take);
    free(gtake);
    return rc;
}
