#include "norm_cpu.h"

#include <algorithm>
#include <memory>
#include <stdexcept>

#include "loops.h"
#include "mlx/backend/cpu/encoder.h"
#include "row_major.h"
#include "threads.h"

namespace ufb {

namespace {
// Rows per task, and per partial sum of dw/db: fixed, so the backward's sums are the same
// for any number of threads.
constexpr int64_t ROWS_PER_TASK = 32;

int64_t rows_of(const mx::array& x) { return x.ndim() == 0 ? 1 : int64_t(x.size()) / x.shape(-1); }
}  // namespace

std::vector<mx::array> layer_norm(const mx::array& x, const mx::array& w, const mx::array& b, float eps,
                                  mx::StreamOrDevice s) {
  if (x.ndim() < 1 || w.ndim() != 1 || b.ndim() != 1 || w.shape(0) != x.shape(-1) || b.shape(0) != x.shape(-1)) {
    throw std::invalid_argument("[ufb.layer_norm] need x (..., n), weight (n,) and bias (n,)");
  }
  auto stream = mx::to_stream(s, mx::Device::cpu);
  const int rows = int(rows_of(x));
  return mx::array::make_arrays(
      {x.shape(), {rows}, {rows}}, {mx::float32, mx::float32, mx::float32}, std::make_shared<LayerNorm>(stream, eps),
      {row_major(mx::astype(x, mx::float32, stream), stream), row_major(mx::astype(w, mx::float32, stream), stream),
       row_major(mx::astype(b, mx::float32, stream), stream)});
}

void LayerNorm::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  for (auto& o : outputs) o.set_data(mx::allocator::malloc(o.nbytes()));
  auto& enc = mx::cpu::get_command_encoder(stream());
  for (auto& in : inputs) enc.set_input_array(in);
  for (auto& o : outputs) enc.set_output_array(o);
  enc.dispatch([x = row_major_data<float>(inputs[0], "x"), w = row_major_data<float>(inputs[1], "weight"),
                b = row_major_data<float>(inputs[2], "bias"), n = int64_t(inputs[0].shape(-1)),
                rows = rows_of(inputs[0]), y = outputs[0].data<float>(), mean = outputs[1].data<float>(),
                rstd = outputs[2].data<float>(), eps = eps_]() {
    const LoopTable& loops = table();
    parallel_for((rows + ROWS_PER_TASK - 1) / ROWS_PER_TASK, num_threads(), [&](int64_t t, int) {
      loops.layer_norm(x, w, b, eps, n, t * ROWS_PER_TASK, std::min(rows, (t + 1) * ROWS_PER_TASK), y, mean, rstd);
    });
  });
}

void LayerNorm::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("[ufb] layer_norm runs on the CPU only");
}

std::vector<mx::Shape> LayerNorm::output_shapes(const std::vector<mx::array>& inputs) {
  const int rows = int(rows_of(inputs[0]));
  return {inputs[0].shape(), {rows}, {rows}};
}

bool LayerNorm::is_equivalent(const mx::Primitive& other) const {
  return eps_ == static_cast<const LayerNorm&>(other).eps_;
}

std::vector<mx::array> LayerNorm::vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                                      const std::vector<int>& argnums, const std::vector<mx::array>& outputs) {
  const auto& x = primals[0];
  const int n = x.shape(-1);
  auto grads = mx::array::make_arrays({x.shape(), {n}, {n}}, {mx::float32, mx::float32, mx::float32},
                                      std::make_shared<LayerNormVjp>(stream()),
                                      {x, primals[1], outputs[1], outputs[2],
                                       row_major(mx::astype(cotangents[0], mx::float32, stream()), stream())});
  std::vector<mx::array> out;
  for (int i : argnums) out.push_back(grads[i]);
  return out;
}

void LayerNormVjp::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  for (auto& o : outputs) o.set_data(mx::allocator::malloc(o.nbytes()));
  auto& enc = mx::cpu::get_command_encoder(stream());
  for (auto& in : inputs) enc.set_input_array(in);
  for (auto& o : outputs) enc.set_output_array(o);
  enc.dispatch([x = row_major_data<float>(inputs[0], "x"), w = row_major_data<float>(inputs[1], "weight"),
                mean = row_major_data<float>(inputs[2], "mean"), rstd = row_major_data<float>(inputs[3], "rstd"),
                dy = row_major_data<float>(inputs[4], "dy"), n = int64_t(inputs[0].shape(-1)),
                rows = rows_of(inputs[0]), dx = outputs[0].data<float>(), dw = outputs[1].data<float>(),
                db = outputs[2].data<float>()]() {
    const int64_t tasks = (rows + ROWS_PER_TASK - 1) / ROWS_PER_TASK;
    std::vector<float> part(size_t(2 * tasks * n), 0.0f);  // per task: dw then db partial sums
    const LoopTable& loops = table();
    const int threads = num_threads();
    const Scratch scratch(slots(tasks, threads), loops.layer_norm_vjp_scratch(n));
    parallel_for(tasks, threads, [&](int64_t t, int slot) {
      loops.layer_norm_vjp(x, w, mean, rstd, dy, n, t * ROWS_PER_TASK, std::min(rows, (t + 1) * ROWS_PER_TASK), dx,
                           part.data() + 2 * t * n, part.data() + (2 * t + 1) * n, scratch[slot]);
    });
    std::fill(dw, dw + n, 0.0f);
    std::fill(db, db + n, 0.0f);
    for (int64_t t = 0; t < tasks; ++t) {  // in task order: the same bits for any thread count
      const float* pw = part.data() + 2 * t * n;
      const float* pb = pw + n;
      for (int64_t i = 0; i < n; ++i) {
        dw[i] += pw[i];
        db[i] += pb[i];
      }
    }
  });
}

void LayerNormVjp::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("[ufb] layer_norm runs on the CPU only");
}

std::vector<mx::Shape> LayerNormVjp::output_shapes(const std::vector<mx::array>& inputs) {
  const int n = inputs[0].shape(-1);
  return {inputs[0].shape(), {n}, {n}};
}

}  // namespace ufb
