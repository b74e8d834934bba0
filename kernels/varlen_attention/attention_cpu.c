/* Variable-length multi-head self-attention with dropout on the attention probabilities, forward and backward,
 * fp32 on CPU: the report tower's attention in training (mlip_fast.ops.varlen_attention).
 *
 * Layout. The N valid tokens of a batch are packed row after row: row b holds tokens [off[b], off[b+1]), L_b of
 * them. qkv is [N, 3C] row-major (the fused projection's output: q in columns [0, C), k in [C, 2C), v in
 * [2C, 3C)); head h owns columns [h dh, (h + 1) dh) of each third, C = H dh. A work item is one (row b, head h),
 * item = b H + h; items are independent (each reads and writes only its row's tokens in its head's columns), so
 * splitting items over threads never changes a number.
 *
 * Forward, for one item with Q, K, V [L, dh] (t = 1 / (1 - p') the dropout scale, Z_ij = t keep_ij):
 *     s_ij = scale * sum_d Q_id K_jd          (summed over d in order)
 *     m_i = max_j s_ij,  e_ij = exp(s_ij - m_i),  l_i = sum_j e_ij (in order),  lse_i = m_i + log(l_i)
 *     O_i = sum_j (e_ij (t / l_i) keep_ij) V_j  (= sum_j P_ij Z_ij V_j, P = softmax_j s; summed over j in order)
 * Backward, from dO and the saved lse (P recomputed as exp(s_ij - lse_i), no [L, L] tensor is stored):
 *     dV_j = sum_i P_ij Z_ij dO_i,     dP'_ij = (dO_i . V_j) Z_ij   (the gradient w.r.t. P_ij)
 *     D_i = sum_j P_ij dP'_ij  (= dO_i . O_i),  dS_ij = P_ij (dP'_ij - D_i)   (the softmax's backward)
 *     dQ_i = scale sum_j dS_ij K_j,     dK_j = scale sum_i dS_ij Q_i
 * Rows have no padded keys (varlen), so every s_ij is finite and no row is empty.
 *
 * Dropout mask. keep_ij for query token n = off[b] + i (its packed index), head h, key j < L_b: with the 64-bit
 * word w = mix64(seed + (((n H + h) << 30) + (j >> 2) + 1) * GAMMA) (SplitMix64's output function at that
 * counter), the 16-bit piece u = (w >> (16 (j & 3))) & 0xFFFF; keep when u >= k, k = round(p 65536). So
 * P(drop) = k / 65536 = p' for every element, elements independent (distinct counters), and t = 65536 /
 * (65536 - k) makes E[Z] = 1 exactly. The mask is a pure function of (seed, n, h, j): the backward recomputes it,
 * and mlip_fast.reference.varlen_attention rebuilds it in numpy for the tests. Counters stay distinct while
 * j < 2^32 and n H + h < 2^34.
 *
 * exp: exp_v of ../_vecmath.h (relative error about 1e-7; every x here is <= 0 up to rounding, and below -87.33 it
 * gives 0). Plain IEEE operations, so it vectorises and gives the same bits at every vector width; the build uses
 * -ffp-contract=off (no fused multiply-add).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../_vecmath.h"

#define GAMMA 0x9E3779B97F4A7C15ULL

static inline uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

/* VL (16 lanes), vf and exp_v: ../_vecmath.h */
#define RB 4  /* query rows per block: their accumulators stay in registers while a K / V row streams by */

/* pieces[e] for e < 4 W: the 16-bit piece (e & 3) of the word mix64(seed + (c0 + (e >> 2)) * GAMMA), W words */
static void hash_pieces(uint64_t seed, uint64_t c0, int64_t W, uint64_t *words, uint16_t *pieces) {
    for (int64_t w = 0; w < W; w++) words[w] = mix64(seed + (c0 + (uint64_t)w) * GAMMA);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    memcpy(pieces, words, sizeof(uint64_t) * (size_t)W);  /* little-endian: piece l of word w at 4 w + l */
#else
    for (int64_t e = 0; e < 4 * W; e++) pieces[e] = (uint16_t)((words[e >> 2] >> (16 * (e & 3))) & 0xFFFF);
#endif
}

