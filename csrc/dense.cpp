#include "dense.h"

#include <algorithm>

namespace ufb {

const float* row_major_f32(const mlx::core::array& a, std::vector<float>& scratch) {
  if (a.flags().row_contiguous) return a.data<float>();
  const int64_t n = int64_t(a.size());
  scratch.resize(size_t(n));
  const float* src = a.data<float>();
  if (a.data_size() == 1) {
    std::fill(scratch.begin(), scratch.end(), *src);
    return scratch.data();
  }
  const auto& shape = a.shape();
  const auto& strides = a.strides();
  for (int64_t e = 0; e < n; ++e) {
    int64_t rem = e, off = 0;
    for (int ax = int(shape.size()) - 1; ax >= 0; --ax) {
      off += (rem % shape[ax]) * strides[ax];
      rem /= shape[ax];
    }
    scratch[size_t(e)] = src[off];
  }
  return scratch.data();
}

}  // namespace ufb
