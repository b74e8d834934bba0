/* Sinkhorn scaling iterations of the chunked OT op on CPU, 16 pairs side by side (built and called by cpu.py).

Math
----
For a pair with plan kern[p, q] = exp(f[p] + g[q] + sim[p, q] / eps) (0 on entries that are not live; f = g = 0
at the start), marginals a [K] and b [S] (``tiny`` on dead entries) and scalings u = v = 1, one iteration is the
chunked op's scaling form (``mlip_fast/ops/patch_sentence_ot/chunked.py``; the log-domain iterates with potentials
f + log u and g + log v):

    col[q] = sum_p u[p] kern[p, q]     v[q] = b[q] / max(col[q], tiny)      (sentence update)
    row[p] = sum_q kern[p, q] v[q]     u[p] = a[p] / max(row[p], tiny)      (patch update)

and after the last iteration score = sum_p u[p] sum_q (kern[p, q] z[p, q]) v[q] with z = sim / eps (the caller
multiplies by eps). max(x, tiny) keeps a NaN (as torch's clamp_min).

Absorption. The caller holds the potentials f, g of the current kern.
When a half-step's new scalings of a lane group leave [lo, hi] (or are NaN), the group stops before it: its u and
v stay those of the last accepted half-step and pos[group] holds the index of the refused half-step (2 * iteration
+ 0 for the sentence update, + 1 for the patch update). The caller then redoes that half-step in the log domain,
absorbs the scalings into f and g, rebuilds the group's kern (exp is PyTorch's), sets u = v = 1 and calls again:
each group resumes at its own pos. These are the log-domain iterates for any eps, as in the PyTorch loop, except
that a group absorbs on its own instead of with its whole tile. pos = 2 * iters + 1 marks a finished group (its
score written); a call skips those.

Layout
------
Pair n = group * LANES + lane. Every array holds its pairs' values in the innermost axis of LANES: kern and z
[groups, K, S, LANES], a and u [groups, K, LANES], b and v [groups, S, LANES], score [groups, LANES]. Each
statement below is then one operation on LANES independent values (one AVX-512 or two AVX2 vectors after the
compiler's vectorisation), every sum runs over p or q in increasing order per lane, and a group's kern block
(K * S * 64 bytes: 24 KiB at K = 32, S = 12) stays in L1 for all the iterations, where the PyTorch path re-reads
its whole tile from L2 twice an iteration.

Numerics
--------
Plain IEEE single precision: multiplications, additions, divisions and comparisons only, built with
-ffp-contract=off (no fused multiply-add), so every vector width gives the same bits and a run's numbers do not
depend on the instruction set the build found.
*/
#include <stdint.h>

#define LANES 16

/* out[j] = sum_{i = 0, 1, ...} x[i] m[i * si + j * sj] per lane, for j < n_out: four outputs at a time, so four
   independent sums are in flight (the additions' latency is hidden) and each x[i] is loaded once for four. */
static inline void matvec_lanes(int64_t n_out, int64_t n_in, int64_t sj, int64_t si, const float *restrict m,
                                const float *restrict x, float *restrict out) {
  int64_t j = 0;
  for (; j + 4 <= n_out; j += 4) {
    float a0[LANES], a1[LANES], a2[LANES], a3[LANES];
    for (int l = 0; l < LANES; l++) a0[l] = a1[l] = a2[l] = a3[l] = 0.0f;
    for (int64_t i = 0; i < n_in; i++) {
      const float *xi = x + i * LANES, *mi = m + (i * si + j * sj) * LANES;
      for (int l = 0; l < LANES; l++) {
        a0[l] += xi[l] * mi[l];
        a1[l] += xi[l] * mi[sj * LANES + l];
        a2[l] += xi[l] * mi[2 * sj * LANES + l];
        a3[l] += xi[l] * mi[3 * sj * LANES + l];
      }
    }
    for (int l = 0; l < LANES; l++) {
      out[j * LANES + l] = a0[l];
      out[(j + 1) * LANES + l] = a1[l];
      out[(j + 2) * LANES + l] = a2[l];
      out[(j + 3) * LANES + l] = a3[l];
    }
  }
  for (; j < n_out; j++) {
    float a0[LANES];
    for (int l = 0; l < LANES; l++) a0[l] = 0.0f;
    for (int64_t i = 0; i < n_in; i++)
      for (int l = 0; l < LANES; l++) a0[l] += x[i * LANES + l] * m[(i * si + j * sj) * LANES + l];
    for (int l = 0; l < LANES; l++) out[j * LANES + l] = a0[l];
  }
}

