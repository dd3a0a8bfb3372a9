/* RMSNorm of a few bf16 rows on one CPU core (AVX-512), as the model's torch form computes it.
 *
 * The torch form is five ops (to float32, the fused norm, back to bf16, times the weight) at 20-25 us a call
 * at decode sizes, where the arithmetic is a microsecond; a decode step runs two per layer.
 */
#include "bf16_common.h"

/* out [T, D] bf16 = weight * bf16(x / sqrt(mean(x^2) + eps)), the normalisation in float32 and rounded to bf16
 * before the (bf16) product with weight [D] bf16, as the reference rounds. x [T, D] bf16. */
void rms_norm_bf16(int64_t T, int64_t D, const bf16 *x, const bf16 *weight, float eps, bf16 *out) {
    for (int64_t t = 0; t < T; t++) {
        const bf16 *row = x + t * D;
        __m512 ss = _mm512_setzero_ps();
        for (int64_t j = 0; j < D; j += 16) {
            __m512 v = load16_bf16(row + j, D - j);
            ss = _mm512_fmadd_ps(v, v, ss);
        }
        float inv = 1.0f / sqrtf(_mm512_reduce_add_ps(ss) / (float)D + eps);
        for (int64_t j = 0; j < D; j++) {
            uint32_t u = (uint32_t)row[j] << 16, wu = (uint32_t)weight[j] << 16;
            float v, w;
            memcpy(&v, &u, 4);
            memcpy(&w, &wu, 4);
            uint32_t nb = (uint32_t)to_bf16(v * inv) << 16;
            float n;
            memcpy(&n, &nb, 4);
            out[t * D + j] = to_bf16(w * n);
        }
    }
}
