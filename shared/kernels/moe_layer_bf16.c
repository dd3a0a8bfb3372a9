/* The MLP half of a DeepSeek MoE decoder layer for a decode step, after the router, in one call: the shared expert
 * (gate-up, SiLU times up, down), the routed experts' weighted sum, their sum and the residual add.
 *
 * Each stage is what the per-module kernels compute, in the modules' order and roundings: the linear layers and the
 * routed experts are the very functions (linear_bf16.c, moe_bf16.c); the shared expert's SiLU is torch's own, read
 * from a table of its value at every bf16 input (moemesh.kernels.native_decoder makes it with torch), then rounded
 * products and sums as torch rounds bf16 ones. So every output bit is the modules'. What the one call saves is the
 * Python between those calls: ~25 small torch ops a layer.
 *
 * Legend: T tokens, D hidden, E routed experts, K experts per token, I routed and Is shared intermediate sizes.
 */
#include "bf16_common.h"

void linear_bf16(int64_t T, int64_t K, int64_t N, const bf16 *x, const bf16 *w, const bf16 *bias, bf16 *out);
int moe_bf16_experts(int64_t T, int64_t D, int64_t I, int64_t E, int64_t K, const bf16 *x,
                     const int64_t *topk_ids, const float *topk_weights, const bf16 *w13, const bf16 *w2,
                     const bf16 *shared, bf16 *out);

/* One layer's weights and sizes, fixed for the layer's life. gate_up [2Is, D] and down [D, Is] are NULL where the
 * layer has no shared expert; silu [65536] bf16 is SiLU at each bf16 bit pattern. */
typedef struct {
    int64_t D, E, K, I, Is;
    const bf16 *w13, *w2, *gate_up, *down, *silu;
} moe_layer;

ALWAYS_INLINE float f32(bf16 v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* x [T, D] bf16, the stream after attention; h [T, D] bf16, its post-attention norm (the MLP's input); topk_ids
 * [T, K] int64 and topk_weights [T, K] float32, the router's choice. Writes x_out [T, D] bf16 = x + the layer's MLP
 * output. Returns 0, -1 for an expert id outside the layer's experts, -2 when out of memory. */
int moe_layer_decode_bf16(const moe_layer *L, int64_t T, const bf16 *x, const bf16 *h, const int64_t *topk_ids,
                          const float *topk_weights, bf16 *x_out) {
    const int64_t D = L->D, Is = L->Is;
    size_t n = (size_t)(T * (3 * Is + 2 * D));
    bf16 *buf = malloc(sizeof(bf16) * (n + 1));
    if (!buf) return -2;
    bf16 *gu = buf, *act = gu + T * 2 * Is, *shared = act + T * Is, *routed = shared + T * D;
    if (L->gate_up) {
        linear_bf16(T, D, 2 * Is, h, L->gate_up, NULL, gu);
        for (int64_t t = 0; t < T; t++)
            for (int64_t i = 0; i < Is; i++)  /* silu(gate) * up, each rounded to bf16 as torch's two ops round */
                act[t * Is + i] = to_bf16(f32(L->silu[gu[t * 2 * Is + i]]) * f32(gu[t * 2 * Is + Is + i]));
        linear_bf16(T, Is, D, act, L->down, NULL, shared);
    }
    int rc = moe_bf16_experts(T, D, L->I, L->E, L->K, h, topk_ids, topk_weights, L->w13, L->w2, NULL, routed);
    if (rc == 0)
        for (int64_t i = 0; i < T * D; i++) {
            float mlp = L->gate_up ? f32(to_bf16(f32(routed[i]) + f32(shared[i]))) : f32(routed[i]);
            x_out[i] = to_bf16(f32(x[i]) + mlp);
        }
    free(buf);
    return rc;
}
