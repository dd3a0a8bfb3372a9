/* Absorbed multi-head latent attention for decode steps, reading the paged latent cache in place (AVX-512 BF16).
 *
 * The torch form of this step gathers every sequence's pages into a new tensor, then runs four batched
 * matmuls per layer (W_UK into the query, scores, the weighted sum of latents, W_UV out of it) plus a mask,
 * a softmax and the casts between them: ~20 calls a layer, and each bf16 batched matmul re-lays out its
 * operand. Here one call does the layer, every cache row read where it lies, the scores kept in float32.
 *
 * Legend: B sequences, H heads, Dn nope dim, R rope dim, C kv_lora_rank, V v_head_dim, P page-table width.
 */
#include "bf16_common.h"

/* Cache rows the scores prefetch ahead (a block of 4 is ~0.1-0.3 us of work). */
#define ROWS_AHEAD 4

/* Ask for [p, p + bytes) into L2 ahead of use: the next head's weights, the next sequence's pages. Rows that lie
 * kilobytes apart (a head's W_UK rows, pages of the cache) are beyond the hardware prefetcher's reach. Measured on
 * the small shape's layer, weights and cache cold: 167-181 -> 133-146 us; compute shape, batch 16: ~12%. */
static inline void prefetch_l2(const void *p, int64_t bytes) {
    for (int64_t off = 0; off < bytes; off += 64) _mm_prefetch((const char *)p + off, _MM_HINT_T1);
}

/* o[h][c] for HB heads and 32 columns from c0 (fewer at the end: w columns): sum over the n positions of
 * p[h][s] * latent[s][c], in AVX-512 BF16 dot products over pairs of positions. pp [HB rows of npairs] holds
 * each head's probabilities as bf16 pairs (even position in the low half); a pair's two latent rows are
 * interleaved column by column so that one dot-product lane sums both positions of one column. The HB x 2
 * accumulators stay in registers over every position. */
