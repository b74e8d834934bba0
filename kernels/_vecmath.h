/* Vector math shared by the CPU kernels in C (included by the kernels' .c sources; part of their build key).
 *
 * vf: VL floats operated on lane-wise with GCC / Clang vector extensions (one 512-bit register, or several narrower
 * where the machine has none), so the code vectorises at any width with the same bits.
 *
 * exp_v: Cody-Waite reduction x = n ln2 + r (n = round(x log2 e), ln2 split in two so n ln2_hi is exact) and
 * Cephes' degree-6 polynomial for e^r on |r| <= ln2 / 2 (relative error about 1e-7), scaled by 2^n through the
 * exponent bits. x above 88 is taken as 88; x below -87.33 (where e^x < FLT_MIN = 1.18e-38) gives exactly 0, so a
 * "dead" exponent (-1e30) gives a zero plan entry as PyTorch's exp does. Plain IEEE operations; the builds use
 * -ffp-contract=off (no fused multiply-add). */
#ifndef MLIP_VECMATH_H
#define MLIP_VECMATH_H

#include <stdint.h>
#include <string.h>

#define VL 16

typedef float vf __attribute__((vector_size(VL * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(VL * sizeof(float))));

static inline vf loadu(const float *p) {
    vf v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void storeu(float *p, vf v) { memcpy(p, &v, sizeof v); }

static inline vf splat(float x) { return (vf){0} + x; }

static inline vf pick(vi m, vf yes, vf no) { return (vf)(((vi)yes & m) | ((vi)no & ~m)); } /* m ? yes : no */

static inline vf exp_v(vf x) {
    const vi tiny = x < -87.33f;
    x = pick(tiny, splat(-87.33f), x);
    x = pick(x > 88.0f, splat(88.0f), x);
    vf n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round to nearest, |n| <= 127 */
    vf r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    vf p = splat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
    return pick(tiny, splat(0.0f), p * (vf)bits);
}

/* 1 when this library was built with -fopenmp (its parallel loops then run on the OpenMP runtime's threads) */
static inline int64_t openmp_built(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

#endif
