// How the CPU primitives get dense inputs: when the graph is built, each input goes through
// MLX's own contiguous copy (mx::contiguous: no copy when the array already is laid out so,
// one copy for a slice, transpose or broadcast), and eval_cpu reads the data pointer.
// (MLX's CPU copy routine itself, copy_cpu, is in its headers but not exported from
// libmlx, so it cannot be called inside eval_cpu; the op can, before.)
#pragma once

#include <stdexcept>
#include <string>

#include "mlx/ops.h"

namespace ufb {

namespace mx = mlx::core;

// a in row-major order.
inline mx::array row_major(const mx::array& a, mx::Stream s) { return mx::contiguous(a, false, s); }

// a (m, n) in column-major order, i.e. a^T (n, m) row-major: free for linear_out.weight as
// load() lays it out (a transposed view of a row-major buffer).
inline mx::array column_major(const mx::array& a, mx::Stream s) {
  return mx::transpose(mx::contiguous(mx::transpose(a, s), false, s), s);
}

// The data of an input made row-major (or column-major) above; anything else is a bug in
// how the primitive was built, not a user error.
template <class T>
const T* row_major_data(const mx::array& a, const char* what) {
  if (!a.flags().row_contiguous) throw std::logic_error(std::string("[ufb] input not row-major: ") + what);
  return a.data<T>();
}
template <class T>
const T* column_major_data(const mx::array& a, const char* what) {
  if (!a.flags().col_contiguous) throw std::logic_error(std::string("[ufb] input not column-major: ") + what);
  return a.data<T>();
}

}  // namespace ufb
