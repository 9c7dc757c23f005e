// C++20 stand-in for the Metal environment that MLX's generated kernel text expects
// (what MLX's Metal utilities and <metal_stdlib> provide on a Mac). Included first in
// every emulated kernel; the generated text follows verbatim, then a small entry point
// (harness.py). Deliberately light (compiler builtins, no std headers) so each kernel
// compiles in a fraction of a second; the scheduler lives in runtime.cpp.
// Only what source.py's allow-list admits is provided.
#pragma once

#include <stdint.h>
#include <sys/types.h>

// ---- scalar and vector types -------------------------------------------------------

typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned long ulong;
typedef _Float16 half;  // IEEE binary16; g++ rounds each half operation like hardware
typedef _Float16 float16_t;

struct uint3 {
  uint x, y, z;
};
struct uint2 {
  uint x, y;
};

// bfloat16 storage with round-to-nearest-even from float, as Metal's `bfloat`.
// Arithmetic on it goes through float (the kernels convert to float on load).
struct bfloat16_t {
  uint16_t bits;
  bfloat16_t() = default;
  explicit bfloat16_t(float f) {
    uint32_t u;
    __builtin_memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
      bits = uint16_t((u >> 16) | 0x40u);  // quiet NaN, sign kept
    } else {
      u += 0x7fffu + ((u >> 16) & 1u);
      bits = uint16_t(u >> 16);
    }
  }
  operator float() const {
    uint32_t u = uint32_t(bits) << 16;
    float f;
    __builtin_memcpy(&f, &u, 4);
    return f;
  }
};
typedef bfloat16_t bfloat;

// ---- interface to runtime.cpp ------------------------------------------------------------

namespace ufb_emu {

// The [[attribute]] values MLX may pass; the entry point forwards those a kernel uses.
struct Attrs {
  uint3 thread_position_in_grid, thread_position_in_threadgroup, threadgroup_position_in_grid;
  uint3 threads_per_threadgroup, dispatch_threads_per_threadgroup, threads_per_grid;
  uint3 threadgroups_per_grid, grid_origin, grid_size;
  uint thread_index_in_threadgroup, thread_index_in_simdgroup, simdgroup_index_in_threadgroup;
  uint simdgroups_per_threadgroup, dispatch_simdgroups_per_threadgroup;
  uint threads_per_simdgroup, thread_execution_width;
};

enum SimdOp { OP_SUM, OP_MAX, OP_MIN, OP_BROADCAST, OP_SHUFFLE, OP_SHUFFLE_DOWN, OP_SHUFFLE_UP,
              OP_SHUFFLE_XOR, OP_SIMD_BARRIER };
enum ValueKind { K_FLOAT, K_INT, K_UINT };

template <class T>
constexpr int kind_of() {
  if constexpr (__is_same(T, float)) return K_FLOAT;
  else if constexpr (__is_same(T, int)) return K_INT;
  else if constexpr (__is_same(T, uint)) return K_UINT;
  else return -1;
}

}  // namespace ufb_emu

// A lane blocks here until every lane of its simdgroup (or threadgroup) has arrived.
extern "C" uint32_t ufb_emu_sync_simd(int site, int op, int kind, uint32_t value, uint32_t arg);
extern "C" void ufb_emu_sync_barrier(int site);

namespace ufb_emu {
template <class T>
inline T simd(int site, int op, T v, uint32_t arg) {
  static_assert(kind_of<T>() >= 0, "metal_emu models simdgroup ops on float, int and uint only");
  uint32_t in, out;
  __builtin_memcpy(&in, &v, 4);
  out = ufb_emu_sync_simd(site, op, kind_of<T>(), in, arg);
  T r;
  __builtin_memcpy(&r, &out, 4);
  return r;
}
}  // namespace ufb_emu

// ---- the Metal standard library subset --------------------------------------------------

