// Reading MLX inputs inside a CPU task as dense row-major buffers.
#pragma once

#include <cstdint>
#include <vector>

#include "mlx/array.h"

namespace ufb {

// An input's memory as a strided view (element strides, any rank), captured when the task
// is encoded; its values exist when the task runs.
struct View {
  const char* data;
  std::vector<int64_t> shape, strides;
  size_t item;
};

View view_of(const mlx::core::array& a);
// The 2-D view with its axes swapped (w_out (H, R) read as w_out^T (R, H)).
View transposed(const View& v);
// The view's own memory when it is row-major (the normal case); else its elements copied
// into `scratch` in row-major order (a broadcast scalar, a transposed or sliced view).
const void* row_major(const View& v, std::vector<char>& scratch);
inline const float* row_major_f32(const mlx::core::array& a, std::vector<char>& scratch) {
  return static_cast<const float*>(row_major(view_of(a), scratch));
}

}  // namespace ufb
