// The FFF loops of the CPU extension (see loops.h for the layouts): the forward descent,
// the backward per token and the backward per row.
#pragma once

#include "loops_vec.h"

namespace ufb {
namespace UFB_ISA {

// ---------------------------------------------------------------------------------------
// FFF forward. A block of up to B tokens descends level by level together (their x rows
// and accumulators stay in L2). At each level the block's tokens are ordered by the node
// they visit, so tokens that share a node read its weight rows back to back from L1 (at
// the top levels every token shares a few rows: each is fetched once per block instead of
// once per token), and four visits at a time are computed side by side, which keeps four
// independent loads of weight rows in flight.

constexpr int64_t B = 64;  // tokens per block

// z[j] = dot(x_j, w_j) for four (x, w) row pairs at once.
template <DType W>
static inline void dot4(const float* const* x, const typename Elem<W>::type* const* w, int64_t n, float* z) {
  vf a0 = splat(0.0f), a1 = a0, a2 = a0, a3 = a0, c0 = a0, c1 = a0, c2 = a0, c3 = a0;
  int64_t i = 0;
  for (; i + 2 * VW <= n; i += 2 * VW) {
    a0 += Elem<DType::f32>::load(x[0] + i) * Elem<W>::load(w[0] + i);
    a1 += Elem<DType::f32>::load(x[1] + i) * Elem<W>::load(w[1] + i);
    a2 += Elem<DType::f32>::load(x[2] + i) * Elem<W>::load(w[2] + i);
    a3 += Elem<DType::f32>::load(x[3] + i) * Elem<W>::load(w[3] + i);
    c0 += Elem<DType::f32>::load(x[0] + i + VW) * Elem<W>::load(w[0] + i + VW);
    c1 += Elem<DType::f32>::load(x[1] + i + VW) * Elem<W>::load(w[1] + i + VW);
    c2 += Elem<DType::f32>::load(x[2] + i + VW) * Elem<W>::load(w[2] + i + VW);
    c3 += Elem<DType::f32>::load(x[3] + i + VW) * Elem<W>::load(w[3] + i + VW);
  }
  for (; i + VW <= n; i += VW) {
    a0 += Elem<DType::f32>::load(x[0] + i) * Elem<W>::load(w[0] + i);
    a1 += Elem<DType::f32>::load(x[1] + i) * Elem<W>::load(w[1] + i);
    a2 += Elem<DType::f32>::load(x[2] + i) * Elem<W>::load(w[2] + i);
    a3 += Elem<DType::f32>::load(x[3] + i) * Elem<W>::load(w[3] + i);
  }
  z[0] = hsum(a0 + c0);
  z[1] = hsum(a1 + c1);
  z[2] = hsum(a2 + c2);
  z[3] = hsum(a3 + c3);
  for (; i < n; ++i) {
    for (int j = 0; j < 4; ++j) z[j] += x[j][i] * Elem<W>::get(w[j], i);
  }
}

template <DType X, DType W>
static void forward_block(const ForwardArgs& a, int64_t t0, int64_t nt, float* xf, float* acc) {
  typedef typename Elem<W>::type wtype;
  const int64_t H = a.H;
  const int L = a.D + 1;
  const int64_t N = (int64_t(2) << a.D) - 1;
  const wtype* w_in = static_cast<const wtype*>(a.w_in);
  const wtype* b_in = static_cast<const wtype*>(a.b_in);
  const wtype* w_out = static_cast<const wtype*>(a.w_out_t);
  const typename Elem<X>::type* x = static_cast<const typename Elem<X>::type*>(a.x);
  typename Elem<X>::type* y = static_cast<typename Elem<X>::type*>(a.y);

  for (int64_t g = 0; g < nt; ++g) {
    widen<X>(x + (t0 + g) * H, xf + g * H, H);
    memset(acc + g * H, 0, sizeof(float) * H);
  }
  int64_t node[B], order[B];
  for (int tree = 0; tree < a.P; ++tree) {
    for (int64_t g = 0; g < nt; ++g) {
      node[g] = 0;
      order[g] = g;
    }
    for (int level = 0; level < L; ++level) {
      // Order by node. Tokens were ordered by the parent, and children of a smaller
      // parent are smaller, so this insertion sort only swaps within sibling groups.
      for (int64_t i = 1; i < nt; ++i) {
        const int64_t o = order[i];
        int64_t j = i;
        for (; j > 0 && node[order[j - 1]] > node[o]; --j) order[j] = order[j - 1];
        order[j] = o;
      }
      for (int64_t i = 0; i < nt; i += 4) {
        const int64_t m = nt - i < 4 ? nt - i : 4;
        const float* xs[4];
        const wtype* ws[4];
        int64_t g4[4];
        float zv[4];
        for (int j = 0; j < 4; ++j) {  // a short last group repeats its first visit
          g4[j] = order[i + (j < m ? j : 0)];
          xs[j] = xf + g4[j] * H;
          ws[j] = w_in + (tree * N + node[g4[j]]) * H;
        }
        dot4<W>(xs, ws, H, zv);
        for (int j = 0; j < m; ++j) {
          const int64_t g = g4[j];
          const int64_t r = tree * N + node[g];
          const float z = zv[j] + Elem<W>::get(b_in, r);
          axpy<W>(gelu1(z), w_out + r * H, acc + g * H, H);
          const int64_t slot = ((t0 + g) * a.P + tree) * L + level;
          a.rows[slot] = int32_t(r);
          a.z[slot] = z;
          node[g] = 2 * node[g] + (z > 0.0f ? 2 : 1);  // strictly positive goes right
        }
      }
    }
  }
  for (int64_t g = 0; g < nt; ++g) narrow<X>(acc + g * H, y + (t0 + g) * H, H);
}

// Scratch: a block's float32 x rows and accumulators.
static int64_t forward_scratch(const ForwardArgs& a) { return 2 * (a.T < B ? a.T : B) * a.H; }

template <DType X, DType W>
static void forward_range(const ForwardArgs& a, int64_t t0, int64_t t1, float* scratch) {
  const int64_t nb = t1 - t0 < B ? t1 - t0 : B;
  for (int64_t t = t0; t < t1; t += B) {
    const int64_t nt = t1 - t < B ? t1 - t : B;
    forward_block<X, W>(a, t, nt, scratch, scratch + nb * a.H);
  }
}

// ---------------------------------------------------------------------------------------
// FFF backward, per token: dz = (dy . w_out_t[row]) * gelu'(z), act = gelu(z),
// dx = sum over visits of dz * w_in[row].

// Scratch: the token's float32 dy row and dx accumulator.
static int64_t backward_tokens_scratch(const BackwardArgs& a) { return 2 * a.H; }

template <DType X, DType W>
static void backward_tokens_range(const BackwardArgs& a, int64_t t0, int64_t t1, float* scratch) {
  typedef typename Elem<W>::type wtype;
  typedef typename Elem<X>::type xtype;
  const int64_t H = a.H;
  const int64_t V = int64_t(a.P) * (a.D + 1);
  const wtype* w_in = static_cast<const wtype*>(a.w_in);
  const wtype* w_out = static_cast<const wtype*>(a.w_out_t);
  const xtype* dy = static_cast<const xtype*>(a.dy);
  xtype* dx = static_cast<xtype*>(a.dx);
  float* g = scratch;
  float* acc = scratch + H;
  for (int64_t t = t0; t < t1; ++t) {
    widen<X>(dy + t * H, g, H);
    memset(acc, 0, sizeof(float) * H);
    for (int64_t v = 0; v < V; ++v) {
      const int64_t slot = t * V + v;
      const int64_t r = a.rows[slot];
      const float zv = a.z[slot];
      const float d = dot<W>(g, w_out + r * H, H) * gelu_grad1(zv);
      axpy<W>(d, w_in + r * H, acc, H);
      a.dz[slot] = d;
      a.act[slot] = gelu1(zv);
    }
    narrow<X>(acc, dx + t * H, H);
  }
}

// Per row r and column range [h0, h1): the row's visits in token order. Each output
// element is summed by exactly one call in a fixed order, so the gradients are bitwise
// the same for any number of threads and any split of the work.
template <DType X, DType W>
static void backward_rows_range(const BackwardArgs& a, int64_t r, int64_t h0, int64_t h1) {
  typedef typename Elem<W>::type wtype;
  typedef typename Elem<X>::type xtype;
  const int64_t H = a.H;
  const int64_t V = int64_t(a.P) * (a.D + 1);
  const xtype* x = static_cast<const xtype*>(a.x);
  const xtype* dy = static_cast<const xtype*>(a.dy);
  wtype* d_in = static_cast<wtype*>(a.d_w_in) + r * H;
  wtype* d_out = static_cast<wtype*>(a.d_w_out_t) + r * H;
  const int64_t begin = a.offsets[r], end = a.offsets[r + 1];
  constexpr int64_t CH = 256;
  float gin[CH], gout[CH], tmp[CH];
  for (int64_t c0 = h0; c0 < h1; c0 += CH) {
    const int64_t n = h1 - c0 < CH ? h1 - c0 : CH;
    memset(gin, 0, sizeof(float) * n);
    memset(gout, 0, sizeof(float) * n);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t visit = a.order[i];
      const int64_t t = visit / V;
      if (X == DType::f32) {
        axpy<DType::f32>(a.dz[visit], reinterpret_cast<const float*>(x) + t * H + c0, gin, n);
        axpy<DType::f32>(a.act[visit], reinterpret_cast<const float*>(dy) + t * H + c0, gout, n);
      } else {
        widen<X>(x + t * H + c0, tmp, n);
        axpy<DType::f32>(a.dz[visit], tmp, gin, n);
        widen<X>(dy + t * H + c0, tmp, n);
        axpy<DType::f32>(a.act[visit], tmp, gout, n);
      }
    }
    narrow<W>(gin, d_in + c0, n);
    narrow<W>(gout, d_out + c0, n);
  }
  if (h0 == 0) {
    float gb = 0.0f;
    for (int64_t i = begin; i < end; ++i) gb += a.dz[a.order[i]];
    Elem<W>::put(static_cast<wtype*>(a.d_b_in), r, gb);
  }
}

// ---------------------------------------------------------------------------------------
// Dtype dispatch: one instantiation per (activation, weight) dtype pair.

#define UFB_DISPATCH2(a, FN, ...)                                                    \
  switch (int(a.xt) * 3 + int(a.wt)) {                                                \
    case 0: return FN<DType::f32, DType::f32>(a, __VA_ARGS__);                        \
    case 1: return FN<DType::f32, DType::f16>(a, __VA_ARGS__);                        \
    case 2: return FN<DType::f32, DType::bf16>(a, __VA_ARGS__);                       \
    case 3: return FN<DType::f16, DType::f32>(a, __VA_ARGS__);                        \
    case 4: return FN<DType::f16, DType::f16>(a, __VA_ARGS__);                        \
    case 5: return FN<DType::f16, DType::bf16>(a, __VA_ARGS__);                       \
    case 6: return FN<DType::bf16, DType::f32>(a, __VA_ARGS__);                       \
    case 7: return FN<DType::bf16, DType::f16>(a, __VA_ARGS__);                       \
    default: return FN<DType::bf16, DType::bf16>(a, __VA_ARGS__);                     \
  }

static void forward(const ForwardArgs& a, int64_t t0, int64_t t1, float* scratch) {
  UFB_DISPATCH2(a, forward_range, t0, t1, scratch)
}
static void backward_tokens(const BackwardArgs& a, int64_t t0, int64_t t1, float* scratch) {
  UFB_DISPATCH2(a, backward_tokens_range, t0, t1, scratch)
}
static void backward_rows(const BackwardArgs& a, int64_t r, int64_t h0, int64_t h1) {
  UFB_DISPATCH2(a, backward_rows_range, r, h0, h1)
}
#undef UFB_DISPATCH2

}  // namespace UFB_ISA
}  // namespace ufb
