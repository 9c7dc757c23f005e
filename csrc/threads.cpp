#include "threads.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace ufb {

namespace {

class Pool {
 public:
  explicit Pool(int threads) {
    for (int i = 1; i < threads; ++i) workers_.emplace_back([this] { loop(); });
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    wake_.notify_all();
    for (auto& w : workers_) w.join();
  }
  int size() const { return int(workers_.size()) + 1; }

  void run(int64_t n, int helpers, const std::function<void(int64_t, int)>& fn) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      fn_ = &fn;
      n_ = n;
      next_.store(0);
      wanted_ = helpers;
      next_slot_ = 1;
      busy_ = 0;
      error_ = nullptr;
      ++generation_;
    }
    wake_.notify_all();
    work(0);
    std::unique_lock<std::mutex> lock(mu_);
    // Every index is claimed; helpers that have not woken yet need not start, and the
    // ones inside `fn` must finish before we return.
    wanted_ = 0;
    done_.wait(lock, [this] { return busy_ == 0; });
    fn_ = nullptr;
    if (error_) std::rethrow_exception(error_);  // e.g. bad_alloc in a helper: the caller's error
  }

 private:
  void work(int slot) {
    try {
      for (int64_t i; (i = next_.fetch_add(1)) < n_;) (*fn_)(i, slot);
    } catch (...) {
      next_.store(n_);  // stop handing out work
      std::lock_guard<std::mutex> lock(mu_);
      if (!error_) error_ = std::current_exception();
    }
  }
  void loop() {
    uint64_t seen = 0;
    for (;;) {
      std::unique_lock<std::mutex> lock(mu_);
      wake_.wait(lock, [&] { return stop_ || (generation_ != seen && wanted_ > 0); });
      if (stop_) return;
      seen = generation_;
      --wanted_;
      ++busy_;
      const int slot = next_slot_++;  // 1..helpers: at most `wanted_` helpers get here
      lock.unlock();
      work(slot);
      lock.lock();
      --busy_;
      if (busy_ == 0) done_.notify_all();
    }
  }

  std::vector<std::thread> workers_;
  std::mutex mu_;
  std::condition_variable wake_, done_;
  const std::function<void(int64_t, int)>* fn_ = nullptr;
  std::atomic<int64_t> next_{0};
  int64_t n_ = 0;
  int wanted_ = 0, busy_ = 0, next_slot_ = 1;
  std::exception_ptr error_;
  uint64_t generation_ = 0;
  bool stop_ = false;
};

int default_threads() {
  if (const char* s = std::getenv("UFB_NUM_THREADS")) {
    int n = std::atoi(s);
    if (n >= 1) return std::min(n, 256);
  }
  return std::max(1u, std::thread::hardware_concurrency());
}

std::mutex g_mu;
std::unique_ptr<Pool> g_pool;
int g_threads = 0;

Pool& pool() {
  if (!g_pool) {
    if (g_threads == 0) g_threads = default_threads();
    g_pool = std::make_unique<Pool>(g_threads);
  }
  return *g_pool;
}

}  // namespace

int num_threads() {
  std::lock_guard<std::mutex> lock(g_mu);
  if (g_threads == 0) g_threads = default_threads();
  return g_threads;
}

void set_num_threads(int n) {
  std::lock_guard<std::mutex> lock(g_mu);
  n = std::max(1, std::min(n, 256));
  if (n != g_threads) {
    g_pool.reset();
    g_threads = n;
  }
}

void parallel_for(int64_t n, int max_threads, const std::function<void(int64_t, int)>& fn) {
  if (n <= 0) return;
  std::lock_guard<std::mutex> lock(g_mu);  // one parallel region at a time
  Pool& p = pool();
  const int threads = int(std::min<int64_t>({int64_t(p.size()), int64_t(std::max(1, max_threads)), n}));
  if (threads <= 1) {
    for (int64_t i = 0; i < n; ++i) fn(i, 0);
    return;
  }
  p.run(n, threads - 1, fn);
}

}  // namespace ufb
