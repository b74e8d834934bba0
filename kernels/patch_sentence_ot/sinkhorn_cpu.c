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

Absorption. The kernel holds the potentials f, g of the current kern (f = g = 0 and kern = exp(z) at the start).
When a half-step's new scalings of a lane group leave [lo, hi] (or are NaN), that half-step is redone in the log
domain for the group (``_log_update`` of the chunked op: a sentence update sets f <- f + log u and
g[q] = log b[q] - logsumexp_p(f[p] + z[p, q]), a patch update g <- g + log v and
f[p] = log a[p] - logsumexp_q(g[q] + z[p, q]); DEAD = -1e30 where not live), the scalings are absorbed
(kern <- exp(f + g + z), u = v = 1) and the group goes on with the next half-step. These are the log-domain
iterates for any eps, as in the PyTorch loop, except that a group absorbs on its own instead of with its whole
tile. logsumexp is max + log(sum exp(x - max)), the sum over p or q in increasing order.

Layout
------
Pair n = group * LANES + lane. Every array holds its pairs' values in the innermost axis of LANES: kern and z
[groups, K, S, LANES], a, log a, live_p (uint8), f and u [groups, K, LANES], b, log b, live_q, g and v
[groups, S, LANES], score [groups, LANES]. Each
statement below is then one operation on LANES independent values (one AVX-512 or two AVX2 vectors after the
compiler's vectorisation), every sum runs over p or q in increasing order per lane, and a group's kern block
(K * S * 64 bytes: 24 KiB at K = 32, S = 12) stays in L1 for all the iterations, where the PyTorch path re-reads
its whole tile from L2 twice an iteration.

Numerics
--------
Plain IEEE single precision, built with -ffp-contract=off (no fused multiply-add): multiplications, additions,
divisions and comparisons, exp_v of ../_vecmath.h (relative error about 1e-7; 0 below -87.33, so dead entries give
exactly 0) for the plan, and libm's logf for the absorptions' logarithms; so every vector width gives the same bits
and a run's numbers do not depend on the instruction set the build found.
*/
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "../_vecmath.h"

#define LANES 16 /* = VL: one lane group is one vf */
#define DEAD (-1e30f)

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

/* kern <- exp((f[p] + g[q]) + z[p, q]) for one group, u = v = 1 */
static void rebuild(int64_t K, int64_t S, const float *f, const float *g, const float *z, float *kern, float *u,
                    float *v) {
  for (int64_t p = 0; p < K; p++) {
    const vf fp = loadu(f + p * LANES);
    for (int64_t q = 0; q < S; q++) {
      const int64_t at = (p * S + q) * LANES;
      storeu(kern + at, exp_v((fp + loadu(g + q * LANES)) + loadu(z + at)));
    }
  }
  for (int64_t i = 0; i < K * LANES; i++) u[i] = 1.0f;
  for (int64_t i = 0; i < S * LANES; i++) v[i] = 1.0f;
}

/* out[j] = live[j] ? log_m[j] - logsumexp_i(pot[i] + z[i * si + j * sj]) : DEAD, j < n_out, i < n_in (lanes) */
static void log_update(int64_t n_out, int64_t n_in, int64_t sj, int64_t si, const float *pot, const float *z,
                       const float *log_m, const uint8_t *live, float *out) {
  for (int64_t j = 0; j < n_out; j++) {
    vf m = splat(-INFINITY);
    for (int64_t i = 0; i < n_in; i++) {
      const vf x = loadu(pot + i * LANES) + loadu(z + (i * si + j * sj) * LANES);
      m = pick(x > m, x, m);
    }
    vf sum = splat(0.0f);
    for (int64_t i = 0; i < n_in; i++)
      sum = sum + exp_v((loadu(pot + i * LANES) + loadu(z + (i * si + j * sj) * LANES)) - m);
    for (int l = 0; l < LANES; l++) {
      const int64_t at = j * LANES + l;
      out[at] = live[at] ? log_m[at] - (m[l] + logf(sum[l])) : DEAD;
    }
  }
}

/* Runs lane groups [g0, g1) for ``iters`` iterations from f = g = 0 (kern = exp(z) made here), absorbing where a
   scaling leaves [lo, hi]; writes f, g, u, v, kern and score. Returns the number of absorptions. */
int64_t mlip_sinkhorn_lanes(int64_t g0, int64_t g1, int64_t K, int64_t S, int64_t iters, float *restrict kern,
                            const float *restrict z, const float *restrict a, const float *restrict b,
                            const float *restrict log_a, const float *restrict log_b, const uint8_t *restrict live_p,
                            const uint8_t *restrict live_q, float *restrict f, float *restrict g,
                            float *restrict u, float *restrict v, float *restrict score, float lo, float hi,
                            float tiny) {
  float col[S * LANES], row[K * LANES]; /* the sums of one half-step, then its scalings */
  int64_t absorptions = 0;
  for (int64_t gi = g0; gi < g1; gi++) {
    float *kp = kern + gi * K * S * LANES, *fp = f + gi * K * LANES, *gp = g + gi * S * LANES;
    const float *zp = z + gi * K * S * LANES, *ap = a + gi * K * LANES, *bp = b + gi * S * LANES;
    const float *lap = log_a + gi * K * LANES, *lbp = log_b + gi * S * LANES;
    const uint8_t *lpp = live_p + gi * K * LANES, *lqp = live_q + gi * S * LANES;
    float *up = u + gi * K * LANES, *vp = v + gi * S * LANES;
    for (int64_t i = 0; i < K * LANES; i++) fp[i] = 0.0f;
    for (int64_t i = 0; i < S * LANES; i++) gp[i] = 0.0f;
    rebuild(K, S, fp, gp, zp, kp, up, vp);
    for (int64_t h = 0; h < 2 * iters; h++) {
      if (h % 2 == 0) { /* sentence update: col[q] = sum_p u[p] kern[p, q] */
        matvec_lanes(S, K, 1, S, kp, up, col);
        if (scale(S * LANES, bp, col, lo, hi, tiny)) { /* in the log domain: f += log u, g from f */
          for (int64_t i = 0; i < K * LANES; i++) fp[i] = fp[i] + logf(up[i]);
          log_update(S, K, 1, S, fp, zp, lbp, lqp, gp);
          rebuild(K, S, fp, gp, zp, kp, up, vp);
          absorptions++;
          continue;
        }
        for (int64_t i = 0; i < S * LANES; i++) vp[i] = col[i];
      } else { /* patch update: row[p] = sum_q kern[p, q] v[q] */
        matvec_lanes(K, S, S, 1, kp, vp, row);
        if (scale(K * LANES, ap, row, lo, hi, tiny)) { /* in the log domain: g += log v, f from g */
          for (int64_t i = 0; i < S * LANES; i++) gp[i] = gp[i] + logf(vp[i]);
          log_update(K, S, S, 1, gp, zp, lap, lpp, fp);
          rebuild(K, S, fp, gp, zp, kp, up, vp);
          absorptions++;
          continue;
        }
        for (int64_t i = 0; i < K * LANES; i++) up[i] = row[i];
      }
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
  }
  return absorptions;
}

/* The same over parts [cuts[i], cuts[i + 1]) of the lane groups, one part per thread of the OpenMP runtime when built
 * with -fopenmp (torch's own threads: kernels/_native.py), else one after the other; the absorptions summed. */
int64_t mlip_openmp(void) { return openmp_built(); }

int64_t mlip_sinkhorn_lanes_parts(int64_t parts, const int64_t *cuts, int64_t K, int64_t S, int64_t iters,
                                  float *restrict kern, const float *restrict z, const float *restrict a,
                                  const float *restrict b, const float *restrict log_a, const float *restrict log_b,
                                  const uint8_t *restrict live_p, const uint8_t *restrict live_q, float *restrict f,
                                  float *restrict g, float *restrict u, float *restrict v, float *restrict score,
                                  float lo, float hi, float tiny) {
  int64_t absorptions = 0;
#pragma omp parallel for schedule(static, 1) num_threads(parts) reduction(+ : absorptions)
  for (int64_t i = 0; i < parts; i++)
    absorptions += mlip_sinkhorn_lanes(cuts[i], cuts[i + 1], K, S, iters, kern, z, a, b, log_a, log_b, live_p,
                                       live_q, f, g, u, v, score, lo, hi, tiny);
  return absorptions;
}

/* The lane layout of z straight from the forward's similarity tile sim [bc, K, gc, S] (the GEMM's output, pair
 * n = b gc + g): zl[group, p, q, lane] = sim[b, p, g, q] / eps where live_p[n, p] and live_q[n, q] (bool [N, K] and
 * [N, S]), DEAD elsewhere, 0 for the padding pairs n >= npairs; the division is the PyTorch path's (IEEE fp32), so
 * zl holds the same bits as its z copied into lanes. Groups [g0, g1). */
static void lanes_from_sim(int64_t g0, int64_t g1, int64_t K, int64_t S, int64_t gc, int64_t npairs, float eps,
                           const float *sim, const uint8_t *live_p, const uint8_t *live_q, float *zl) {
  for (int64_t gi = g0; gi < g1; gi++) {
    float *zg = zl + gi * K * S * LANES;
    for (int l = 0; l < LANES; l++) {
      const int64_t n = gi * LANES + l;
      if (n >= npairs) {
        for (int64_t i = 0; i < K * S; i++) zg[i * LANES + l] = 0.0f;
        continue;
      }
      const float *base = sim + ((n / gc) * K * gc + n % gc) * S;
      const uint8_t *lp = live_p + n * K, *lq = live_q + n * S;
      for (int64_t p = 0; p < K; p++) {
        const float *row = base + p * gc * S;
        for (int64_t q = 0; q < S; q++) zg[(p * S + q) * LANES + l] = (lp[p] && lq[q]) ? row[q] / eps : DEAD;
      }
    }
  }
}

void mlip_ot_lanes_from_sim(int64_t parts, const int64_t *cuts, int64_t K, int64_t S, int64_t gc, int64_t npairs,
                            float eps, const float *sim, const uint8_t *live_p, const uint8_t *live_q, float *zl) {
#pragma omp parallel for schedule(static, 1) num_threads(parts)
  for (int64_t i = 0; i < parts; i++)
    lanes_from_sim(cuts[i], cuts[i + 1], K, S, gc, npairs, eps, sim, live_p, live_q, zl);
}

/* The backward's plan tile in place: m[b, p, g, q] <- exp(((m / eps) + f[b, g, p]) + gp[b, g, q]) * w[b, g] for
 * b in [b0, b1) of a [bc, K, gc, S] similarity tile (f [bc, gc, K], gp [bc, gc, S], w [bc, gc]): the element-wise
 * steps of the PyTorch loop (divide, two adds, exp, multiply) in that order, in one pass; exp_v gives exactly 0 for
 * -inf / DEAD potentials. ``row`` is scratch of 2 gc S floats. */
static void plan_rows(int64_t b0, int64_t b1, int64_t K, int64_t gc, int64_t S, float eps, float *m, const float *f,
                      const float *gp, const float *w, float *row) {
  const int64_t n = gc * S, nv = n / LANES * LANES;
  float *fw = row + n;
  for (int64_t b = b0; b < b1; b++) {
    const float *gb = gp + b * n, *wb = w + b * gc;
    for (int64_t p = 0; p < K; p++) {
      float *mp = m + (b * K + p) * n;
      for (int64_t g = 0; g < gc; g++)
        for (int64_t q = 0; q < S; q++) {
          row[g * S + q] = f[(b * gc + g) * K + p];
          fw[g * S + q] = wb[g];
        }
      int64_t i = 0;
      for (; i < nv; i += LANES)
        storeu(mp + i, exp_v(((loadu(mp + i) / eps) + loadu(row + i)) + loadu(gb + i)) * loadu(fw + i));
      if (i < n) { /* the tail through a padded vector: the same operations lane by lane */
        float t[3][LANES] = {{0}};
        memcpy(t[0], mp + i, sizeof(float) * (n - i));
        memcpy(t[1], row + i, sizeof(float) * (n - i));
        memcpy(t[2], gb + i, sizeof(float) * (n - i));
        vf r = exp_v(((loadu(t[0]) / eps) + loadu(t[1])) + loadu(t[2]));
        float out[LANES];
        storeu(out, r);
        for (int64_t j = 0; j < n - i; j++) mp[i + j] = out[j] * fw[i + j];
      }
    }
  }
}

int64_t mlip_ot_plan(int64_t bc, int64_t K, int64_t gc, int64_t S, float eps, float *m, const float *f,
                     const float *gp, const float *w) {
  int64_t failed = 0;
#pragma omp parallel reduction(| : failed)
  {
    int64_t parts = 1, part = 0;
#ifdef _OPENMP
    parts = omp_get_num_threads();
    part = omp_get_thread_num();
#endif
    float *row = (float *)malloc(sizeof(float) * 2 * (size_t)(gc * S));
    if (row != NULL)
      plan_rows(bc * part / parts, bc * (part + 1) / parts, K, gc, S, eps, m, f, gp, w, row);
    else
      failed = 1;
    free(row);
  }
  return failed;
}
