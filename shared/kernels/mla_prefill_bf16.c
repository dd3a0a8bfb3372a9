/* Naive-form MLA attention of one sequence's prefill chunk (causal), on one CPU core (AVX-512 BF16).
 *
 * The torch form makes, per sequence and layer, the keys' concatenation (nope part and the shared rope part), a
 * causal mask, two batched matmuls that each re-lay out their operands, a softmax and the copies between them:
 * ~0.5 ms of a 128-token prompt's ~1 ms a layer on the small benchmark shape, where the arithmetic is ~0.2 ms.
 * Here one call per sequence and layer reads the expanded keys and values where kv_b_proj wrote them, packs each
 * head's keys and values once into the dot products' pair layout, computes only the causal half of the scores,
 * keeps scores and probabilities in float32 and rounds the probabilities to bf16 for the weighted sum (as the
 * torch form's bf16 batched matmul does).
 *
 * Legend: T queries (the chunk's new tokens), N keys (cached + new; the queries are the last T of them), H heads,
 * Dn nope dim, R rope dim, V value dim, K = Dn + R.
 */
#include "bf16_common.h"

/* Query rows a block of scores and outputs holds in registers. */
#define QB 4

static inline uint32_t pair_of(bf16 lo, bf16 hi) { return (uint32_t)lo | ((uint32_t)hi << 16); }

/* kp [D/2, np] <- the N rows of src [N, D] (row stride `stride`) as pairs of dims, key by key (np >= N, a multiple
 * of 32; the padding is zero): one dot-product lane then holds one key, so 16 keys' scores accumulate in one register
 * with no reduction. */
static void pack_pairs(int64_t N, int64_t D, const bf16 *src, int64_t stride, int64_t np, uint32_t *kp) {
    for (int64_t s = 0; s < N; s++) {
        const bf16 *a = src + s * stride;
        for (int64_t d = 0; d < D / 2; d++) kp[d * np + s] = pair_of(a[2 * d], a[2 * d + 1]);
    }
    for (int64_t d = 0; d < D / 2; d++) memset(kp + d * np + N, 0, (size_t)(np - N) * 4);
}

/* vp [ceil(N/2), V] <- head h's values as pairs of positions, column by column (an odd N's last pair weighs 0). */
static void pack_values(int64_t N, int64_t V, const bf16 *v, int64_t v_n, uint32_t *vp) {
    for (int64_t s = 0; s < N; s += 2) {
        const bf16 *a = v + s * v_n, *b = s + 1 < N ? v + (s + 1) * v_n : NULL;
        uint32_t *dst = vp + (s / 2) * V;
        for (int64_t c = 0; c < V; c++) dst[c] = pair_of(a[c], b ? b[c] : 0);
    }
}

/* scores[r][s] = scale * dot(q[r], key s) for the block's `rows` queries and keys [0, n32) (n32 a multiple of 32),
 * qp [QB, K/2] the queries as pairs of dims. */