ALWAYS_INLINE void weigh_block(const int HB, const uint32_t *pp, int64_t npairs, const bf16 *const *rows,
                               int64_t n, int64_t c0, int64_t w, float *o, int64_t ostride) {
    static const uint16_t lo_idx[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                        8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
    static const uint16_t hi_idx[32] = {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
                                        24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};
    __m512i ilo = _mm512_loadu_si512(lo_idx), ihi = _mm512_loadu_si512(hi_idx);
    __mmask32 m = w >= 32 ? (__mmask32)0xFFFFFFFFu : (__mmask32)((1u << w) - 1);
    __m512 acc[8][2];
    /* every loop over the block's heads fully unrolled: the compiler then keeps acc in registers */
#pragma GCC unroll 8
    for (int h = 0; h < HB; h++) acc[h][0] = acc[h][1] = _mm512_setzero_ps();
    for (int64_t i = 0; i < npairs; i++) {
        const bf16 *r0 = rows[2 * i], *r1 = 2 * i + 1 < n ? rows[2 * i + 1] : r0;  /* odd n: its pair weighs 0 */
        __m512i a = _mm512_maskz_loadu_epi16(m, r0 + c0), b = _mm512_maskz_loadu_epi16(m, r1 + c0);
        __m512bh lo = (__m512bh)_mm512_permutex2var_epi16(a, ilo, b);
        __m512bh hi = (__m512bh)_mm512_permutex2var_epi16(a, ihi, b);
#pragma GCC unroll 8
        for (int h = 0; h < HB; h++) {
            __m512bh p = (__m512bh)_mm512_set1_epi32((int)pp[h * npairs + i]);
            acc[h][0] = _mm512_dpbf16_ps(acc[h][0], lo, p);
            acc[h][1] = _mm512_dpbf16_ps(acc[h][1], hi, p);
        }
    }
#pragma GCC unroll 8
    for (int h = 0; h < HB; h++) {
        _mm512_mask_storeu_ps(o + h * ostride + c0, (__mmask16)m, acc[h][0]);
        if (w > 16) _mm512_mask_storeu_ps(o + h * ostride + c0 + 16, (__mmask16)(m >> 16), acc[h][1]);
    }
}

static void weigh_8(const uint32_t *pp, int64_t np, const bf16 *const *rows, int64_t n, int64_t c0, int64_t w,
                    float *o, int64_t os) { weigh_block(8, pp, np, rows, n, c0, w, o, os); }
static void weigh_4(const uint32_t *pp, int64_t np, const bf16 *const *rows, int64_t n, int64_t c0, int64_t w,
                    float *o, int64_t os) { weigh_block(4, pp, np, rows, n, c0, w, o, os); }
static void weigh_2(const uint32_t *pp, int64_t np, const bf16 *const *rows, int64_t n, int64_t c0, int64_t w,
                    float *o, int64_t os) { weigh_block(2, pp, np, rows, n, c0, w, o, os); }
static void weigh_1(const uint32_t *pp, int64_t np, const bf16 *const *rows, int64_t n, int64_t c0, int64_t w,
                    float *o, int64_t os) { weigh_block(1, pp, np, rows, n, c0, w, o, os); }

/* o[g][c] = sum over the n rows of p[g][s] * rows[s][c] for G groups and C columns, g in blocks of 8/4/2/1;
 * pp [G, (n + 1) / 2] holds each group's weights as bf16 pairs; o float32 [G, C]. */
static void weigh(int64_t G, int64_t C, const uint32_t *pp, const bf16 *const *rows, int64_t n, float *o) {
    int64_t npairs = (n + 1) / 2;
    for (int64_t g0 = 0; g0 < G;) {
        int64_t left = G - g0;
        int gb = left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1;
        for (int64_t c0 = 0; c0 < C; c0 += 32) {
            int64_t w = C - c0 < 32 ? C - c0 : 32;
            const uint32_t *p = pp + g0 * npairs;
            float *dst = o + g0 * C;
            if (gb == 8) weigh_8(p, npairs, rows, n, c0, w, dst, C);
            else if (gb == 4) weigh_4(p, npairs, rows, n, c0, w, dst, C);
            else if (gb == 2) weigh_2(p, npairs, rows, n, c0, w, dst, C);
            else weigh_1(p, npairs, rows, n, c0, w, dst, C);
        }
        g0 += gb;
    }
}

/* Pairs of bf16 values, (v[2i], v[2i + 1]) in 32 bits, the even one low: n values -> (n + 1) / 2 pairs. */
static void pairs_of(const bf16 *v, int64_t n, uint32_t *out) {
    for (int64_t i = 0; i < (n + 1) / 2; i++)
        out[i] = (uint32_t)v[2 * i] | (uint32_t)(2 * i + 1 < n ? v[2 * i + 1] : 0) << 16;
}

/* One sequence's attention in the latent space: q [H, C + R] bf16 (absorbed query, then its rope part);
 * rows[s] the cache row of position s, [C + R]; n positions. Writes o [H, C] bf16, the probability-weighted sum
 * of the latents (probabilities rounded to bf16 for it, as the torch form does); scores [H, n] float32, pp
 * [H, (n + 1) / 2] and acc [H, C] float32 are scratch. */
static void attend_one(int64_t H, int64_t C, int64_t R, int64_t n, const bf16 *q, const bf16 *const *rows,
                       float scale, float *scores, uint32_t *pp, float *acc, bf16 *o) {
    int64_t W = C + R, npairs = (n + 1) / 2;
    const bf16 *rp[4], *qp[4];
    float res[16];
    /* scores: 4 positions x 4 heads per block; a short block repeats its last valid position or head */
    for (int64_t s0 = 0; s0 < n; s0 += 4) {
        for (int r = 0; r < 4; r++) rp[r] = rows[s0 + r < n ? s0 + r : n - 1];
        for (int r = 0; r < 4 && s0 + ROWS_AHEAD + r < n; r++) prefetch(rows[s0 + ROWS_AHEAD + r], W * 2);
        for (int64_t h0 = 0; h0 < H; h0 += 4) {
            for (int t = 0; t < 4; t++) qp[t] = q + (h0 + t < H ? h0 + t : H - 1) * W;
            dot_4x4_across(rp, qp, W, res);
            for (int t = 0; t < 4 && h0 + t < H; t++)
                for (int r = 0; r < 4 && s0 + r < n; r++) scores[(h0 + t) * n + s0 + r] = res[t * 4 + r] * scale;
        }
    }
    /* softmax over positions, per head, in float32; the probabilities kept as bf16 pairs */
    for (int64_t h = 0; h < H; h++) {
        float *sc = scores + h * n, mx = -INFINITY, sum = 0.0f;
        for (int64_t s = 0; s < n; s++) mx = sc[s] > mx ? sc[s] : mx;
        for (int64_t s = 0; s < n; s += 16) {
            int64_t k = n - s < 16 ? n - s : 16;
            __mmask16 m = (__mmask16)((1u << k) - 1);
            __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, sc + s), _mm512_set1_ps(mx)));
            _mm512_mask_storeu_ps(sc + s, m, e);
            sum += _mm512_mask_reduce_add_ps(m, e);
        }
        float inv = 1.0f / sum;
        for (int64_t i = 0; i < npairs; i++) {
            bf16 a = to_bf16(sc[2 * i] * inv), b = 2 * i + 1 < n ? to_bf16(sc[2 * i + 1] * inv) : 0;
            pp[h * npairs + i] = (uint32_t)a | (uint32_t)b << 16;
        }
    }
    weigh(H, C, pp, rows, n, acc);
    for (int64_t i = 0; i < H * C; i++) o[i] = to_bf16(acc[i]);
}

/* out [B, H, V] bf16 = absorbed MLA of B single-token queries over their cached latents.
 * q_nope [B, H, Dn], q_pe [B, H, R] bf16 (roped); kv_b [H, Dn + V, C] bf16 (kv_b_proj's weight: each head's W_UK
 * rows, then its W_UV rows); cache [num_slots, C + R] bf16, one layer, slot = page * page_size + offset;
 * pages [B, P] int64; lens [B] int64, each sequence's KV length (its new token's row already written).
 * As the torch form rounds them: the absorbed query, the probabilities and the weighted latents to bf16; unlike
 * it, the scores stay float32. Returns 0, -1 for a length or page outside the cache, -2 when out of memory. */
