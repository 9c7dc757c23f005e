// Run-time choice among the compiled instruction-set builds of the CPU loops (loops.h).
#include "loops.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

namespace ufb {

namespace {

bool supported(const LoopTable& t) {
#if defined(__x86_64__) || defined(_M_X64)
  if (&t == &avx512::kTable) {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("f16c");
  }
  if (&t == &avx2::kTable) {
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("f16c");
  }
#endif
  return &t == &generic::kTable;
}

// Best first.
const LoopTable* const kAll[] = {
#if defined(__x86_64__) || defined(_M_X64)
    &avx512::kTable,
    &avx2::kTable,
#endif
    &generic::kTable,
};
constexpr int kCount = sizeof(kAll) / sizeof(kAll[0]);

const LoopTable& choose() {
  const char* forced = std::getenv("UFB_CPU_ISA");
  for (const LoopTable* t : kAll) {
    if (!supported(*t)) continue;
    if (forced == nullptr || forced[0] == '\0' || std::strcmp(forced, t->isa) == 0) return *t;
  }
  return generic::kTable;  // an unknown or unsupported UFB_CPU_ISA falls back to portable code
}

}  // namespace

namespace {
std::atomic<const LoopTable*> g_table{nullptr};
}

const LoopTable& table() {
  const LoopTable* t = g_table.load(std::memory_order_acquire);
  if (t == nullptr) {
    t = &choose();
    g_table.store(t, std::memory_order_release);
  }
  return *t;
}

bool use_table(const char* isa) {
  for (const LoopTable* t : kAll) {
    if (supported(*t) && std::strcmp(isa, t->isa) == 0) {
      g_table.store(t, std::memory_order_release);
      return true;
    }
  }
  return false;
}

int n_tables() {
  int n = 0;
  for (const LoopTable* t : kAll) n += supported(*t);
  return n;
}

const LoopTable& table_at(int i) {
  for (const LoopTable* t : kAll) {
    if (supported(*t) && i-- == 0) return *t;
  }
  return generic::kTable;
}

}  // namespace ufb