/* z[j] = t where key j of query token n, head h is kept, else 0; for j < L (scratch: L / 4 + 1 words, pieces) */
static void keep_row(uint64_t seed, int64_t n, int64_t h, int64_t H, int64_t L, uint32_t k, float t, float *z,
                     uint64_t *words, uint16_t *pieces) {
    hash_pieces(seed, (((uint64_t)n * (uint64_t)H + (uint64_t)h) << 30) + 1, (L + 3) >> 2, words, pieces);
    for (int64_t j = 0; j < L; j++) z[j] = pieces[j] >= k ? t : 0.0f;
}

/* Scratch of one thread: LP = L rounded up to VL, DP = dh rounded up to VL; padding rows / columns hold zeros. */
typedef struct {
    float *q, *k, *v, *kt, *vt, *dk, *dv;  /* [LP, DP], kt / vt [DP, LP] */
    float *s, *z, *pz, *dov, *go, *acc;    /* [RB, LP] x 4, go / acc [RB, DP] */
    uint64_t *words;
    uint16_t *pieces;
} scratch_t;

static int64_t round_up(int64_t x) { return (x + VL - 1) / VL * VL; }

static int alloc_scratch(scratch_t *w, int64_t lmax, int64_t dh) {
    size_t m = (size_t)round_up(lmax) * (size_t)round_up(dh), row = (size_t)RB * (size_t)round_up(lmax);
    size_t blk = (size_t)RB * (size_t)round_up(dh);
    float *base = (float *)aligned_alloc(64, sizeof(float) * (7 * m + 4 * row + 2 * blk) + 64);
    w->words = (uint64_t *)malloc(sizeof(uint64_t) * 2 * ((size_t)lmax / 4 + 2));
    if (base == NULL || w->words == NULL) {
        free(base);
        free(w->words);
        return -1;
    }
    w->q = base; w->k = w->q + m; w->v = w->k + m; w->kt = w->v + m; w->vt = w->kt + m; w->dk = w->vt + m;
    w->dv = w->dk + m; w->s = w->dv + m; w->z = w->s + row; w->pz = w->z + row; w->dov = w->pz + row;
    w->go = w->dov + row; w->acc = w->go + blk;
    w->pieces = (uint16_t *)(w->words + ((size_t)lmax / 4 + 2));
    return 0;
}

static void free_scratch(scratch_t *w) {
    free(w->q);
    free(w->words);
}

/* Q, K, V of one item (row at off0, L tokens, head h) into the scratch, zero-padded to [LP, DP] / [DP, LP] */
static void load_item(const float *qkv, int64_t off0, int64_t L, int64_t h, int64_t C, int64_t dh, scratch_t *w) {
    const int64_t LP = round_up(L), DP = round_up(dh);
    memset(w->q, 0, sizeof(float) * LP * DP);
    memset(w->k, 0, sizeof(float) * LP * DP);
    memset(w->v, 0, sizeof(float) * LP * DP);
    memset(w->kt, 0, sizeof(float) * LP * DP);
    memset(w->vt, 0, sizeof(float) * LP * DP);
    for (int64_t i = 0; i < L; i++) {
        const float *row = qkv + (off0 + i) * 3 * C + h * dh;
        memcpy(w->q + i * DP, row, sizeof(float) * dh);
        memcpy(w->k + i * DP, row + C, sizeof(float) * dh);
        memcpy(w->v + i * DP, row + 2 * C, sizeof(float) * dh);
        for (int64_t d = 0; d < dh; d++) {
            w->kt[d * LP + i] = row[C + d];
            w->vt[d * LP + i] = row[2 * C + d];
        }
    }
}

