// A small persistent thread pool for the CPU loops (loops.h). MLX runs a primitive's CPU
// work on its stream thread, one task at a time; the loops split tokens (forward) or
// (row, column-range) units (backward) across this pool, the calling thread included.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <functional>
#include <memory>
#include <new>

namespace ufb {

// Threads used by parallel_for: UFB_NUM_THREADS if set, else the hardware's count.
int num_threads();
// Change it (1..256). Only call while no loop runs (the binding synchronizes first).
void set_num_threads(int n);
// fn(i, slot) for every i in [0, n), spread over at most `max_threads` threads; returns
// when all calls are done. `slot` names the thread running the call, in
// [0, slots(n, max_threads)) (0: the caller), so that its scratch can be planned before
// the region (Scratch). Which thread runs which i is not fixed: callers must make each
// result independent of that (the loops do).
void parallel_for(int64_t n, int max_threads, const std::function<void(int64_t, int)>& fn);
inline int slots(int64_t n, int max_threads) {
  return int(n < 1 ? 1 : n < max_threads ? n : max_threads < 1 ? 1 : max_threads);
}

// Uninitialised float scratch for one parallel region: one part of `floats` per slot,
// each part starting on its own cache line (no false sharing between threads).
class Scratch {
 public:
  Scratch(int slots, int64_t floats) : stride_((floats + 15) / 16 * 16) {
    const size_t bytes = size_t(slots) * size_t(stride_) * sizeof(float);
    if (bytes > 0) {
      data_.reset(static_cast<float*>(std::aligned_alloc(64, bytes)));
      if (!data_) throw std::bad_alloc();
    }
  }
  float* operator[](int slot) const { return data_.get() + int64_t(slot) * stride_; }

 private:
  struct Free {
    void operator()(float* p) const { std::free(p); }
  };
  int64_t stride_;
  std::unique_ptr<float[], Free> data_;
};

}  // namespace ufb
