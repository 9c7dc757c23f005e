// The loops behind kernels.h, written once with GCC/Clang vector extensions and compiled
// per instruction set: a translation unit defines UFB_ISA (a namespace name) and
// UFB_VBYTES (vector width in bytes: 64 for AVX-512, 32 for AVX2, 16 for NEON/SSE2),
// then includes this file with matching target flags. Everything here lives in
// ufb::UFB_ISA, so the differently-compiled copies never meet at link time; no standard
// library templates are instantiated here for the same reason (one definition rule).
//
// Accuracy: float32 accumulation throughout. GELU of the FFF's visited logits uses libm's
// erfcf (exact-erf GELU, as the original's torch.nn.GELU()); the elementwise gelu/softmax
// loops use the vector erf/exp below (max error a few float32 ulp, see the test suite).

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "kernels.h"

#ifndef UFB_ISA
#error "define UFB_ISA and UFB_VBYTES before including kernels_impl.h"
#endif

namespace ufb {
namespace UFB_ISA {

constexpr int VB = UFB_VBYTES;
constexpr int VW = VB / 4;  // float lanes per vector
typedef float vf __attribute__((vector_size(VB)));
typedef int32_t vi __attribute__((vector_size(VB)));
typedef uint32_t vu __attribute__((vector_size(VB)));
typedef uint16_t vh16 __attribute__((vector_size(VB / 2)));

// ---------------------------------------------------------------------------------------
// Element access: loads widen to float32, stores round to nearest even.

static inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1fu) {
    bits = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal half: normalise
    exp = 113u;
    while (!(man & 0x400u)) {
      man <<= 1;
      --exp;
    }
    bits = sign | (exp << 23) | ((man & 0x3ffu) << 13);
  }
  return __builtin_bit_cast(float, bits);
}

static inline uint16_t f32_to_f16(float f) {
  const uint32_t x = __builtin_bit_cast(uint32_t, f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) {  // inf or nan
    return uint16_t(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0u));
  }
  if (ax >= 0x477ff000u) {  // rounds to >= 65520: overflow
    return uint16_t(sign | 0x7c00u);
  }
  if (ax < 0x38800000u) {  // below the smallest normal half: subnormal or zero
    if (ax < 0x33000000u) {
      return uint16_t(sign);
    }
    const uint32_t e = ax >> 23;
    const uint32_t m = (ax & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126u - e;  // 14..24
    const uint32_t half = 1u << (shift - 1);
    uint32_t r = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1u);
    if (rem > half || (rem == half && (r & 1u))) {
      ++r;
    }
    return uint16_t(sign | r);
  }
  uint32_t r = ax - 0x38000000u;  // rebias exponent by 112 << 23
  r = (r + 0xfffu + ((r >> 13) & 1u)) >> 13;
  return uint16_t(sign | r);
}

static inline float bf16_to_f32(uint16_t h) { return __builtin_bit_cast(float, uint32_t(h) << 16); }

