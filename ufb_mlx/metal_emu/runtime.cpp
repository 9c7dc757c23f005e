// The CPU runtime behind metal_prelude.hpp: runs a launch grid of an emulated kernel.
//
// The lanes of one threadgroup are cooperative fibers (ucontext) on one OS thread. A lane
// runs until it reaches a simdgroup op or a threadgroup barrier and yields; once every
// live lane of its simdgroup (or threadgroup) has arrived, the scheduler computes the op
// and lets them continue. Simdgroups are 32 consecutive threads of the x-fastest thread
// index. Threadgroups are spread over a few OS threads. Fibers rather than one OS thread
// per lane: a 32-lane exchange costs microseconds instead of dozens of context switches
// on a 2-core machine, and the interleaving is deterministic (with a selectable lane order).
// Compiled once into its own library and loaded with RTLD_GLOBAL before any kernel.

// macOS declares the ucontext routines only under _XOPEN_SOURCE (<ucontext.h> stops with
// #error otherwise), and that macro also gives ucontext_t its full size there (the
// machine context is stored inside it); _DARWIN_C_SOURCE keeps the other system headers
// complete. glibc needs neither (g++ and clang define _GNU_SOURCE for C++).
#if defined(__APPLE__)
#ifndef _XOPEN_SOURCE
#define _XOPEN_SOURCE 700
#endif
#ifndef _DARWIN_C_SOURCE
#define _DARWIN_C_SOURCE
#endif
#endif
#include <ucontext.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#endif

#include "metal_prelude.hpp"
#undef device
#undef constant
#undef thread
#undef threadgroup

