// Reading an MLX input inside a CPU task as a dense row-major float32 buffer.
#pragma once

#include <vector>

#include "mlx/array.h"

namespace ufb {

// The array's own memory when it is row-contiguous (the normal case); a broadcast scalar
// or any other strided view is expanded into `scratch`. float32 arrays only.
const float* row_major_f32(const mlx::core::array& a, std::vector<float>& scratch);

}  // namespace ufb
