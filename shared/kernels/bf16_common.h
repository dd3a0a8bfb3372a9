/* Shared pieces of the native bf16 kernels (moe_bf16.c, mla_bf16.c, linear_bf16.c): AVX-512 BF16 dot-product
 * blocks, the SiLU's exp, prefetching and bf16 rounding. Everything is static inline: each kernel file
 * compiles its own copy into the one library moemesh.kernels.native builds.
 *
 * Every matrix is row-major and contiguous; bf16 values travel as uint16_t bit patterns.
 */
#ifndef MOEMESH_BF16_COMMON_H
#define MOEMESH_BF16_COMMON_H

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
 * Each weight row is read whole, from its start to its end, before the next: rows that sit one after the other in
 * memory are then read as one ascending stream, which the hardware prefetchers follow at full speed, where
 * reading 64 bytes of each row in turn (R short streams at once) measured 1.4-1.7x slower on an AMD Zen 4 core.
 * Each 32-element slice of a row is used against every token; the tokens' slices come from L1. The rows' chains
 * of accumulations are independent, so the core overlaps the next row's with this one's. */
ALWAYS_INLINE void dot_block(const bf16 *const *rows, const bf16 *const *toks, int R, int NT, int64_t n,
                             float *out) {
    __m512 acc[16];
    for (int i = 0; i < 16; i++) acc[i] = _mm512_setzero_ps();
    int64_t full = n & ~(int64_t)31;
    __mmask32 m = (__mmask32)((1ULL << (n - full)) - 1);
    for (int r = 0; r < R; r++) {
        const bf16 *row = rows[r];
        for (int64_t k = 0; k < full; k += 32) {
            __m512bh wv = (__m512bh)_mm512_loadu_si512(row + k);
            for (int t = 0; t < NT; t++)
                acc[t * R + r] = _mm512_dpbf16_ps(acc[t * R + r], wv, (__m512bh)_mm512_loadu_si512(toks[t] + k));
        }
        if (full < n) {  /* masked loads read nothing past the row (and fault on nothing) */
            __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(m, row + full);
            for (int t = 0; t < NT; t++)
                acc[t * R + r] = _mm512_dpbf16_ps(acc[t * R + r], wv,
                                                  (__m512bh)_mm512_maskz_loadu_epi16(m, toks[t] + full));
        }
    }
    _mm512_storeu_ps(out, sum16(acc));
}

/* out[t * R + r] = dot(rows[r], toks[t]) over n elements, for R x NT == 16, reading the rows side by side: each
 * 32-element slice of every row in turn. For rows scattered over memory (cache rows on pages of the pool, which the
 * caller prefetches), where reading them one by one (dot_block) measured slower. */
ALWAYS_INLINE void dot_block_across(const bf16 *const *rows, const bf16 *const *toks, int R, int NT, int64_t n,
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
static inline void dot_16x1(const bf16 *const *rows, const bf16 *const *toks, int64_t n, float *out) {
    dot_block(rows, toks, 16, 1, n, out);
}
static inline void dot_8x2(const bf16 *const *rows, const bf16 *const *toks, int64_t n, float *out) {
    dot_block(rows, toks, 8, 2, n, out);
}
static inline void dot_4x4(const bf16 *const *rows, const bf16 *const *toks, int64_t n, float *out) {
    dot_block(rows, toks, 4, 4, n, out);
}
static inline void dot_4x4_across(const bf16 *const *rows, const bf16 *const *toks, int64_t n, float *out) {
    dot_block_across(rows, toks, 4, 4, n, out);
}

/* The block shape for the next `left` tokens: 3 or more ride in 4 x 4 blocks (3 padded by repeating the
 * first), 2 in 8 x 2, 1 in 16 x 1. Returns R, the rows per block; *take is the tokens the group holds. */
static inline int block_shape(int64_t left, int64_t *take) {
    if (left >= 3) {
        *take = left < 4 ? left : 4;
        return 4;
    }
    *take = left;
    return left == 2 ? 8 : 16;
}

/* One R-row block against the group's 16 / R tokens (pointers padded to that count). */
static inline void dot_rows(int R, const bf16 *const *rows, const bf16 *const *toks, int64_t n, float *out) {
    if (R == 4) dot_4x4(rows, toks, n, out);
    else if (R == 8) dot_8x2(rows, toks, n, out);
    else dot_16x1(rows, toks, n, out);
}

/* Into L1: the attention kernel's cache rows (mla_bf16.c), which lie on pages scattered over the pool. */
#define PF_HINT _MM_HINT_T0
/* Ask for [p, p + bytes) ahead of use, for rows the hardware prefetcher cannot guess (not in ascending order). */
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

/* 16 bf16 values at p as float32 (a shift: bf16 is float32's upper half); n < 16 reads only n, the rest 0. */
ALWAYS_INLINE __m512 load16_bf16(const bf16 *p, int64_t n) {
    __m256i v = n >= 16 ? _mm256_loadu_si256((const __m256i *)p) : _mm256_maskz_loadu_epi16((__mmask16)((1u << n) - 1), p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

#endif