/* out[r, j] = scale * sum_d a[r, d] bt[d, j] for RB rows of a [RB, DP] and j < LP (bt [DP, LP]), d in order */
static void rows_times_t(const float *a, const float *bt, int64_t LP, int64_t DP, float scale, float *out) {
    for (int64_t j0 = 0; j0 < LP; j0 += VL) {
        vf acc[RB];
        for (int r = 0; r < RB; r++) acc[r] = splat(0.0f);
        for (int64_t d = 0; d < DP; d++) {
            const vf bd = loadu(bt + d * LP + j0);
            for (int r = 0; r < RB; r++) acc[r] = acc[r] + a[r * DP + d] * bd;
        }
        for (int r = 0; r < RB; r++) storeu(out + r * LP + j0, acc[r] * scale);
    }
}

/* out[r, :] = sum_j p[r, j] b[j, :] for RB rows of p [RB, LP] (b [LP, DP]), j in order */
static void rows_times(const float *p, const float *b, int64_t LP, int64_t DP, float *out) {
    for (int64_t d0 = 0; d0 < DP; d0 += VL) {
        vf acc[RB];
        for (int r = 0; r < RB; r++) acc[r] = splat(0.0f);
        for (int64_t j = 0; j < LP; j++) {
            const vf bj = loadu(b + j * DP + d0);
            for (int r = 0; r < RB; r++) acc[r] = acc[r] + p[r * LP + j] * bj;
        }
        for (int r = 0; r < RB; r++) storeu(out + r * DP + d0, acc[r]);
    }
}

/* acc[j, :] += sum_r p[r, j] a[r, :] for j < L (p [RB, LP], a [RB, DP], acc [LP, DP]), r in order */
static void accumulate_t(const float *p, const float *a, int64_t L, int64_t LP, int64_t DP, float *acc) {
    for (int64_t d0 = 0; d0 < DP; d0 += VL) {
        vf ar[RB];
        for (int r = 0; r < RB; r++) ar[r] = loadu(a + r * DP + d0);
        for (int64_t j = 0; j < L; j++) {
            vf x = loadu(acc + j * DP + d0);
            for (int r = 0; r < RB; r++) x = x + p[r * LP + j] * ar[r];
            storeu(acc + j * DP + d0, x);
        }
    }
}

/* sum of x[0..LP) as VL partial sums over blocks (padding entries must be 0), then the partials in order */
static float lane_sum(const float *x, int64_t LP) {
    vf part = splat(0.0f);
    for (int64_t j0 = 0; j0 < LP; j0 += VL) part = part + loadu(x + j0);
    float total = 0.0f;
    for (int l = 0; l < VL; l++) total = total + part[l];
    return total;
}

/* x[j] = exp(x[j] - shift) for j < L, 0 for L <= j < LP */
static void exp_row(float *x, int64_t L, int64_t LP, float shift) {
    for (int64_t j0 = 0; j0 < LP; j0 += VL) storeu(x + j0, exp_v(loadu(x + j0) - shift));
    for (int64_t j = L; j < LP; j++) x[j] = 0.0f;
}

static inline float drop_scale(int64_t k_drop) { return k_drop > 0 ? 65536.0f / (float)(65536 - k_drop) : 1.0f; }

/* work item = b H + h: its head, first token, length L and L rounded up to VL */
typedef struct {
    int64_t h, off0, L, LP;
} item_t;

static inline item_t item_at(int64_t item, int64_t H, const int64_t *off) {
    const int64_t b = item / H, L = off[b + 1] - off[b];
    return (item_t){item % H, off[b], L, round_up(L)};
}

