// The attention loops of the CPU extension (see loops.h for AttnArgs): one (batch, head)
// pair per call, forward and backward.
#pragma once

#include "loops_vec.h"

namespace ufb {
namespace UFB_ISA {

// ---------------------------------------------------------------------------------------
// Attention of one (batch, head): blocks of RB = 4 query rows against all keys, with the
// head's K^T and V packed once into zero-padded local buffers (columns padded to a
// multiple of 2 vectors, head size to a multiple of a vector) so the inner loops are
// whole vectors. Scores, softmax and P V stay in float32 in a 4-row strip that fits L1.

constexpr int64_t RB = 4;

static inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// s[r][j] = scale * sum_d q[r][d] kt[d][j], r < 4, j < Sp (Sp a multiple of 2 vectors).
static void rows_dot_cols(const float* const* q, const float* kt, int64_t dh, int64_t Sp, float scale, float* s) {
  for (int64_t c = 0; c < Sp; c += 2 * VW) {
    vf a0 = splat(0.0f), a1 = a0, b0 = a0, b1 = a0, c0 = a0, c1 = a0, d0 = a0, d1 = a0;
    for (int64_t d = 0; d < dh; ++d) {
      const vf k0 = Elem<DType::f32>::load(kt + d * Sp + c);
      const vf k1 = Elem<DType::f32>::load(kt + d * Sp + c + VW);
      const vf q0 = splat(q[0][d]), q1 = splat(q[1][d]), q2 = splat(q[2][d]), q3 = splat(q[3][d]);
      a0 += q0 * k0; a1 += q0 * k1;
      b0 += q1 * k0; b1 += q1 * k1;
      c0 += q2 * k0; c1 += q2 * k1;
      d0 += q3 * k0; d1 += q3 * k1;
    }
    const vf sc = splat(scale);
    a0 *= sc; a1 *= sc; b0 *= sc; b1 *= sc; c0 *= sc; c1 *= sc; d0 *= sc; d1 *= sc;
    memcpy(s + 0 * Sp + c, &a0, VB); memcpy(s + 0 * Sp + c + VW, &a1, VB);
    memcpy(s + 1 * Sp + c, &b0, VB); memcpy(s + 1 * Sp + c + VW, &b1, VB);
    memcpy(s + 2 * Sp + c, &c0, VB); memcpy(s + 2 * Sp + c + VW, &c1, VB);
    memcpy(s + 3 * Sp + c, &d0, VB); memcpy(s + 3 * Sp + c + VW, &d1, VB);
  }
}

// o[r][:] = sum_{j < S} p[r][j] m[j][:], r < 4, rows of m and o dhp wide (multiple of VW).
static void coef_times_rows(const float* p, int64_t Sp, const float* m, int64_t S, int64_t dhp, float* o) {
  for (int64_t c = 0; c < dhp; c += VW) {
    vf a0 = splat(0.0f), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t j = 0; j < S; ++j) {
      const vf v = Elem<DType::f32>::load(m + j * dhp + c);
      a0 += splat(p[0 * Sp + j]) * v;
      a1 += splat(p[1 * Sp + j]) * v;
      a2 += splat(p[2 * Sp + j]) * v;
      a3 += splat(p[3 * Sp + j]) * v;
    }
    memcpy(o + 0 * dhp + c, &a0, VB);
    memcpy(o + 1 * dhp + c, &a1, VB);
    memcpy(o + 2 * dhp + c, &a2, VB);
    memcpy(o + 3 * dhp + c, &a3, VB);
  }
}

// acc[j][:] += sum_r p[r][j] rows[r][:] for j < S (rows dhp wide).
static void rank4_update(const float* p, int64_t Sp, const float* const* rows, int64_t S, int64_t dhp, float* acc) {
  for (int64_t c = 0; c < dhp; c += VW) {
    const vf r0 = Elem<DType::f32>::load(rows[0] + c), r1 = Elem<DType::f32>::load(rows[1] + c);
    const vf r2 = Elem<DType::f32>::load(rows[2] + c), r3 = Elem<DType::f32>::load(rows[3] + c);
    for (int64_t j = 0; j < S; ++j) {
      vf a = Elem<DType::f32>::load(acc + j * dhp + c);
      a += splat(p[0 * Sp + j]) * r0 + splat(p[1 * Sp + j]) * r1 + splat(p[2 * Sp + j]) * r2 + splat(p[3 * Sp + j]) * r3;
      memcpy(acc + j * dhp + c, &a, VB);
    }
  }
}

struct HeadView {
  const float* base;  // qkv + b * S * ld
  int64_t ld;         // 3 * heads * dh
  int64_t q0, k0, v0; // column offsets of this head's q, k, v
};

// Packs: kt (dh, Sp) = K^T zero-padded; rowsT (S, dhp) of column block `col` zero-padded.
static void pack_transposed(const HeadView& hv, int64_t col, int64_t S, int64_t dh, int64_t Sp, float* kt) {
  for (int64_t d = 0; d < dh; ++d) {
    for (int64_t j = 0; j < S; ++j) kt[d * Sp + j] = hv.base[j * hv.ld + col + d];
    for (int64_t j = S; j < Sp; ++j) kt[d * Sp + j] = 0.0f;
  }
}
static void pack_rows(const float* base, int64_t ld, int64_t col, int64_t S, int64_t dh, int64_t dhp, float* out) {
  for (int64_t j = 0; j < S; ++j) {
    memcpy(out + j * dhp, base + j * ld + col, sizeof(float) * dh);
    for (int64_t d = dh; d < dhp; ++d) out[j * dhp + d] = 0.0f;
  }
}

// Row r of the 4-row strip: scores + mask (padding columns -inf), then either the
// softmax (returning its log-sum-exp) or, given the lse, the probabilities again.
static float softmax_strip_row(float* s, int64_t S, int64_t Sp, const float* mask, const float* lse_in) {
  for (int64_t j = S; j < Sp; ++j) s[j] = -INFINITY;
  int64_t j = 0;
  if (mask) {
    for (; j + VW <= S; j += VW) {
      vf v = Elem<DType::f32>::load(s + j) + Elem<DType::f32>::load(mask + j);
      memcpy(s + j, &v, VB);
    }
    for (; j < S; ++j) s[j] += mask[j];
  }
  float m;
  if (lse_in) {
    m = *lse_in;
  } else {
    vf mv = splat(-INFINITY);
    for (j = 0; j < Sp; j += VW) {
      const vf v = Elem<DType::f32>::load(s + j);
      mv = vselect(v > mv, v, mv);
    }
    m = mv[0];
    for (int i = 1; i < VW; ++i) m = mv[i] > m ? mv[i] : m;
  }
  vf sum = splat(0.0f);
  const vf mm = splat(m);
  for (j = 0; j < Sp; j += VW) {
    vf e = vexp(Elem<DType::f32>::load(s + j) - mm);
    sum += e;
    memcpy(s + j, &e, VB);
  }
  if (lse_in) return *lse_in;
  const float total = hsum(sum);
  const vf inv = splat(1.0f / total);
  for (j = 0; j < Sp; j += VW) {
    vf e = Elem<DType::f32>::load(s + j) * inv;
    memcpy(s + j, &e, VB);
  }
  return m + logf(total);
}

static HeadView head_view(const AttnArgs& a, int64_t b, int64_t h) {
  const int64_t ld = 3 * a.heads * a.dh;
  return {a.qkv + b * a.S * ld, ld, 3 * a.dh * h, 3 * a.dh * h + a.dh, 3 * a.dh * h + 2 * a.dh};
}

// Scratch: K^T, V, a strip of scores and a strip of outputs, padded as above.
static int64_t attention_forward_scratch(const AttnArgs& a) {
  const int64_t Sp = round_up(a.S, 2 * VW), dhp = round_up(a.dh, VW);
  return a.dh * Sp + a.S * dhp + RB * Sp + RB * dhp;
}

static void attention_forward(const AttnArgs& a, int64_t b, int64_t h, float* scratch) {
  const int64_t S = a.S, dh = a.dh, Sp = round_up(S, 2 * VW), dhp = round_up(dh, VW);
  const HeadView hv = head_view(a, b, h);
  float *kt = scratch, *v = kt + dh * Sp, *s = v + S * dhp, *o = s + RB * Sp;
  pack_transposed(hv, hv.k0, S, dh, Sp, kt);
  pack_rows(hv.base, hv.ld, hv.v0, S, dh, dhp, v);
  const float* mask = a.mask ? a.mask + b * S : nullptr;
  const int64_t H = a.heads * dh;
  for (int64_t i0 = 0; i0 < S; i0 += RB) {
    const int64_t nr = S - i0 < RB ? S - i0 : RB;
    const float* q[RB];
    for (int64_t r = 0; r < RB; ++r) q[r] = hv.base + (i0 + (r < nr ? r : 0)) * hv.ld + hv.q0;
    rows_dot_cols(q, kt, dh, Sp, a.scale, s);
    for (int64_t r = 0; r < nr; ++r) a.lse[(b * a.heads + h) * S + i0 + r] = softmax_strip_row(s + r * Sp, S, Sp, mask, nullptr);
    for (int64_t r = nr; r < RB; ++r) memset(s + r * Sp, 0, sizeof(float) * Sp);
    coef_times_rows(s, Sp, v, S, dhp, o);
    for (int64_t r = 0; r < nr; ++r) memcpy(a.out + (b * S + i0 + r) * H + h * dh, o + r * dhp, sizeof(float) * dh);
  }
}

// dV = P^T dO, dP = dO V^T, dS = P (dP - rowsum(dO O)), dQ = scale dS K, dK = scale dS^T Q.
// Scratch: K^T, V^T, Q, K, dO, dK, dV, strips of P, dS and dQ, and rowsum(dO O).
static int64_t attention_backward_scratch(const AttnArgs& a) {
  const int64_t Sp = round_up(a.S, 2 * VW), dhp = round_up(a.dh, VW);
  return 2 * a.dh * Sp + 5 * a.S * dhp + 2 * RB * Sp + RB * dhp + a.S;
}

static void attention_backward(const AttnArgs& a, int64_t b, int64_t h, float* scratch) {
  const int64_t S = a.S, dh = a.dh, Sp = round_up(S, 2 * VW), dhp = round_up(dh, VW);
  const int64_t H = a.heads * dh;
  const HeadView hv = head_view(a, b, h);
  float *kt = scratch, *vt = kt + dh * Sp, *q = vt + dh * Sp, *k = q + S * dhp, *dO = k + S * dhp;
  float *dk = dO + S * dhp, *dv = dk + S * dhp, *p = dv + S * dhp, *ds = p + RB * Sp, *o = ds + RB * Sp;
  float* D = o + RB * dhp;
  pack_transposed(hv, hv.k0, S, dh, Sp, kt);
  pack_transposed(hv, hv.v0, S, dh, Sp, vt);
  pack_rows(hv.base, hv.ld, hv.q0, S, dh, dhp, q);
  pack_rows(hv.base, hv.ld, hv.k0, S, dh, dhp, k);
  const float* dout_b = a.dout + b * S * H;
  const float* out_b = a.out + b * S * H;
  pack_rows(dout_b, H, h * dh, S, dh, dhp, dO);
  memset(dk, 0, sizeof(float) * S * dhp);
  memset(dv, 0, sizeof(float) * S * dhp);
  for (int64_t i = 0; i < S; ++i) {
    float acc = 0.0f;
    for (int64_t d = 0; d < dh; ++d) acc += dout_b[i * H + h * dh + d] * out_b[i * H + h * dh + d];
    D[i] = acc;
  }
  const float* mask = a.mask ? a.mask + b * S : nullptr;
  const float* lse = a.lse + (b * a.heads + h) * S;
  const int64_t ldq = 3 * H;
  float* dqkv_b = a.dqkv + b * S * ldq;
  for (int64_t i0 = 0; i0 < S; i0 += RB) {
    const int64_t nr = S - i0 < RB ? S - i0 : RB;
    const float *qr[RB], *dor[RB];
    for (int64_t r = 0; r < RB; ++r) {
      const int64_t i = i0 + (r < nr ? r : 0);
      qr[r] = q + i * dhp;
      dor[r] = dO + i * dhp;
    }
    rows_dot_cols(qr, kt, dh, Sp, a.scale, p);
    rows_dot_cols(dor, vt, dh, Sp, 1.0f, ds);
    for (int64_t r = 0; r < RB; ++r) {
      if (r >= nr) {  // duplicated rows of a short strip must contribute nothing
        memset(p + r * Sp, 0, sizeof(float) * Sp);
        memset(ds + r * Sp, 0, sizeof(float) * Sp);
        continue;
      }
      softmax_strip_row(p + r * Sp, S, Sp, mask, lse + i0 + r);
      const float Di = D[i0 + r];
      for (int64_t j = 0; j < Sp; ++j) ds[r * Sp + j] = p[r * Sp + j] * (ds[r * Sp + j] - Di);
    }
    coef_times_rows(ds, Sp, k, S, dhp, o);  // dQ strip (unscaled)
    for (int64_t r = 0; r < nr; ++r) {
      float* dst = dqkv_b + (i0 + r) * ldq + hv.q0;
      for (int64_t d = 0; d < dh; ++d) dst[d] = a.scale * o[r * dhp + d];
    }
    rank4_update(p, Sp, dor, S, dhp, dv);
    rank4_update(ds, Sp, qr, S, dhp, dk);
  }
  for (int64_t j = 0; j < S; ++j) {
    float* dst = dqkv_b + j * ldq;
    for (int64_t d = 0; d < dh; ++d) {
      dst[hv.k0 + d] = a.scale * dk[j * dhp + d];
      dst[hv.v0 + d] = dv[j * dhp + d];
    }
  }
}

}  // namespace UFB_ISA
}  // namespace ufb
