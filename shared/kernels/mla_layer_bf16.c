/* The attention half of a DeepSeek decoder layer for a decode step, in one call: input RMSNorm, the low-rank query
 * (q_a, its norm, q_b), the latent KV (kv_a, its norm), the rotary embedding, the write of the new latents into
 * the paged cache, absorbed MLA over it, o_proj, the residual add and the post-attention RMSNorm.
 *
 * Each stage is the very function the per-module native kernels call (norm_bf16.c, linear_bf16.c, rope_bf16.c,
 * mla_bf16.c), in the modules' order and on the same rounded intermediates, so every output bit is theirs. What one
 * call saves is what lies between those calls in Python: ~12 kernel calls and ~60 small torch ops a layer (views,
 * splits, output tensors, the cache write's concatenation and scatter), measured at 1.2-1.5 ms of a 7-9 ms decode
 * step on the small benchmark shape.
 *
 * Legend: T tokens (one per sequence), D hidden, Q q_lora_rank, H heads, Dn/R/V the nope/rope/value head dims,
 * C kv_lora_rank, S cache slots, P page-table width.
 */
#include "bf16_common.h"

void rms_norm_bf16(int64_t T, int64_t D, const bf16 *x, const bf16 *weight, float eps, bf16 *out);
void linear_bf16(int64_t T, int64_t K, int64_t N, const bf16 *x, const bf16 *w, const bf16 *bias, bf16 *out);
int rope_bf16(int64_t T, int64_t H, int64_t R, const bf16 *q, int64_t q_row, int64_t q_head, const bf16 *k,
              int64_t k_row, const float *cos, const float *sin, int64_t table_len, const int64_t *positions,
              int interleave, bf16 *q_out, bf16 *k_out);
int mla_decode_bf16(int64_t B, int64_t H, int64_t Dn, int64_t C, int64_t R, int64_t V, int64_t page_size,
                    int64_t P, int64_t num_slots, const bf16 *q_nope, const bf16 *q_pe, const bf16 *kv_b,
                    const bf16 *cache, const int64_t *pages, const int64_t *lens, float scale, bf16 *out);

/* One layer's weights and sizes, fixed for the layer's life (moemesh.kernels.native_decoder builds it once). Biases
 * are NULL where the layer has none. */
typedef struct {
    int64_t D, Q, H, Dn, R, C, V;
    const bf16 *in_norm, *q_a, *q_a_bias, *q_a_norm, *q_b, *kv_a, *kv_a_bias, *kv_a_norm, *kv_b, *o, *o_bias,
        *post_norm;
    float in_eps, q_eps, kv_eps, post_eps, scale;
    int32_t interleave;
} mla_layer;

/* x [T, D] bf16, the residual stream; positions [T] int64; cos/sin [table_len, R/2] float32; cache [S, C + R] bf16
 * (this layer's slots); slots [T] int64, where each token's latents go; pages [T, P] int64, lens [T] int64 (KV
 * lengths, the new token included). Writes the new latents into the cache, x_out [T, D] = x + attention and h_out
 * [T, D] = post-norm(x_out), both bf16. Returns 0; 1 for a position past the rotary tables (nothing written: the
 * caller's modules grow them); -1 for a slot, length or page outside the cache (nothing written); -2 when out of
 * memory (only the attention's own scratch failing after the new rows were written leaves them). */
int mla_layer_decode_bf16(const mla_layer *L, int64_t T, const bf16 *x, const int64_t *positions, const float *cos,
                          const float *sin, int64_t table_len, bf16 *cache, int64_t num_slots, const int64_t *slots,
                          int64_t page_size, int64_t P, const int64_t *pages, const int64_t *lens, bf16 *x_out,
                          bf16 *h_out) {
    const int64_t D = L->D, Q = L->Q, H = L->H, Dn = L->Dn, R = L->R, C = L->C, V = L->V, W = C + R;
    const int64_t qk = Dn + R;
    /* every index checked before anything is computed or written: a bad one leaves the cache as it was */
    for (int64_t t = 0; t < T; t++) {
        if (slots[t] < 0 || slots[t] >= num_slots || lens[t] < 1 || lens[t] > P * page_size) return -1;
        for (int64_t i = 0; i < (lens[t] + page_size - 1) / page_size; i++)
            if (pages[t * P + i] < 0 || (pages[t * P + i] + 1) * page_size > num_slots) return -1;
    }
    /* scratch, in the order of use: h, q_a, q_a normed, q, kv_a, c_kv, c_kv normed, q_pe, k_pe, q_nope, attention, o */
    size_t n = (size_t)(T * (D + 2 * Q + H * qk + W + 2 * C + H * R + R + H * Dn + H * V + D));
    bf16 *buf = malloc(sizeof(bf16) * (n + 1));
    if (!buf) return -2;
    bf16 *h = buf, *qa = h + T * D, *qan = qa + T * Q, *q = qan + T * Q, *kva = q + T * H * qk, *ckv = kva + T * W;
    bf16 *ckvn = ckv + T * C, *qpe = ckvn + T * C, *kpe = qpe + T * H * R, *qnope = kpe + T * R;
    bf16 *attn = qnope + T * H * Dn, *o = attn + T * H * V;
    int rc = 0;

    rms_norm_bf16(T, D, x, L->in_norm, L->in_eps, h);
    linear_bf16(T, D, Q, h, L->q_a, L->q_a_bias, qa);
    rms_norm_bf16(T, Q, qa, L->q_a_norm, L->q_eps, qan);
    linear_bf16(T, Q, H * qk, qan, L->q_b, NULL, q);
    linear_bf16(T, D, W, h, L->kv_a, L->kv_a_bias, kva);
    for (int64_t t = 0; t < T; t++) memcpy(ckv + t * C, kva + t * W, sizeof(bf16) * (size_t)C);
    rms_norm_bf16(T, C, ckv, L->kv_a_norm, L->kv_eps, ckvn);
    if (rope_bf16(T, H, R, q + Dn, H * qk, qk, kva + C, W, cos, sin, table_len, positions, L->interleave, qpe, kpe)) {
        rc = 1;
        goto done;
    }
    for (int64_t t = 0; t < T; t++) {
        bf16 *row = cache + slots[t] * W;
        memcpy(row, ckvn + t * C, sizeof(bf16) * (size_t)C);
        memcpy(row + C, kpe + t * R, sizeof(bf16) * (size_t)R);
        for (int64_t hh = 0; hh < H; hh++)
            memcpy(qnope + (t * H + hh) * Dn, q + (t * H + hh) * qk, sizeof(bf16) * (size_t)Dn);
    }
    rc = mla_decode_bf16(T, H, Dn, C, R, V, page_size, P, num_slots, qnope, qpe, L->kv_b, cache, pages, lens,
                         L->scale, attn);
    if (rc) goto done;
    linear_bf16(T, H * V, D, attn, L->o, L->o_bias, o);
    for (int64_t i = 0; i < T * D; i++) {  /* the residual add as torch adds bf16: in float32, rounded once */
        uint32_t a = (uint32_t)x[i] << 16, b = (uint32_t)o[i] << 16;
        float fa, fb;
        memcpy(&fa, &a, 4);
        memcpy(&fb, &b, 4);
        x_out[i] = to_bf16(fa + fb);
    }
    rms_norm_bf16(T, D, x_out, L->post_norm, L->post_eps, h_out);
done:
    free(buf);
    return rc;
}