namespace ufb_emu {
namespace {

constexpr uint kSimdWidth = 32;

enum class State { Runnable, AtSimd, AtBarrier, Done };

const char* op_name(int op) {
  static const char* names[] = {"simd_sum", "simd_max", "simd_min", "simd_broadcast",
                                "simd_shuffle", "simd_shuffle_down", "simd_shuffle_up",
                                "simd_shuffle_xor", "simdgroup_barrier"};
  return names[op];
}

typedef void (*Invoke)(const Attrs*, void**);

struct Lane {
  ucontext_t ctx;
  State state;
  int op, kind, site;
  uint32_t in, out, arg;
  Attrs attrs;
};

struct Worker {
  ucontext_t sched;
  Lane* current = nullptr;
  Invoke invoke = nullptr;
  void** bufs = nullptr;
  std::vector<Lane> lanes;
  std::vector<char*> stacks;
  size_t stack_size = 0;
  ~Worker() {
    for (char* s : stacks) std::free(s);
  }
};

thread_local Worker* tl_worker = nullptr;

// Flush-to-zero, as Apple GPUs treat float32: subnormal results become 0 and subnormal
// operands count as 0. A property of the OS thread's floating-point control register
// (x86 MXCSR FTZ and DAZ bits; arm64 FPCR.FZ); the fibers' contexts, made on that thread
// after it is set, carry it. set_ftz returns the previous register value for restore_fp.
struct FpState {
  uint64_t saved;
};
FpState set_ftz(bool on) {
#if defined(__x86_64__) || defined(__i386__)
  const unsigned csr = _mm_getcsr();
  if (on) _mm_setcsr(csr | 0x8040u);  // FTZ (bit 15) | DAZ (bit 6)
  return FpState{csr};
#elif defined(__aarch64__)
  uint64_t fpcr;
  __asm__ __volatile__("mrs %0, fpcr" : "=r"(fpcr));
  if (on) {
    const uint64_t flushed = fpcr | (uint64_t(1) << 24);  // FZ
    __asm__ __volatile__("msr fpcr, %0" : : "r"(flushed));
  }
  return FpState{fpcr};
#else
  if (on) fail("flush-to-zero is not modelled on this CPU");
  return FpState{0};
#endif
}
void restore_fp(FpState s) {
#if defined(__x86_64__) || defined(__i386__)
  _mm_setcsr(unsigned(s.saved));
#elif defined(__aarch64__)
  __asm__ __volatile__("msr fpcr, %0" : : "r"(s.saved));
#else
  (void)s;
#endif
}

[[noreturn]] void fail(const std::string& msg) { throw std::runtime_error(msg); }

void lane_main() {
  Worker* w = tl_worker;
  Lane& L = *w->current;
  w->invoke(&L.attrs, w->bufs);
  L.state = State::Done;
  // returning resumes uc_link, the scheduler
}

template <class T>
T as(uint32_t b) {
  T v;
  std::memcpy(&v, &b, 4);
  return v;
}
template <class T>
uint32_t bits(T v) {
  uint32_t b;
  std::memcpy(&b, &v, 4);
  return b;
}

template <class T>
void reduce(Lane* g, uint n, int op) {
  // Tree order (stride 1, 2, 4, ...) over lanes 0..n-1. The hardware order is not
  // specified, so float sums can differ from a GPU in the last bits.
  T v[kSimdWidth];
  for (uint i = 0; i < n; ++i) v[i] = as<T>(g[i].in);
  for (uint stride = 1; stride < n; stride *= 2) {
    for (uint i = 0; i + stride < n; i += 2 * stride) {
      if (op == OP_SUM) v[i] = v[i] + v[i + stride];
      else if (op == OP_MAX) v[i] = std::max(v[i], v[i + stride]);
      else v[i] = std::min(v[i], v[i + stride]);
    }
  }
  for (uint i = 0; i < n; ++i) g[i].out = bits<T>(v[0]);
}

void resolve_simd(Lane* g, uint n, uint sg) {
  const Lane& a = g[0];
  for (uint i = 1; i < n; ++i) {
    if (g[i].op != a.op || g[i].site != a.site || g[i].kind != a.kind) {
      fail("simdgroup " + std::to_string(sg) + ": divergent simdgroup ops (" + op_name(a.op) +
           " at line " + std::to_string(a.site) + ", " + op_name(g[i].op) + " at line " +
           std::to_string(g[i].site) + ")");
    }
  }
  switch (a.op) {
    case OP_SUM:
    case OP_MAX:
    case OP_MIN:
      if (a.kind == K_FLOAT) reduce<float>(g, n, a.op);
      else if (a.kind == K_INT) reduce<int>(g, n, a.op);
      else reduce<uint>(g, n, a.op);
      return;
    case OP_SIMD_BARRIER:
      return;
    default:
      break;
  }
  for (uint i = 0; i < n; ++i) {
    uint src = 0;
    const uint arg = g[i].arg;
    switch (a.op) {
      case OP_BROADCAST:
        if (arg != a.arg) fail("simd_broadcast: lane index not uniform across the simdgroup");
        src = arg;
        break;
      case OP_SHUFFLE: src = arg; break;
      case OP_SHUFFLE_DOWN: src = i + arg < n ? i + arg : i; break;
      case OP_SHUFFLE_UP: src = i >= arg ? i - arg : i; break;
      case OP_SHUFFLE_XOR: src = i ^ arg; break;
    }
    if (src >= n) {
      fail(std::string(op_name(a.op)) + " at line " + std::to_string(a.site) +
           ": source lane " + std::to_string(src) + " is not in the simdgroup (" +
           std::to_string(n) + " lanes)");
    }
    g[i].out = g[src].in;
  }
}

void init_lanes(Worker& w, uint3 tg_pos, uint3 tg_dims, const uint* grid, uint3 act) {
  const uint3 grid3{grid[0], grid[1], grid[2]};
  const uint3 ntg{(grid[0] + tg_dims.x - 1) / tg_dims.x, (grid[1] + tg_dims.y - 1) / tg_dims.y,
                  (grid[2] + tg_dims.z - 1) / tg_dims.z};
  const uint n = act.x * act.y * act.z;
  const uint dispatch_n = tg_dims.x * tg_dims.y * tg_dims.z;
  for (uint i = 0; i < n; ++i) {
    Lane& L = w.lanes[i];
    Attrs& A = L.attrs;
    const uint tx = i % act.x, ty = (i / act.x) % act.y, tz = i / (act.x * act.y);
    L.state = State::Runnable;
    A.thread_position_in_threadgroup = uint3{tx, ty, tz};
    A.threadgroup_position_in_grid = tg_pos;
    A.thread_position_in_grid = uint3{tg_pos.x * tg_dims.x + tx, tg_pos.y * tg_dims.y + ty,
                                      tg_pos.z * tg_dims.z + tz};
    A.threads_per_threadgroup = act;
    A.dispatch_threads_per_threadgroup = tg_dims;
    A.threads_per_grid = grid3;
    A.grid_size = grid3;
    A.grid_origin = uint3{0, 0, 0};
    A.threadgroups_per_grid = ntg;
    A.thread_index_in_threadgroup = i;
    A.thread_index_in_simdgroup = i % kSimdWidth;
    A.simdgroup_index_in_threadgroup = i / kSimdWidth;
    A.simdgroups_per_threadgroup = (n + kSimdWidth - 1) / kSimdWidth;
    A.dispatch_simdgroups_per_threadgroup = (dispatch_n + kSimdWidth - 1) / kSimdWidth;
    A.threads_per_simdgroup = kSimdWidth;
    A.thread_execution_width = kSimdWidth;
    getcontext(&L.ctx);
    L.ctx.uc_stack.ss_sp = w.stacks[i];
    L.ctx.uc_stack.ss_size = w.stack_size;
    L.ctx.uc_link = &w.sched;
    makecontext(&L.ctx, (void (*)())lane_main, 0);
  }
}

void run_group(Worker& w, uint3 tg_pos, uint3 tg_dims, const uint* grid, bool reverse) {
  // Threadgroups at the grid's edge are smaller (non-uniform), as with dispatchThreads.
  const uint3 act{std::min(tg_dims.x, grid[0] - tg_pos.x * tg_dims.x),
                  std::min(tg_dims.y, grid[1] - tg_pos.y * tg_dims.y),
                  std::min(tg_dims.z, grid[2] - tg_pos.z * tg_dims.z)};
  const uint n = act.x * act.y * act.z;
  const uint n_sg = (n + kSimdWidth - 1) / kSimdWidth;
  init_lanes(w, tg_pos, tg_dims, grid, act);
  for (;;) {
    for (uint k = 0; k < n; ++k) {
      Lane& L = w.lanes[reverse ? n - 1 - k : k];
      if (L.state == State::Runnable) {
        w.current = &L;
        swapcontext(&w.sched, &L.ctx);
      }
    }
    // Every lane now waits at a sync point or has returned.
    uint done = 0, at_barrier = 0;
    for (uint i = 0; i < n; ++i) {
      done += w.lanes[i].state == State::Done;
      at_barrier += w.lanes[i].state == State::AtBarrier;
    }
    if (done == n) return;
    bool released = false;
    for (uint s = 0; s < n_sg; ++s) {
      Lane* g = &w.lanes[s * kSimdWidth];
      const uint m = std::min(kSimdWidth, n - s * kSimdWidth);
      uint c_simd = 0, c_bar = 0, c_done = 0;
      const Lane* first = nullptr;
      for (uint i = 0; i < m; ++i) {
        c_simd += g[i].state == State::AtSimd;
        c_bar += g[i].state == State::AtBarrier;
        c_done += g[i].state == State::Done;
        if (!first && g[i].state == State::AtSimd) first = &g[i];
      }
      if (c_simd == 0) continue;
      if (c_bar > 0) {
        fail("simdgroup " + std::to_string(s) + ": some lanes wait in " + op_name(first->op) +
             " at line " + std::to_string(first->site) +
             ", others at a threadgroup_barrier (divergent control flow)");
      }
      if (c_done > 0) {
        fail(std::string(op_name(first->op)) + " at line " + std::to_string(first->site) +
             " reached with inactive lanes (" + std::to_string(c_done) +
             " lanes of the simdgroup had returned); metal_emu requires every lane of a "
             "simdgroup to take part in simdgroup ops");
      }
      resolve_simd(g, m, s);
      for (uint i = 0; i < m; ++i) g[i].state = State::Runnable;
      released = true;
    }
    if (released) continue;
    if (at_barrier == n - done) {
      if (done > 0) {
        fail("threadgroup_barrier not reached by every thread of the threadgroup (" +
             std::to_string(done) + " had returned)");
      }
      for (uint i = 1; i < n; ++i) {
        if (w.lanes[i].site != w.lanes[0].site) {
          fail("threads wait at different threadgroup_barrier calls (lines " +
               std::to_string(w.lanes[0].site) + " and " + std::to_string(w.lanes[i].site) + ")");
        }
      }
      for (uint i = 0; i < n; ++i) w.lanes[i].state = State::Runnable;
      continue;
    }
    fail("deadlock: no simdgroup op or barrier can complete");
  }
}

}  // namespace
}  // namespace ufb_emu

