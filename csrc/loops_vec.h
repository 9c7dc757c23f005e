// Vector primitives of the CPU loops (the role of ggml-cpu's vec.h and simd-mappings.h):
// the vector types of one instruction set, float16/bfloat16 conversion, the row primitives
// (dot, axpy, widen, narrow), and the transcendental functions (exp, erf, GELU) with the
// elementwise GELU loops. Written once with GCC/Clang vector extensions: a translation unit
// defines UFB_ISA (a namespace name) and UFB_VBYTES (vector width in bytes: 64 for AVX-512,
// 32 for AVX2, 16 for NEON/SSE2), then includes loops_table.h with matching target flags.
// Everything here lives in ufb::UFB_ISA, so the differently-compiled copies never meet at
// link time; no standard library templates are instantiated here for the same reason (one
// definition rule).
//
// Accuracy: float32 accumulation throughout. GELU of the FFF's visited logits uses libm's
// erfcf (exact-erf GELU, as the original's torch.nn.GELU()); the elementwise gelu/softmax
// loops use the vector erf/exp below (max error a few float32 ulp, see the test suite).
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__F16C__)
#include <immintrin.h>
#endif

#include "loops.h"

#ifndef UFB_ISA
#error "define UFB_ISA and UFB_VBYTES before including the CPU loops (see loops_generic.cpp)"
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
  if (exp == 0x1fu) {  // inf, or nan quietened (as F16C does)
    bits = sign | 0x7f800000u | (man << 13) | (man ? 0x400000u : 0u);
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
  if (ax >= 0x7f800000u) {  // inf, or nan quietened with its payload's top bits (as F16C does)
    return uint16_t(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u | ((ax >> 13) & 0x3ffu) : 0u));
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
  static inline void store(float* p, vf v) { memcpy(p, &v, VB); }
};
template <> struct Elem<DType::f16> {
  typedef uint16_t type;
  static inline float get(const uint16_t* p, int64_t i) { return f16_to_f32(p[i]); }
  static inline void put(uint16_t* p, int64_t i, float v) { p[i] = f32_to_f16(v); }
  // F16C converts a whole vector in one instruction; GCC lowers __builtin_convertvector on
  // _Float16 vectors to one conversion per lane there, hence the intrinsics.
  static inline vf load(const uint16_t* p) {
    vf v;
#if defined(__F16C__) && UFB_VBYTES == 64
    // The maskz forms (all lanes): the plain ones make GCC 12 warn about their undefined
    // pass-through operand.
    const __m512 w = _mm512_maskz_cvtph_ps(0xffff, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    memcpy(&v, &w, VB);
#elif defined(__F16C__) && UFB_VBYTES == 32
    const __m256 w = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    memcpy(&v, &w, VB);
#elif defined(__aarch64__)
    typedef _Float16 vhf __attribute__((vector_size(VB / 2)));
    vhf h;
    memcpy(&h, p, VB / 2);
    v = __builtin_convertvector(h, vf);
#else
    for (int i = 0; i < VW; ++i) v[i] = f16_to_f32(p[i]);
#endif
    return v;
  }
  // Round to nearest even, the same bits as put() lane by lane.
  static inline void store(uint16_t* p, vf v) {
#if defined(__F16C__) && UFB_VBYTES == 64
    __m512 w;
    memcpy(&w, &v, VB);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                        _mm512_maskz_cvtps_ph(0xffff, w, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#elif defined(__F16C__) && UFB_VBYTES == 32
    __m256 w;
    memcpy(&w, &v, VB);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                     _mm256_cvtps_ph(w, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#else
    for (int i = 0; i < VW; ++i) p[i] = f32_to_f16(v[i]);
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
  // f32_to_bf16 lane-wise in integer vector arithmetic (any instruction set): round to
  // nearest even, nan quietened.
  static inline void store(uint16_t* p, vf v) {
    vu x;
    memcpy(&x, &v, VB);
    const vu rounded = (x + 0x7fffu + ((x >> 16) & 1u)) >> 16;
    const vu nan = (vu)((x & 0x7fffffffu) > 0x7f800000u);
    const vu bits = (nan & ((x >> 16) | 0x40u)) | (~nan & rounded);
    const vh16 h = __builtin_convertvector(bits, vh16);
    memcpy(p, &h, VB / 2);
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
  int64_t i = 0;
  for (; i + VW <= n; i += VW) Elem<T>::store(dst + i, Elem<DType::f32>::load(src + i));
  for (; i < n; ++i) Elem<T>::put(dst, i, src[i]);
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
// Vector exp and erf, and the elementwise GELU loops (GELU of dense layers; exp for softmax).

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

}  // namespace UFB_ISA
}  // namespace ufb