int mla_decode_bf16(int64_t B, int64_t H, int64_t Dn, int64_t C, int64_t R, int64_t V, int64_t page_size,
                    int64_t P, int64_t num_slots, const bf16 *q_nope, const bf16 *q_pe, const bf16 *kv_b,
                    const bf16 *cache, const int64_t *pages, const int64_t *lens, float scale, bf16 *out) {
    int64_t W = C + R, nmax = Dn;
    for (int64_t b = 0; b < B; b++) {
        if (lens[b] < 1 || lens[b] > P * page_size) return -1;
        for (int64_t i = 0; i < (lens[b] + page_size - 1) / page_size; i++)
            if (pages[b * P + i] < 0 || (pages[b * P + i] + 1) * page_size > num_slots) return -1;
        nmax = lens[b] > nmax ? lens[b] : nmax;
    }
    bf16 *q = malloc(sizeof(bf16) * (size_t)(B * H * W + 1));
    bf16 *ol = malloc(sizeof(bf16) * (size_t)(B * H * C + 1));
    float *acc = malloc(sizeof(float) * (size_t)((B > H ? B : H) * C + 1));
    uint32_t *qpairs = malloc(sizeof(uint32_t) * (size_t)(B * ((Dn + 1) / 2) + 1));
    float *scores = malloc(sizeof(float) * (size_t)(H * nmax + 1));
    uint32_t *pp = malloc(sizeof(uint32_t) * (size_t)(H * (nmax + 1) / 2 + 1));
    const bf16 **rows = malloc(sizeof(bf16 *) * (size_t)(nmax + 1));
    int rc = 0;
    if (!q || !ol || !acc || !qpairs || !scores || !pp || !rows) {
        rc = -2;
        goto done;
    }
    /* the absorbed queries, head by head (each head's W_UK read once for the batch), rounded to bf16 */
    for (int64_t h = 0; h < H; h++) {
        /* the next head's W_UK while this one computes; after the last, the first head's W_UV for the way out */
        if (h + 1 < H) prefetch_l2(kv_b + (h + 1) * (Dn + V) * C, Dn * C * 2);
        else prefetch_l2(kv_b + Dn * C, V * C * 2);
        for (int64_t d = 0; d < Dn; d++) rows[d] = kv_b + (h * (Dn + V) + d) * C;
        for (int64_t b = 0; b < B; b++) pairs_of(q_nope + (b * H + h) * Dn, Dn, qpairs + b * ((Dn + 1) / 2));
        weigh(B, C, qpairs, rows, Dn, acc);
        for (int64_t b = 0; b < B; b++) {
            bf16 *dst = q + (b * H + h) * W;
            for (int64_t c = 0; c < C; c++) dst[c] = to_bf16(acc[b * C + c]);
            memcpy(dst + C, q_pe + (b * H + h) * R, sizeof(bf16) * (size_t)R);
        }
    }
    for (int64_t b = 0; b < B; b++) {
        for (int64_t s = 0; s < lens[b]; s++)
            rows[s] = cache + (pages[b * P + s / page_size] * page_size + s % page_size) * W;
        if (b + 1 < B)  /* the next sequence's pages while this one computes */
            for (int64_t i = 0; i < (lens[b + 1] + page_size - 1) / page_size; i++)
                prefetch_l2(cache + pages[(b + 1) * P + i] * page_size * W, page_size * W * 2);
        attend_one(H, C, R, lens[b], q + b * H * W, rows, scale, scores, pp, acc, ol + b * H * C);
    }
    /* out of the latent space: each head's W_UV rows against the batch's weighted latents, 4 at a time */
    const bf16 *wr[16], *group[4];
    float res[16];
    for (int64_t h = 0; h < H; h++) {
        const bf16 *wuv = kv_b + (h * (Dn + V) + Dn) * C;
        for (int64_t b0 = 0, take; b0 < B; b0 += take) {
            int Rb = block_shape(B - b0, &take), nt = 16 / Rb;
            for (int t = 0; t < nt; t++) group[t] = ol + ((b0 + (t < take ? t : 0)) * H + h) * C;
            for (int64_t v0 = 0; v0 < V; v0 += Rb) {
                if (b0 == 0 && v0 + 2 * Rb <= V) prefetch(wuv + (v0 + Rb) * C, Rb * C * 2);  /* the next rows */
                for (int r = 0; r < Rb; r++) wr[r] = wuv + (v0 + r < V ? v0 + r : V - 1) * C;
                dot_rows(Rb, wr, group, C, res);
                for (int64_t t = 0; t < take; t++)
                    for (int r = 0; r < Rb && v0 + r < V; r++) out[((b0 + t) * H + h) * V + v0 + r] = to_bf16(res[t * Rb + r]);
            }
        }
    }
done:
    free(q);
    free(ol);
    free(acc);
    free(qpairs);
    free(scores);
    free(pp);
    free(rows);
    return rc;
}