using namespace ufb_emu;

extern "C" uint32_t ufb_emu_sync_simd(int site, int op, int kind, uint32_t value, uint32_t arg) {
  Lane& L = *tl_worker->current;
  L.state = State::AtSimd;
  L.op = op;
  L.kind = kind;
  L.site = site;
  L.arg = arg;
  L.in = value;
  swapcontext(&L.ctx, &tl_worker->sched);
  return L.out;
}

extern "C" void ufb_emu_sync_barrier(int site) {
  Lane& L = *tl_worker->current;
  L.state = State::AtBarrier;
  L.site = site;
  swapcontext(&L.ctx, &tl_worker->sched);
}

// cfg: grid[3], threadgroup[3] (already clipped to the grid, as MLX does),
//      lane order (0 forward, 1 reverse), OS worker threads, fiber stack bytes,
//      flush-to-zero (0 IEEE subnormals, 1 flushed as on Apple GPUs).
extern "C" int ufb_emu_launch(Invoke invoke, void** bufs, const int64_t* cfg, char* err, int errlen) {
  const uint grid[3] = {uint(cfg[0]), uint(cfg[1]), uint(cfg[2])};
  const uint3 tg{uint(cfg[3]), uint(cfg[4]), uint(cfg[5])};
  const bool reverse = cfg[6] != 0;
  const uint64_t n_workers_req = uint64_t(std::max<int64_t>(1, cfg[7]));
  const size_t stack_size = size_t(cfg[8]);
  const bool ftz = cfg[9] != 0;
  if (grid[0] == 0 || grid[1] == 0 || grid[2] == 0) return 0;
  const uint ntx = (grid[0] + tg.x - 1) / tg.x, nty = (grid[1] + tg.y - 1) / tg.y,
             ntz = (grid[2] + tg.z - 1) / tg.z;
  const uint64_t n_groups = uint64_t(ntx) * nty * ntz;
  const uint64_t n_workers = std::min(n_workers_req, n_groups);
  std::mutex mu;
  std::string first_error;
  auto body = [&](uint64_t wi) {
    Worker w;
    w.invoke = invoke;
    w.bufs = bufs;
    w.stack_size = stack_size;
    const uint per_group = tg.x * tg.y * tg.z;
    w.lanes.resize(per_group);
    for (uint i = 0; i < per_group; ++i) {
      char* s = static_cast<char*>(std::malloc(stack_size));
      if (!s) {
        std::lock_guard<std::mutex> lock(mu);
        if (first_error.empty()) first_error = "out of memory for fiber stacks";
        return;
      }
      w.stacks.push_back(s);
    }
    tl_worker = &w;
    FpState fp{0};
    try {
      // this thread (the caller's, for worker 0) gets its own mode back below
      fp = set_ftz(ftz);
      for (uint64_t gi = wi; gi < n_groups; gi += n_workers) {
        {
          std::lock_guard<std::mutex> lock(mu);
          if (!first_error.empty()) break;
        }
        const uint3 pos{uint(gi % ntx), uint((gi / ntx) % nty), uint(gi / (uint64_t(ntx) * nty))};
        run_group(w, pos, tg, grid, reverse);
      }
    } catch (const std::exception& e) {
      std::lock_guard<std::mutex> lock(mu);
      if (first_error.empty()) first_error = e.what();
    }
    restore_fp(fp);
    tl_worker = nullptr;
  };
  std::vector<std::thread> threads;
  for (uint64_t wi = 1; wi < n_workers; ++wi) threads.emplace_back(body, wi);
  body(0);
  for (auto& t : threads) t.join();
  if (!first_error.empty()) {
    std::snprintf(err, size_t(errlen), "%s", first_error.c_str());
    return 1;
  }
  return 0;
}