static inline uint16_t f32_to_bf16(float f) {
  const uint32_t x = __builtin_bit_cast(uint32_t, f);
  if ((x & 0x7fffffffu) > 0x7f800000u) {
    return uint16_t((x >> 16) | 0x40u);  // quiet nan
  }
  return uint16_t((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

template <DType T> struct Elem;
template <> struct Elem<DType::f32> {
  typedef float type;
  static inline float get(const float* p, int64_t i) { return p[i]; }
  static inline void put(float* p, int64_t i, float v) { p[i] = v; }
  static inline vf load(const float* p) {
    vf v;
    memcpy(&v, p, VB);
    return v;
  }
};
template <> struct Elem<DType::f16> {
  typedef uint16_t type;
  static inline float get(const uint16_t* p, int64_t i) { return f16_to_f32(p[i]); }
  static inline void put(uint16_t* p, int64_t i, float v) { p[i] = f32_to_f16(v); }
  static inline vf load(const uint16_t* p) {
#if defined(__F16C__) || defined(__aarch64__)
    typedef _Float16 vhf __attribute__((vector_size(VB / 2)));
    vhf h;
    memcpy(&h, p, VB / 2);
    return __builtin_convertvector(h, vf);
#else
    vf v;
    for (int i = 0; i < VW; ++i) v[i] = f16_to_f32(p[i]);
    return v;
#endif
  }
};
template <> struct Elem<DType::bf16> {
  typedef uint16_t type;
  static inline float get(const uint16_t* p, int64_t i) { return bf16_to_f32(p[i]); }
  static inline void put(uint16_t* p, int64_t i, float v) { p[i] = f32_to_bf16(v); }
  static inline vf load(const uint16_t* p) {
    vh16 h;
    memcpy(&h, p, VB / 2);
    vu u = __builtin_convertvector(h, vu) << 16;
    vf v;
    memcpy(&v, &u, VB);
    return v;
  }
};

// Written as vector - scalar so the compiler emits one broadcast (a lane-by-lane loop here
// became 16 masked inserts under AVX-512). a - 0 is exactly a, -0 included.
static inline vf splat(float a) { return a - vf{}; }

static inline float hsum(vf v) {
  float s = 0.0f;
  for (int i = 0; i < VW; ++i) s += v[i];
  return s;
}

// ---------------------------------------------------------------------------------------
// Row primitives: x is a float32 row (the token, widened once), w a weight row.

// dot(x, w) over n elements; four independent accumulators hide the FMA latency.
template <DType W>
static inline float dot(const float* x, const typename Elem<W>::type* w, int64_t n) {
  vf a0 = splat(0.0f), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 4 * VW <= n; i += 4 * VW) {
    a0 += Elem<DType::f32>::load(x + i) * Elem<W>::load(w + i);
    a1 += Elem<DType::f32>::load(x + i + VW) * Elem<W>::load(w + i + VW);
    a2 += Elem<DType::f32>::load(x + i + 2 * VW) * Elem<W>::load(w + i + 2 * VW);
    a3 += Elem<DType::f32>::load(x + i + 3 * VW) * Elem<W>::load(w + i + 3 * VW);
  }
  for (; i + VW <= n; i += VW) {
    a0 += Elem<DType::f32>::load(x + i) * Elem<W>::load(w + i);
  }
  float s = hsum((a0 + a1) + (a2 + a3));
  for (; i < n; ++i) s += x[i] * Elem<W>::get(w, i);
  return s;
}

// acc += a * w over n elements.
template <DType W>
static inline void axpy(float a, const typename Elem<W>::type* w, float* acc, int64_t n) {
  const vf va = splat(a);
  int64_t i = 0;
  for (; i + VW <= n; i += VW) {
    vf y = Elem<DType::f32>::load(acc + i) + va * Elem<W>::load(w + i);
    memcpy(acc + i, &y, VB);
  }
  for (; i < n; ++i) acc[i] += a * Elem<W>::get(w, i);
}

template <DType T>
static inline void widen(const typename Elem<T>::type* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + VW <= n; i += VW) {
    vf v = Elem<T>::load(src + i);
    memcpy(dst + i, &v, VB);
  }
  for (; i < n; ++i) dst[i] = Elem<T>::get(src, i);
}

template <DType T>
static inline void narrow(const float* src, typename Elem<T>::type* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) Elem<T>::put(dst, i, src[i]);
}

// Exact-erf GELU and its derivative for single logits: Phi(z) = erfc(-z / sqrt(2)) / 2.
static inline float gelu1(float z) {
  return 0.5f * z * erfcf(-z * 0.70710678118654752f);
}
static inline float gelu_grad1(float z) {
  const float cdf = 0.5f * erfcf(-z * 0.70710678118654752f);
  return cdf + z * 0.39894228040143268f * expf(-0.5f * z * z);
}

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
  for (int k = 0; k < a.P; ++k) {
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
          ws[j] = w_in + (k * N + node[g4[j]]) * H;
        }
        dot4<W>(xs, ws, H, zv);
        for (int j = 0; j < m; ++j) {
          const int64_t g = g4[j];
          const int64_t r = k * N + node[g];
          const float z = zv[j] + Elem<W>::get(b_in, r);
          axpy<W>(gelu1(z), w_out + r * H, acc + g * H, H);
          const int64_t slot = ((t0 + g) * a.P + k) * L + level;
          a.rows[slot] = int32_t(r);
          a.z[slot] = z;
          node[g] = 2 * node[g] + (z > 0.0f ? 2 : 1);  // strictly positive goes right
        }
      }
    }
  }
  for (int64_t g = 0; g < nt; ++g) narrow<X>(acc + g * H, y + (t0 + g) * H, H);
}

template <DType X, DType W>
static void forward_range(const ForwardArgs& a, int64_t t0, int64_t t1) {
  const int64_t nb = t1 - t0 < B ? t1 - t0 : B;
  float* buf = new float[2 * nb * a.H];
  for (int64_t t = t0; t < t1; t += B) {
    const int64_t nt = t1 - t < B ? t1 - t : B;
    forward_block<X, W>(a, t, nt, buf, buf + nb * a.H);
  }
  delete[] buf;
}

// ---------------------------------------------------------------------------------------
// FFF backward, per token: dz = (dy . w_out_t[row]) * gelu'(z), act = gelu(z),
// dx = sum over visits of dz * w_in[row].

