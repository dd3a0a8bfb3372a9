/* Rotary position embedding of MLA's rope parts (queries of every head and the shared key) in one call.
 *
 * The torch form is nine small ops per tensor (to float32, pairs to complex, the product, real and imaginary
 * parts, concatenated, back to bf16) at about 50 us a layer at decode sizes, for a few hundred multiplies.
 */
#include "bf16_common.h"

ALWAYS_INLINE float bf16_to_f32(bf16 v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Rotate the rows of one [N, R] block (rows `stride` apart) at one position: pairs (x[2i], x[2i+1]) when
 * `interleave`, else (x[i], x[i + R/2]); out [N, R] contiguous holds the rotated pairs' first members, then
 * their second members (the layout the model keeps), each computed in float32 and rounded once. */
static void rotate_rows(const bf16 *x, int64_t n, int64_t stride, int64_t R, const float *cos, const float *sin,
                        int interleave, bf16 *out) {
    int64_t half = R / 2;
    for (int64_t r = 0; r < n; r++) {
        const bf16 *row = x + r * stride;
        bf16 *o = out + r * R;
        for (int64_t i = 0; i < half; i++) {
            float a = bf16_to_f32(interleave ? row[2 * i] : row[i]);
            float b = bf16_to_f32(interleave ? row[2 * i + 1] : row[i + half]);
            /* (a + ib)(c + is), each product rounded before the sum as a complex product is computed */
            float ac = a * cos[i], bs = b * sin[i], as = a * sin[i], bc = b * cos[i];
            o[i] = to_bf16(ac - bs);
            o[i + half] = to_bf16(as + bc);
        }
    }
}

/* q [T, H, R] bf16 (row stride q_row, head stride q_head, unit inner stride), k [T, R] bf16 (row stride k_row),
 * tables cos/sin [table_len, R/2] float32 (scale applied), positions [T] int64 -> q_out [T, H, R] and
 * k_out [T, R] bf16, contiguous. Returns -1 (writing nothing) when a position is outside the tables. */
int rope_bf16(int64_t T, int64_t H, int64_t R, const bf16 *q, int64_t q_row, int64_t q_head, const bf16 *k,
              int64_t k_row, const float *cos, const float *sin, int64_t table_len, const int64_t *positions,
              int interleave, bf16 *q_out, bf16 *k_out) {
    for (int64_t t = 0; t < T; t++)
        if (positions[t] < 0 || positions[t] >= table_len)
            return -1;
    int64_t half = R / 2;
    for (int64_t t = 0; t < T; t++) {
        const float *c = cos + positions[t] * half, *s = sin + positions[t] * half;
        rotate_rows(q + t * q_row, H, q_head, R, c, s, interleave, q_out + t * H * R);
        rotate_rows(k + t * k_row, 1, 0, R, c, s, interleave, k_out + t * R);
    }
    return 0;
}