/* sum <- m / max(sum, tiny) per element (in place); returns 1 when one leaves [lo, hi] (NaN fails both tests) */
static inline int scale(int64_t n, const float *restrict m, float *restrict sum, float lo, float hi, float tiny) {
  int bad = 0;
  for (int64_t i = 0; i < n; i++) {
    float r = m[i] / (sum[i] < tiny ? tiny : sum[i]);
    bad |= ((r >= lo) & (r <= hi)) ^ 1;
    sum[i] = r;
  }
  return bad;
}

/* Runs lane groups [g0, g1) from their pos to the end of ``iters`` iterations; returns how many stopped before. */
int64_t mlip_sinkhorn_lanes(int64_t g0, int64_t g1, int64_t K, int64_t S, int64_t iters, const float *restrict kern,
                            const float *restrict z, const float *restrict a, const float *restrict b,
                            float *restrict u, float *restrict v, float *restrict score, int64_t *restrict pos,
                            float lo, float hi, float tiny) {
  float col[S * LANES], row[K * LANES]; /* the sums of one half-step, then its scalings */
  int64_t stopped = 0;
  for (int64_t gi = g0; gi < g1; gi++) {
    if (pos[gi] > 2 * iters) continue;
    const float *kp = kern + gi * K * S * LANES, *zp = z + gi * K * S * LANES;
    const float *ap = a + gi * K * LANES, *bp = b + gi * S * LANES;
    float *up = u + gi * K * LANES, *vp = v + gi * S * LANES;
    int64_t h = pos[gi];
    for (; h < 2 * iters; h++) {
      if (h % 2 == 0) { /* sentence update: col[q] = sum_p u[p] kern[p, q] */
        matvec_lanes(S, K, 1, S, kp, up, col);
        if (scale(S * LANES, bp, col, lo, hi, tiny)) break;
        for (int64_t i = 0; i < S * LANES; i++) vp[i] = col[i];
      } else { /* patch update: row[p] = sum_q kern[p, q] v[q] */
        matvec_lanes(K, S, S, 1, kp, vp, row);
        if (scale(K * LANES, ap, row, lo, hi, tiny)) break;
        for (int64_t i = 0; i < K * LANES; i++) up[i] = row[i];
      }
    }
    if (h < 2 * iters) {
      pos[gi] = h;
      stopped++;
      continue;
    }
    /* score: sum_p u[p] sum_q (kern[p, q] z[p, q]) v[q] */
    float total[LANES];
    for (int l = 0; l < LANES; l++) total[l] = 0.0f;
    for (int64_t p = 0; p < K; p++) {
      float acc[LANES];
      for (int l = 0; l < LANES; l++) acc[l] = 0.0f;
      for (int64_t q = 0; q < S; q++)
        for (int l = 0; l < LANES; l++) {
          int64_t at = (p * S + q) * LANES + l;
          acc[l] += (kp[at] * zp[at]) * vp[q * LANES + l];
        }
      for (int l = 0; l < LANES; l++) total[l] += acc[l] * up[p * LANES + l];
    }
    for (int l = 0; l < LANES; l++) score[gi * LANES + l] = total[l];
    pos[gi] = 2 * iters + 1;
  }
  return stopped;
}

/* The same over parts [cuts[i], cuts[i + 1]) of the lane groups, one part per thread of the OpenMP runtime when built
 * with -fopenmp (torch's own threads: kernels/_native.py), else one after the other; the stopped groups summed. */
int64_t mlip_sinkhorn_openmp(void) {
#ifdef _OPENMP
  return 1;
#else
  return 0;
#endif
}

int64_t mlip_sinkhorn_lanes_parts(int64_t parts, const int64_t *cuts, int64_t K, int64_t S, int64_t iters,
                                  const float *restrict kern, const float *restrict z, const float *restrict a,
                                  const float *restrict b, float *restrict u, float *restrict v,
                                  float *restrict score, int64_t *restrict pos, float lo, float hi, float tiny) {
  int64_t stopped = 0;
#pragma omp parallel for schedule(static, 1) num_threads(parts) reduction(+ : stopped)
  for (int64_t i = 0; i < parts; i++)
    stopped += mlip_sinkhorn_lanes(cuts[i], cuts[i + 1], K, S, iters, kern, z, a, b, u, v, score, pos, lo, hi, tiny);
  return stopped;
}
