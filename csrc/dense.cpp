#include "dense.h"

#include <cstring>
#include <utility>

#include "threads.h"

namespace ufb {

View view_of(const mlx::core::array& a) {
  View v{static_cast<const char*>(a.data<void>()), {}, {}, a.itemsize()};
  for (int i = 0; i < int(a.ndim()); ++i) {
    v.shape.push_back(a.shape(i));
    v.strides.push_back(a.strides()[i]);
  }
  return v;
}

View transposed(const View& v) {
  View t = v;
  std::swap(t.shape[0], t.shape[1]);
  std::swap(t.strides[0], t.strides[1]);
  return t;
}

const void* row_major(const View& v, std::vector<char>& scratch) {
  const int nd = int(v.shape.size());
  int64_t n = 1, expected = 1;
  bool dense = true;
  for (int ax = nd - 1; ax >= 0; --ax) {
    if (v.shape[ax] != 1 && v.strides[ax] != expected) dense = false;
    expected *= v.shape[ax];
    n *= v.shape[ax];
  }
  if (dense) return v.data;
  scratch.resize(size_t(n) * v.item);
  char* out = scratch.data();
  // One task per row of the last axis: the row's offset from the leading indices.
  const int64_t cols = nd ? v.shape[nd - 1] : 1, col_stride = nd ? v.strides[nd - 1] : 0;
  parallel_for(cols ? n / cols : 0, num_threads(), [&](int64_t r) {
    int64_t rem = r, off = 0;
    for (int ax = nd - 2; ax >= 0; --ax) {
      off += (rem % v.shape[ax]) * v.strides[ax];
      rem /= v.shape[ax];
    }
    for (int64_t c = 0; c < cols; ++c) {
      std::memcpy(out + (r * cols + c) * v.item, v.data + (off + c * col_stride) * v.item, v.item);
    }
  });
  return out;
}

}  // namespace ufb
