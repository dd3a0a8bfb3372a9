/* bf16 dot-product kernels for decode-sized steps on one CPU core (AVX-512 BF16).
 *
 * Built at first use by moemesh.kernels.native (no torch headers: raw pointers in, called through ctypes).
 * At a handful of tokens a step is bound by reading weights, and a oneDNN call's fixed set-up (15-20 us)
 * costs more than reading a small expert; these kernels stream each weight row once, keep every chosen
 * token in registers against it, and cost a few microseconds per call.
 *
 * Layout legend: T tokens, D hidden, E experts, K experts per token, I expert intermediate size.
 * Every matrix is row-major and contiguous; bf16 values travel as uint16_t bit patterns.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef uint16_t bf16;

#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* The 16 horizontal sums of v[0..15], lane i holding sum(v[i]): a transpose-and-add tree (45 shuffles and
 * adds) instead of 16 separate reductions (~130). */
ALWAYS_INLINE __m512 sum16(const __m512 v[16]) {
    __m512 u[8], w[4];
    for (int i = 0; i < 8; i++)  /* per 128-bit quarter: [a0+a2, b0+b2, a1+a3, b1+b3] */
        u[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                             _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++)  /* per quarter: [a, b, c, d] partial sums of four vectors */
        w[i] = _mm512_add_ps(_mm512_shuffle_ps(u[2 * i], u[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(u[2 * i], u[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    __m512 z01 = _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], _MM_SHUFFLE(2, 0, 2, 0)),
                               _mm512_shuffle_f32x4(w[0], w[1], _MM_SHUFFLE(3, 1, 3, 1)));
    __m512 z23 = _mm512_add_ps(_mm512_shuffle_f32x4(w[2], w[3], _MM_SHUFFLE(2, 0, 2, 0)),
                               _mm512_shuffle_f32x4(w[2], w[3], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(z01, z23, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(z01, z23, _MM_SHUFFLE(3, 1, 3, 1)));
}

/* out[t * R + r] = dot(rows[r], toks[t]) over n elements, in float32, for R rows x NT tokens (R * NT == 16).
 * Each 32-element slice of a weight row is loaded once and used against every token. */
ALWAYS_INLINE void dot_block(const bf16 *const *rows, const bf16 *const *toks, int R, int NT, int64_t n,
                             float *out) {
    __m512 acc[16];
    for (int i = 0; i < 16; i++) acc[i] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= n; k += 32) {
        __m512bh xv[4];
        for (int t = 0; t < NT; t++) xv[t] = (__m512bh)_mm512_loadu_si512(toks[t] + k);
        for (int r = 0; r < R; r++) {
            __m512bh wv = (__m512bh)_mm512_loadu_si512(rows[r] + k);
            for (int t = 0; t < NT; t++) acc[t * R + r] = _mm512_dpbf16_ps(acc[t * R + r], wv, xv[t]);
        }
    }
    if (k < n) {  /* masked loads read nothing past the row (and fault on nothing) */
        __mmask32 m = (__mmask32)((1ULL << (n - k)) - 1);
        __m512bh xv[4];
        for (int t = 0; t < NT; t++) xv[t] = (__m512bh)_mm512_maskz_loadu_epi16(m, toks[t] + k);
        for (int r = 0; r < R; r++) {
            __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(m, rows[r] + k);
            for (int t = 0; t < NT; t++) acc[t * R + r] = _mm512_dpbf16_ps(acc[t * R + r], wv, xv[t]);
        }
    }
    _mm512_storeu_ps(out, sum16(acc));
}

/* Three shapes of the 16-accumulator block: one token against 16 rows, 2 x 8, 4 x 4. */
static void dot_16x1(const bf16 *const *rows, const bf16 *const *toks, int64_t n, float *out) {
    dot_block(rows, toks, 16, 1, n, out);
}
static void dot_8x2(const bf16 *const *rows, const bf16 *const *toks, int64_t n, float *out) {
    dot_block(rows, toks, 8, 2, n, out);
}
static void dot_4x4(const bf16 *const *rows, const bf16 *const *toks, int64_t n, float *out) {
    dot_block(rows, toks, 4, 4, n, out);
}

/* The block shape for the next `left` tokens: 3 or more ride in 4 x 4 blocks (3 padded by repeating the
 * first), 2 in 8 x 2, 1 in 16 x 1. Returns R, the rows per block; *take is the tokens the group holds. */
static int block_shape(int64_t left, int64_t *take) {
    if (left >= 3) {
        *take = left < 4 ? left : 4;
        return 4;
    }
    *take = left;
    return left == 2 ? 8 : 16;
}

/* One R-row block against the group's 16 / R tokens (pointers padded to that count). */
static void dot_rows(int R, const bf16 *const *rows, const bf16 *const *toks, int64_t n, float *out) {
    if (R == 4) dot_4x4(rows, toks, n, out);
    else if (R == 8) dot_8x2(rows, toks, n, out);
    else dot_16x1(rows, toks, n, out);
}

/* Prefetch one 16-row block ahead, into L1. Measured on the small shape at 1-16 tokens: 1.2-1.3x over no
 * prefetch; two blocks ahead or into L2 only was slower or level. */
#define PF_HINT _MM_HINT_T0
#define PF_AHEAD 1
/* Ask for [p, p + bytes) ahead of use: an expert's rows are a fresh stream every few kilobytes, too short
 * for the hardware prefetcher to ramp up on, and the loads of one block alone leave the memory idle. */
static inline void prefetch(const void *p, int64_t bytes) {
    for (int64_t off = 0; off < bytes; off += 64) _mm_prefetch((const char *)p + off, PF_HINT);
}

/* exp(x) for the SiLU: 2^(x log2 e) split into 2^round and a degree-6 polynomial on [-0.5, 0.5]; relative
 * error ~1e-7, far below the bf16 rounding that follows. */
ALWAYS_INLINE __m512 exp16(__m512 x) {
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.0f)), _mm512_set1_ps(-88.0f));
    __m512 y = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
    __m512 n = _mm512_roundscale_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_mul_ps(_mm512_sub_ps(y, n), _mm512_set1_ps(0.6931471805599453f));  /* ln 2^(y-n) */
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

ALWAYS_INLINE bf16 to_bf16(float f) {  /* round to nearest even, as torch rounds; inputs are finite */
    uint32_t u;
    memcpy(&u, &f, 4);
    return (bf16)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

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
            int64_t pc = col + 8 * PF_AHEAD;  /* gate and up rows of a later step of 8 columns */
            if (pc < I) {
                int64_t cols = I - pc < 8 ? I - pc : 8;
                prefetch(g + pc * D, cols * D * 2);
                prefetch(g + (I + pc) * D, cols * D * 2);
            } else if (pc < I + 8 * PF_AHEAD) {  /* the down projection's first rows come next */
                prefetch(wd + (pc - I) * 2 * I, 16 * I * 2);
            }
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
            if (row + 16 * PF_AHEAD < D) prefetch(wd + (row + 16 * PF_AHEAD) * I, 16 * I * 2);
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