namespace metal {

inline float fabs(float x) { return __builtin_fabsf(x); }
inline float abs(float x) { return __builtin_fabsf(x); }
inline float fmin(float a, float b) { return __builtin_fminf(a, b); }
inline float fmax(float a, float b) { return __builtin_fmaxf(a, b); }
template <class T>
inline T min(T a, T b) { return b < a ? b : a; }
template <class T>
inline T max(T a, T b) { return a < b ? b : a; }
inline float trunc(float x) { return __builtin_truncf(x); }
inline float floor(float x) { return __builtin_floorf(x); }
inline float ceil(float x) { return __builtin_ceilf(x); }
inline float fma(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
inline float copysign(float a, float b) { return __builtin_copysignf(a, b); }
inline float sqrt(float x) { return __builtin_sqrtf(x); }
inline float rsqrt(float x) { return 1.0f / __builtin_sqrtf(x); }
inline float exp(float x) { return __builtin_expf(x); }
inline float log(float x) { return __builtin_logf(x); }
inline float tanh(float x) { return __builtin_tanhf(x); }
inline bool isnan(float x) { return __builtin_isnan(x); }
inline bool isinf(float x) { return __builtin_isinf(x); }
template <class T>
inline T select(T a, T b, bool c) { return c ? b : a; }

// glibc (correctly rounded or < 1 ulp) for both; Metal's fast variants may be less accurate.
namespace precise {
inline float exp(float x) { return __builtin_expf(x); }
inline float log(float x) { return __builtin_logf(x); }
inline float sqrt(float x) { return __builtin_sqrtf(x); }
inline float tanh(float x) { return __builtin_tanhf(x); }
}  // namespace precise

enum mem_flags : uint { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };
inline mem_flags operator|(mem_flags a, mem_flags b) { return mem_flags(uint(a) | uint(b)); }

// No fences needed: the fibers of one threadgroup share one OS thread.
inline void threadgroup_barrier_at_(int site, mem_flags) { ufb_emu_sync_barrier(site); }
inline void simdgroup_barrier_at_(int site, mem_flags) {
  ufb_emu::simd<uint>(site, ufb_emu::OP_SIMD_BARRIER, 0u, 0u);
}

template <class T>
inline T simd_sum_at_(int site, T v) { return ufb_emu::simd<T>(site, ufb_emu::OP_SUM, v, 0); }
template <class T>
inline T simd_max_at_(int site, T v) { return ufb_emu::simd<T>(site, ufb_emu::OP_MAX, v, 0); }
template <class T>
inline T simd_min_at_(int site, T v) { return ufb_emu::simd<T>(site, ufb_emu::OP_MIN, v, 0); }
template <class T>
inline T simd_broadcast_at_(int site, T v, uint lane) {
  return ufb_emu::simd<T>(site, ufb_emu::OP_BROADCAST, v, lane);
}
template <class T>
inline T simd_shuffle_at_(int site, T v, uint lane) {
  return ufb_emu::simd<T>(site, ufb_emu::OP_SHUFFLE, v, lane);
}
template <class T>
inline T simd_shuffle_down_at_(int site, T v, uint delta) {
  return ufb_emu::simd<T>(site, ufb_emu::OP_SHUFFLE_DOWN, v, delta);
}
template <class T>
inline T simd_shuffle_up_at_(int site, T v, uint delta) {
  return ufb_emu::simd<T>(site, ufb_emu::OP_SHUFFLE_UP, v, delta);
}
template <class T>
inline T simd_shuffle_xor_at_(int site, T v, uint mask) {
  return ufb_emu::simd<T>(site, ufb_emu::OP_SHUFFLE_XOR, v, mask);
}

}  // namespace metal

using namespace metal;

// Sync points carry their source line so that divergent calls can be reported.
#define simd_sum(...) simd_sum_at_(__LINE__, __VA_ARGS__)
#define simd_max(...) simd_max_at_(__LINE__, __VA_ARGS__)
#define simd_min(...) simd_min_at_(__LINE__, __VA_ARGS__)
#define simd_broadcast(...) simd_broadcast_at_(__LINE__, __VA_ARGS__)
#define simd_shuffle(...) simd_shuffle_at_(__LINE__, __VA_ARGS__)
#define simd_shuffle_down(...) simd_shuffle_down_at_(__LINE__, __VA_ARGS__)
#define simd_shuffle_up(...) simd_shuffle_up_at_(__LINE__, __VA_ARGS__)
#define simd_shuffle_xor(...) simd_shuffle_xor_at_(__LINE__, __VA_ARGS__)
#define threadgroup_barrier(...) threadgroup_barrier_at_(__LINE__, __VA_ARGS__)
#define simdgroup_barrier(...) simdgroup_barrier_at_(__LINE__, __VA_ARGS__)

// Address spaces. An OS thread runs one threadgroup at a time, so a `threadgroup`
// variable is a per-OS-thread static shared by that threadgroup's fibers.
#define device
#define constant
#define thread
#define threadgroup static thread_local