template <DType X, DType W>
static void backward_tokens_range(const BackwardArgs& a, int64_t t0, int64_t t1) {
  typedef typename Elem<W>::type wtype;
  typedef typename Elem<X>::type xtype;
  const int64_t H = a.H;
  const int64_t V = int64_t(a.P) * (a.D + 1);
  const wtype* w_in = static_cast<const wtype*>(a.w_in);
  const wtype* w_out = static_cast<const wtype*>(a.w_out_t);
  const xtype* dy = static_cast<const xtype*>(a.dy);
  xtype* dx = static_cast<xtype*>(a.dx);
  float* buf = new float[2 * H];
  float* g = buf;
  float* acc = buf + H;
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
  delete[] buf;
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
// Vector exp and erf for the elementwise loops (GELU of dense layers, softmax).

static inline vf vselect(vi mask, vf a, vf b) {
  vi ai, bi;
  memcpy(&ai, &a, VB);
  memcpy(&bi, &b, VB);
  vi r = (mask & ai) | (~mask & bi);
  vf out;
  memcpy(&out, &r, VB);
  return out;
}

static inline vf vabs(vf a) {
  vi ai;
  memcpy(&ai, &a, VB);
  ai &= 0x7fffffff;
  vf out;
  memcpy(&out, &ai, VB);
  return out;
}

static inline vf vround(vf a) {
  // round to nearest (ties away; only used for the exp range reduction) for |a| < 2^22
  const vf magic = splat(12582912.0f);  // 1.5 * 2^23
  return (a + magic) - magic;
}

// exp(x) for float32 lanes: x = n ln2 + r with |r| <= ln2/2, exp(r) by a degree-6
// polynomial (Cephes expf coefficients), times 2^n built in the exponent bits.
// Inputs below -87.3 give 0 (softmax's masked scores), above 88.7 give inf.
static inline vf vexp(vf x) {
  const vf hi = splat(88.72283935546875f), lo = splat(-87.33654785156250f);
  const vi under = x < lo;
  const vi over = x > hi;
  x = vselect(under, lo, vselect(over, hi, x));
  const vf n = vround(x * splat(1.44269504088896341f));
  vf r = x - n * splat(0.693359375f);
  r = r - n * splat(-2.12194440e-4f);
  const vf r2 = r * r;
  vf p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  p = p * r2 + r + splat(1.0f);
  vi e = (__builtin_convertvector(n, vi) + 127) << 23;
  vf scale;
  memcpy(&scale, &e, VB);
  vf out = p * scale;
  out = vselect(under, splat(0.0f), out);
  return vselect(over, splat(INFINITY), out);
}

// exp(-s v^2), s in {1, 0.5}, with v split at 1/256 so that the large part of v^2 is
// exact (the rounding of v^2 would otherwise become a relative error of the result).
static inline vf vexp_neg_scaled_sq(vf v, float s) {
  vf a = vabs(v);
  a = vselect(a > splat(15.0f), splat(15.0f), a);
  const vf ah = __builtin_convertvector(__builtin_convertvector(a * splat(256.0f), vi), vf) * splat(0.00390625f);
  return vexp(splat(-s) * (ah * ah)) * vexp(splat(-s) * ((a - ah) * (a + ah)));
}

// The erf / erfc pieces of metal/fff_gelu.h, lane-wise.
static inline vf verf_small(vf x) {  // |x| <= 1
  const vf s = x * x;
  vf r = splat(7.853859279e-05f);
  r = r * s + splat(-8.010193123e-04f);
  r = r * s + splat(5.188327748e-03f);
  r = r * s + splat(-2.685381100e-02f);
  r = r * s + splat(1.128358543e-01f);
  r = r * s + splat(-3.761262596e-01f);
  r = r * s + splat(1.283791661e-01f);
  return r * x + x;
}

static inline vf verfc_scaled_tail(vf x) {  // erfc(x) * exp(x^2), x >= 1
  const vf u = splat(1.0f) / (splat(0.5f) * x + splat(1.0f));
  vf q = splat(-3.687451407e-02f);
  q = q * u + splat(2.152447850e-01f);
  q = q * u + splat(-3.974559903e-01f);
  q = q * u + splat(2.160502076e-01f);
  q = q * u + splat(-2.137194388e-03f);
  q = q * u + splat(1.972514093e-01f);
  q = q * u + splat(2.437036633e-01f);
  q = q * u + splat(2.823565900e-01f);
  q = q * u + splat(2.820854187e-01f);
  return u * q;
}

// Phi(z) = erfc(-z/sqrt(2)) / 2 with the three branches of fff_norm_cdf.
static inline vf vnorm_cdf(vf z) {
  const vf x = splat(-0.70710678118654752f) * z;
  const vf ax = vabs(x);
  const vf tail = splat(0.5f) * vexp_neg_scaled_sq(z, 0.5f) *
                  verfc_scaled_tail(vselect(ax < splat(1.0f), splat(1.0f), ax));
  const vf mid = splat(0.5f) - splat(0.5f) * verf_small(vselect(ax < splat(1.0f), x, splat(0.0f)));
  vf out = vselect(x >= splat(1.0f), tail, splat(1.0f) - tail);
  return vselect(ax < splat(1.0f), mid, out);
}

static void gelu_loop(const float* x, float* y, int64_t n) {
  int64_t i = 0;
  for (; i + VW <= n; i += VW) {
    vf z = Elem<DType::f32>::load(x + i);
    vf out = z * vnorm_cdf(z);
    memcpy(y + i, &out, VB);
  }
  if (i < n) {  // tail through a padded vector, same arithmetic as the body
    float zin[VW] = {0}, zout[VW];
    for (int64_t j = i; j < n; ++j) zin[j - i] = x[j];
    vf z = Elem<DType::f32>::load(zin);
    vf out = z * vnorm_cdf(z);
    memcpy(zout, &out, VB);
    for (int64_t j = i; j < n; ++j) y[j] = zout[j - i];
  }
}

static inline vf vgelu_grad(vf z) {
  return vnorm_cdf(z) + z * splat(0.39894228040143268f) * vexp_neg_scaled_sq(z, 0.5f);
}

static void gelu_vjp_loop(const float* x, const float* dy, float* dx, int64_t n) {
  int64_t i = 0;
  for (; i + VW <= n; i += VW) {
    vf out = Elem<DType::f32>::load(dy + i) * vgelu_grad(Elem<DType::f32>::load(x + i));
    memcpy(dx + i, &out, VB);
  }
  if (i < n) {
    float zin[VW] = {0}, gin[VW] = {0}, zout[VW];
    for (int64_t j = i; j < n; ++j) {
      zin[j - i] = x[j];
      gin[j - i] = dy[j];
    }
    vf out = Elem<DType::f32>::load(gin) * vgelu_grad(Elem<DType::f32>::load(zin));
    memcpy(zout, &out, VB);
    for (int64_t j = i; j < n; ++j) dx[j] = zout[j - i];
  }
}

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

static void attention_forward(const AttnArgs& a, int64_t b, int64_t h) {
  const int64_t S = a.S, dh = a.dh, Sp = round_up(S, 2 * VW), dhp = round_up(dh, VW);
  const HeadView hv = head_view(a, b, h);
  float* buf = new float[dh * Sp + S * dhp + RB * Sp + RB * dhp];
  float *kt = buf, *v = kt + dh * Sp, *s = v + S * dhp, *o = s + RB * Sp;
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
  delete[] buf;
}

// dV = P^T dO, dP = dO V^T, dS = P (dP - rowsum(dO O)), dQ = scale dS K, dK = scale dS^T Q.
static void attention_backward(const AttnArgs& a, int64_t b, int64_t h) {
  const int64_t S = a.S, dh = a.dh, Sp = round_up(S, 2 * VW), dhp = round_up(dh, VW);
  const int64_t H = a.heads * dh;
  const HeadView hv = head_view(a, b, h);
  const int64_t n = 2 * dh * Sp + 5 * S * dhp + 2 * RB * Sp + RB * dhp + S;
  float* buf = new float[n];
  float *kt = buf, *vt = kt + dh * Sp, *q = vt + dh * Sp, *k = q + S * dhp, *dO = k + S * dhp;
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
  delete[] buf;
}

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
static void layer_norm_vjp_rows(const float* x, const float* w, const float* mean, const float* rstd,
                                const float* dy, int64_t n, int64_t r0, int64_t r1, float* dx, float* dw,
                                float* db) {
  float* gw = new float[n];
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
  delete[] gw;
}

// ---------------------------------------------------------------------------------------
// Dtype dispatch.

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

static void forward(const ForwardArgs& a, int64_t t0, int64_t t1) {
  UFB_DISPATCH2(a, forward_range, t0, t1)
}
static void backward_tokens(const BackwardArgs& a, int64_t t0, int64_t t1) {
  UFB_DISPATCH2(a, backward_tokens_range, t0, t1)
}
static void backward_rows(const BackwardArgs& a, int64_t r, int64_t h0, int64_t h1) {
  UFB_DISPATCH2(a, backward_rows_range, r, h0, h1)
}
#undef UFB_DISPATCH2

#define UFB_STR2(s) #s
#define UFB_STR(s) UFB_STR2(s)
extern const KernelTable kTable = {
    UFB_STR(UFB_ISA), forward, backward_tokens, backward_rows, gelu_loop, gelu_vjp_loop,
    layer_norm_rows, layer_norm_vjp_rows, attention_forward, attention_backward,
};
#undef UFB_STR
#undef UFB_STR2

}  // namespace UFB_ISA
}  // namespace ufb
