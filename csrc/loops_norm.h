// The LayerNorm loops of the CPU extension: a range of rows per call, forward and backward.
#pragma once

#include "loops_vec.h"

namespace ufb {
namespace UFB_ISA {

// ---------------------------------------------------------------------------------------
// LayerNorm, a row at a time: two passes over the row (mean, then the centred sum of
// squares) in float32 vectors, as accurate as MLX's own and without its per-element cost.

static inline float row_sum(const float* x, int64_t n) {
  vf s0 = splat(0.0f), s1 = s0;
  int64_t i = 0;
  for (; i + 2 * VW <= n; i += 2 * VW) {
    s0 += Elem<DType::f32>::load(x + i);
    s1 += Elem<DType::f32>::load(x + i + VW);
  }
  for (; i + VW <= n; i += VW) s0 += Elem<DType::f32>::load(x + i);
  float s = hsum(s0 + s1);
  for (; i < n; ++i) s += x[i];
  return s;
}

static void layer_norm_rows(const float* x, const float* w, const float* b, float eps, int64_t n, int64_t r0,
                            int64_t r1, float* y, float* mean, float* rstd) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* xr = x + r * n;
    float* yr = y + r * n;
    const float mu = row_sum(xr, n) / float(n);
    vf q0 = splat(0.0f), q1 = q0;
    const vf m = splat(mu);
    int64_t i = 0;
    for (; i + 2 * VW <= n; i += 2 * VW) {
      const vf d0 = Elem<DType::f32>::load(xr + i) - m, d1 = Elem<DType::f32>::load(xr + i + VW) - m;
      q0 += d0 * d0;
      q1 += d1 * d1;
    }
    for (; i + VW <= n; i += VW) {
      const vf d = Elem<DType::f32>::load(xr + i) - m;
      q0 += d * d;
    }
    float q = hsum(q0 + q1);
    for (; i < n; ++i) q += (xr[i] - mu) * (xr[i] - mu);
    const float rs = 1.0f / sqrtf(q / float(n) + eps);
    mean[r] = mu;
    rstd[r] = rs;
    const vf s = splat(rs);
    for (i = 0; i + VW <= n; i += VW) {
      const vf out = (Elem<DType::f32>::load(xr + i) - m) * s * Elem<DType::f32>::load(w + i) + Elem<DType::f32>::load(b + i);
      memcpy(yr + i, &out, VB);
    }
    for (; i < n; ++i) yr[i] = (xr[i] - mu) * rs * w[i] + b[i];
  }
}

// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dy * w, xhat = (x - mean) rstd;
// dw += dy * xhat, db += dy. g is rounded once into a scratch row and every later use reads
// that row, so that g - mean(g) cancels exactly where it should (a fused multiply-add of
// dy * w against a rounded mean would leave the product's rounding, times rstd ~ 1e6 for
// a constant row).
static int64_t layer_norm_vjp_scratch(int64_t n) { return n; }  // the row g = dy * w

static void layer_norm_vjp_rows(const float* x, const float* w, const float* mean, const float* rstd,
                                const float* dy, int64_t n, int64_t r0, int64_t r1, float* dx, float* dw,
                                float* db, float* scratch) {
  float* gw = scratch;
  for (int64_t r = r0; r < r1; ++r) {
    const float* xr = x + r * n;
    const float* gr = dy + r * n;
    float* dxr = dx + r * n;
    const float mu = mean[r], rs = rstd[r];
    for (int64_t i = 0; i < n; ++i) {
      gw[i] = gr[i] * w[i];
      const float xh = (xr[i] - mu) * rs;
      dw[i] += gr[i] * xh;
      db[i] += gr[i];
    }
    const vf m = splat(mu), s = splat(rs);
    vf a0 = splat(0.0f), a1 = a0;
    int64_t i = 0;
    for (; i + VW <= n; i += VW) {
      const vf xh = (Elem<DType::f32>::load(xr + i) - m) * s;
      const vf g = Elem<DType::f32>::load(gw + i);
      a0 += g;
      a1 += g * xh;
    }
    float sg = hsum(a0), sgx = hsum(a1);
    for (int64_t j = i; j < n; ++j) {
      sg += gw[j];
      sgx += gw[j] * ((xr[j] - mu) * rs);
    }
    const float mg = sg / float(n), mgx = sgx / float(n);
    for (i = 0; i < n; ++i) dxr[i] = rs * ((gw[i] - mg) - ((xr[i] - mu) * rs) * mgx);
  }
}

}  // namespace UFB_ISA
}  // namespace ufb