/* Items [item0, item1) of the forward: out [N, C], lse [N, H]. Returns 0, or -1 when scratch cannot be had. */
int64_t mlip_attention_fwd(int64_t item0, int64_t item1, int64_t H, int64_t dh, int64_t lmax, const int64_t *off,
                           const float *qkv, float *out, float *lse, float scale, uint64_t seed, int64_t k_drop) {
    const int64_t C = H * dh, DP = round_up(dh);
    const float t = drop_scale(k_drop);
    scratch_t w;
    if (alloc_scratch(&w, lmax, dh) != 0) return -1;
    for (int64_t item = item0; item < item1; item++) {
        const item_t it = item_at(item, H, off);
        const int64_t h = it.h, off0 = it.off0, L = it.L, LP = it.LP;
        if (L <= 0) continue;
        load_item(qkv, off0, L, h, C, dh, &w);
        for (int64_t i0 = 0; i0 < L; i0 += RB) {
            rows_times_t(w.q + i0 * DP, w.kt, LP, DP, scale, w.s);
            for (int r = 0; r < RB; r++) {
                float *s = w.s + r * LP;
                if (i0 + r >= L) {
                    memset(s, 0, sizeof(float) * LP);
                    continue;
                }
                float m = s[0];
                for (int64_t j = 1; j < L; j++) m = s[j] > m ? s[j] : m;
                exp_row(s, L, LP, m);
                const float l = lane_sum(s, LP);
                lse[(off0 + i0 + r) * H + h] = m + logf(l);
                const float c = t / l;
                if (k_drop > 0) {
                    float *z = w.z + r * LP;
                    keep_row(seed, off0 + i0 + r, h, H, L, (uint32_t)k_drop, 1.0f, z, w.words, w.pieces);
                    for (int64_t j = 0; j < L; j++) s[j] = s[j] * c * z[j];
                } else {
                    for (int64_t j = 0; j < L; j++) s[j] = s[j] * c;
                }
            }
            rows_times(w.s, w.v, LP, DP, w.acc);
            for (int r = 0; r < RB && i0 + r < L; r++)
                memcpy(out + (off0 + i0 + r) * C + h * dh, w.acc + r * DP, sizeof(float) * dh);
        }
    }
    free_scratch(&w);
    return 0;
}

/* Items [item0, item1) of the backward: dqkv [N, 3C] (each item writes its own rows and head columns). */
int64_t mlip_attention_bwd(int64_t item0, int64_t item1, int64_t H, int64_t dh, int64_t lmax, const int64_t *off,
                           const float *qkv, const float *dout, const float *lse, float *dqkv, float scale,
                           uint64_t seed, int64_t k_drop) {
    const int64_t C = H * dh, DP = round_up(dh);
    const float t = drop_scale(k_drop);
    scratch_t w;
    if (alloc_scratch(&w, lmax, dh) != 0) return -1;
    for (int64_t item = item0; item < item1; item++) {
        const item_t it = item_at(item, H, off);
        const int64_t h = it.h, off0 = it.off0, L = it.L, LP = it.LP;
        if (L <= 0) continue;
        load_item(qkv, off0, L, h, C, dh, &w);
        memset(w.dk, 0, sizeof(float) * LP * DP);
        memset(w.dv, 0, sizeof(float) * LP * DP);
        for (int64_t i0 = 0; i0 < L; i0 += RB) {
            memset(w.go, 0, sizeof(float) * RB * DP);
            for (int r = 0; r < RB && i0 + r < L; r++)
                memcpy(w.go + r * DP, dout + (off0 + i0 + r) * C + h * dh, sizeof(float) * dh);
            rows_times_t(w.q + i0 * DP, w.kt, LP, DP, scale, w.s);   /* s, as in the forward */
            rows_times_t(w.go, w.vt, LP, DP, 1.0f, w.dov);           /* dO_i . V_j */
            for (int r = 0; r < RB; r++) {
                float *p = w.s + r * LP, *z = w.z + r * LP, *pz = w.pz + r * LP, *dp = w.dov + r * LP;
                if (i0 + r >= L) {
                    memset(p, 0, sizeof(float) * LP);
                    memset(pz, 0, sizeof(float) * LP);
                    continue;
                }
                const float lse_i = lse[(off0 + i0 + r) * H + h];
                exp_row(p, L, LP, lse_i);
                if (k_drop > 0) {
                    keep_row(seed, off0 + i0 + r, h, H, L, (uint32_t)k_drop, t, z, w.words, w.pieces);
                } else {
                    for (int64_t j = 0; j < L; j++) z[j] = 1.0f;
                }
                for (int64_t j = L; j < LP; j++) z[j] = 0.0f;
                for (int64_t j = 0; j < LP; j++) {
                    pz[j] = p[j] * z[j];
                    dp[j] = dp[j] * z[j];
                }
                for (int64_t j = 0; j < LP; j++) z[j] = p[j] * dp[j];  /* z no longer needed: P dP' */
                const float D = lane_sum(z, LP);
                for (int64_t j = 0; j < LP; j++) p[j] = p[j] * (dp[j] - D) * scale;  /* dS scale */
            }
            accumulate_t(w.pz, w.go, L, LP, DP, w.dv);
            accumulate_t(w.s, w.q + i0 * DP, L, LP, DP, w.dk);
            rows_times(w.s, w.k, LP, DP, w.acc);
            for (int r = 0; r < RB && i0 + r < L; r++)
                memcpy(dqkv + (off0 + i0 + r) * 3 * C + h * dh, w.acc + r * DP, sizeof(float) * dh);
        }
        for (int64_t j = 0; j < L; j++) {
            float *row = dqkv + (off0 + j) * 3 * C + h * dh;
            memcpy(row + C, w.dk + j * DP, sizeof(float) * dh);
            memcpy(row + 2 * C, w.dv + j * DP, sizeof(float) * dh);
        }
    }
    free_scratch(&w);
    return 0;
}