static void block_scores(int rows, const uint32_t *qp, int64_t kh, const uint32_t *kp, int64_t np, int64_t n32,
                         float scale, float *scores, int64_t sstride) {
    __m512 sc = _mm512_set1_ps(scale);
    for (int64_t k0 = 0; k0 < n32; k0 += 32) {
        __m512 acc[QB][2];
#pragma GCC unroll 4
        for (int r = 0; r < QB; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
        for (int64_t d = 0; d < kh; d++) {
            const uint32_t *row = kp + d * np + k0;
            __m512bh k_lo = (__m512bh)_mm512_loadu_si512(row), k_hi = (__m512bh)_mm512_loadu_si512(row + 16);
#pragma GCC unroll 4
            for (int r = 0; r < QB; r++) {
                __m512bh q = (__m512bh)_mm512_set1_epi32((int)qp[r * kh + d]);
                acc[r][0] = _mm512_dpbf16_ps(acc[r][0], k_lo, q);
                acc[r][1] = _mm512_dpbf16_ps(acc[r][1], k_hi, q);
            }
        }
        for (int r = 0; r < rows; r++) {
            _mm512_storeu_ps(scores + r * sstride + k0, _mm512_mul_ps(acc[r][0], sc));
            _mm512_storeu_ps(scores + r * sstride + k0 + 16, _mm512_mul_ps(acc[r][1], sc));
        }
    }
}

/* Softmax of scores[0, n) in place (float32), then the probabilities as bf16 pairs into pp[0, npairs), zero from
 * position n on. */
static void softmax_pairs(float *scores, int64_t n, int64_t npairs, uint32_t *pp) {
    __m512 mx = _mm512_set1_ps(-INFINITY);
    int64_t s = 0;
    for (; s + 16 <= n; s += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(scores + s));
    float m = _mm512_reduce_max_ps(mx);
    for (; s < n; s++) m = scores[s] > m ? scores[s] : m;
    __m512 mv = _mm512_set1_ps(m), sum = _mm512_setzero_ps();
    for (s = 0; s < n; s += 16) {
        __mmask16 k = n - s >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - s)) - 1);
        __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, scores + s), mv));
        e = _mm512_maskz_mov_ps(k, e);
        sum = _mm512_add_ps(sum, e);
        _mm512_mask_storeu_ps(scores + s, k, e);
    }
    /* pp as bf16 [2 * npairs] is the probabilities in order (a pair's first member in its low half) */
    __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sum));
    bf16 *p = (bf16 *)pp;
    for (s = 0; s < 2 * npairs; s += 32) {
        int64_t left = n - s;
        __mmask16 k0 = left >= 16 ? (__mmask16)0xFFFF : left > 0 ? (__mmask16)((1u << left) - 1) : 0;
        __mmask16 k1 = left >= 32 ? (__mmask16)0xFFFF : left > 16 ? (__mmask16)((1u << (left - 16)) - 1) : 0;
        __m512 lo = _mm512_mul_ps(_mm512_maskz_loadu_ps(k0, scores + s), inv);
        __m512 hi = _mm512_mul_ps(_mm512_maskz_loadu_ps(k1, scores + s + 16), inv);
        __m512i both = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);  /* round to nearest even, as to_bf16 */
        int64_t room = 2 * npairs - s;
        _mm512_mask_storeu_epi16(p + s, room >= 32 ? (__mmask32)0xFFFFFFFFu : (__mmask32)((1u << room) - 1), both);
    }
}

/* out rows [rows, V] (row stride ostride) = the block's probabilities pp [QB, npairs] times the packed values
 * vp [npairs, V], 64 columns at a time (V a multiple of 16), rounded to bf16 once. */
static void block_values(int rows, const uint32_t *pp, int64_t npairs, const uint32_t *vp, int64_t V, bf16 *out,
                         int64_t ostride) {
    for (int64_t c0 = 0; c0 < V; c0 += 64) {
        int nv = V - c0 >= 64 ? 4 : (int)((V - c0) / 16);
        __m512 acc[QB][4];
#pragma GCC unroll 4
        for (int r = 0; r < QB; r++) acc[r][0] = acc[r][1] = acc[r][2] = acc[r][3] = _mm512_setzero_ps();
        for (int64_t i = 0; i < npairs; i++) {
            const uint32_t *row = vp + i * V + c0;
            __m512bh v[4];
#pragma GCC unroll 4
            for (int j = 0; j < 4; j++) v[j] = (__m512bh)(j < nv ? _mm512_loadu_si512(row + 16 * j) : _mm512_setzero_si512());
#pragma GCC unroll 4
            for (int r = 0; r < QB; r++) {
                __m512bh p = (__m512bh)_mm512_set1_epi32((int)pp[r * npairs + i]);
#pragma GCC unroll 4
                for (int j = 0; j < 4; j++) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], v[j], p);
            }
        }
        for (int r = 0; r < rows; r++)
            for (int j = 0; j < nv; j++)
                _mm256_storeu_si256((__m256i *)(out + r * ostride + c0 + 16 * j),
                                    (__m256i)_mm512_cvtneps_pbh(acc[r][j]));
    }
}

