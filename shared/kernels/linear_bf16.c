/* A linear layer at decode sizes on one CPU core (AVX-512 BF16): out = x W^T (+ bias) for a few rows of x.
 *
 * At 1-16 rows a oneDNN matmul on a prepacked weight pays 15-20 us of set-up per call, more than reading a
 * small weight (a [768, 192] bf16 weight is 295 KB, ~10 us at 30 GB/s); a decode step of a small model makes
 * ~150 such calls. Here each weight row is streamed once, every row of x held against it, in ascending order
 * (no software prefetch: the hardware prefetchers follow one ascending stream).
 */
#include "bf16_common.h"

/* out [T, N] bf16 = x [T, K] bf16 times w [N, K] bf16 transposed, plus bias [N] bf16 when not NULL; float32
 * sums (the bias added before the one rounding). */
void linear_bf16(int64_t T, int64_t K, int64_t N, const bf16 *x, const bf16 *w, const bf16 *bias, bf16 *out) {
    const bf16 *rows[16], *group[4];
    float res[16];
    for (int64_t row = 0; row < N; row += 16) {
        for (int64_t t0 = 0, take; t0 < T; t0 += take) {
            int R = block_shape(T - t0, &take), nt = 16 / R;
            for (int t = 0; t < nt; t++) group[t] = x + (t0 + (t < take ? t : 0)) * K;
            for (int b = 0; b < 16 / R; b++) {
                int64_t r0 = row + b * R;
                for (int r = 0; r < R; r++) rows[r] = w + (r0 + r < N ? r0 + r : N - 1) * K;
                dot_rows(R, rows, group, K, res);
                for (int64_t t = 0; t < take; t++)
                    for (int r = 0; r < R && r0 + r < N; r++) {
                        float v = res[t * R + r];
                        if (bias) {
                            uint32_t u = (uint32_t)bias[r0 + r] << 16;
                            float f;
                            memcpy(&f, &u, 4);
                            v += f;
                        }
                        out[(t0 + t) * N + r0 + r] = to_bf16(v);
                    }
            }
        }
    }
}
