// A small persistent thread pool for the fused CPU kernels. MLX runs a primitive's CPU
// work on its stream thread, one task at a time; the FFF loops split tokens (forward) or
// (row, column-range) units (backward) across this pool, the calling thread included.
#pragma once

#include <cstdint>
#include <functional>

namespace ufb {

// Threads used by parallel_for: UFB_NUM_THREADS if set, else the hardware's count.
int num_threads();
// Change it (1..256). Only call while no kernel runs (the binding synchronizes first).
void set_num_threads(int n);
// fn(i) for every i in [0, n), spread over at most `max_threads` threads; returns when
// all calls are done. Which thread runs which i is not fixed: callers must make each
// result independent of that (the kernels do).
void parallel_for(int64_t n, int max_threads, const std::function<void(int64_t)>& fn);

}  // namespace ufb