/* Dropout of a flat array with the same kind of mask: element e keeps when the 16-bit piece (e & 3) of
 * w = mix64(seed + ((e >> 2) + 1) * GAMMA) is >= k; out[e] = x[e] * t where kept, else 0 (t = 65536 / (65536 - k)).
 * Elements [e0, e1), e0 a multiple of 4. Forward and backward are the same call (the backward on the gradient). */
void mlip_dropout(int64_t e0, int64_t e1, const float *x, float *out, uint64_t seed, int64_t k_drop) {
    enum { BLOCK = 256 };
    uint64_t words[BLOCK / 4];
    uint16_t pieces[BLOCK];
    const float t = drop_scale(k_drop);
    const uint16_t k = (uint16_t)k_drop;
    for (int64_t b = e0; b < e1; b += BLOCK) {
        const int64_t n = e1 - b < BLOCK ? e1 - b : BLOCK;
        hash_pieces(seed, (uint64_t)(b >> 2) + 1, (n + 3) >> 2, words, pieces);
        for (int64_t l = 0; l < n; l++) out[b + l] = pieces[l] >= k ? x[b + l] * t : 0.0f;
    }
}

/* The same calls over parts [cuts[i], cuts[i + 1]) of the items (elements for the dropout), one part per thread of
 * the OpenMP runtime when built with -fopenmp (torch's own threads), else one after the other. */
int64_t mlip_openmp(void) { return openmp_built(); }

int64_t mlip_attention_fwd_parts(int64_t parts, const int64_t *cuts, int64_t H, int64_t dh, int64_t lmax,
                                 const int64_t *off, const float *qkv, float *out, float *lse, float scale,
                                 uint64_t seed, int64_t k_drop) {
    int64_t failed = 0;
#pragma omp parallel for schedule(static, 1) num_threads(parts) reduction(| : failed)
    for (int64_t i = 0; i < parts; i++)
        failed |= mlip_attention_fwd(cuts[i], cuts[i + 1], H, dh, lmax, off, qkv, out, lse, scale, seed, k_drop);
    return failed;
}

int64_t mlip_attention_bwd_parts(int64_t parts, const int64_t *cuts, int64_t H, int64_t dh, int64_t lmax,
                                 const int64_t *off, const float *qkv, const float *dout, const float *lse,
                                 float *dqkv, float scale, uint64_t seed, int64_t k_drop) {
    int64_t failed = 0;
#pragma omp parallel for schedule(static, 1) num_threads(parts) reduction(| : failed)
    for (int64_t i = 0; i < parts; i++)
        failed |= mlip_attention_bwd(cuts[i], cuts[i + 1], H, dh, lmax, off, qkv, dout, lse, dqkv, scale, seed,
                                     k_drop);
    return failed;
}

void mlip_dropout_parts(int64_t parts, const int64_t *cuts, const float *x, float *out, uint64_t seed,
                        int64_t k_drop) {
#pragma omp parallel for schedule(static, 1) num_threads(parts)
    for (int64_t i = 0; i < parts; i++) mlip_dropout(cuts[i], cuts[i + 1], x, out, seed, k_drop);
}