/* q_nope [T, H, Dn] and q_pe [T, H, R] (row strides qn_t / qp_t, head strides qn_h / qp_h, unit inner stride), kv
 * [N, H, Dn + V] (row stride kv_n, head stride kv_h; each head's nope keys then its values), k_pe [N, R] (row
 * stride kp_n) -> out [T, H, V] bf16 contiguous: query t sees keys [0, N - T + t]. Dn and R even, V a multiple of
 * 16, T <= N. Returns -1 (writing nothing) when scratch memory cannot be had. */
int mla_prefill_bf16(int64_t T, int64_t N, int64_t H, int64_t Dn, int64_t R, int64_t V, const bf16 *q_nope,
                     int64_t qn_t, int64_t qn_h, const bf16 *q_pe, int64_t qp_t, int64_t qp_h, const bf16 *kv,
                     int64_t kv_n, int64_t kv_h, const bf16 *k_pe, int64_t kp_n, float scale, bf16 *out) {
    int64_t kh = (Dn + R) / 2, np = (N + 31) / 32 * 32, npairs_all = (N + 1) / 2;
    uint32_t *kp = aligned_alloc(64, (size_t)(kh * np * 4));
    uint32_t *vp = aligned_alloc(64, (size_t)((npairs_all * V * 4 + 63) / 64 * 64));
    float *scores = aligned_alloc(64, (size_t)(QB * np * 4));
    uint32_t *pp = aligned_alloc(64, (size_t)((QB * npairs_all * 4 + 63) / 64 * 64));
    if (!kp || !vp || !scores || !pp) {
        free(kp), free(vp), free(scores), free(pp);
        return -1;
    }
    uint32_t qp[QB * 256];  /* K <= 512: the caller checks */
    /* the keys' rope part is every head's: packed once, below each head's nope part */
    pack_pairs(N, R, k_pe, kp_n, np, kp + (Dn / 2) * np);
    for (int64_t h = 0; h < H; h++) {
        pack_pairs(N, Dn, kv + h * kv_h, kv_n, np, kp);
        pack_values(N, V, kv + h * kv_h + Dn, kv_n, vp);
        for (int64_t t0 = 0; t0 < T; t0 += QB) {
            int rows = T - t0 >= QB ? QB : (int)(T - t0);
            for (int r = 0; r < QB; r++) {  /* a short block repeats its last query: its rows are not stored */
                int64_t t = t0 + (r < rows ? r : rows - 1);
                const bf16 *a = q_nope + t * qn_t + h * qn_h, *b = q_pe + t * qp_t + h * qp_h;
                for (int64_t d = 0; d < Dn / 2; d++) qp[r * kh + d] = pair_of(a[2 * d], a[2 * d + 1]);
                for (int64_t d = 0; d < R / 2; d++) qp[r * kh + Dn / 2 + d] = pair_of(b[2 * d], b[2 * d + 1]);
            }
            int64_t seen = N - T + t0 + rows;  /* keys the block's last query sees */
            int64_t npairs = (seen + 1) / 2;
            block_scores(rows, qp, kh, kp, np, (seen + 31) / 32 * 32, scale, scores, np);
            for (int r = 0; r < QB; r++)
                if (r < rows) softmax_pairs(scores + r * np, N - T + t0 + r + 1, npairs, pp + r * npairs);
                else memset(pp + r * npairs, 0, (size_t)npairs * 4);
            block_values(rows, pp, npairs, vp, V, out + (t0 * H + h) * V, H * V);
        }
    }
    free(kp), free(vp), free(scores), free(pp);
    return 0;
}
