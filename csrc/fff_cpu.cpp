// The MLX side of the fused CPU FFF: graph construction, output allocation, and the
// tasks handed to MLX's CPU command encoder (which run on the stream's thread and spread
// the loops of loops_fff.h over threads.h's pool).
#include "fff_cpu.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "loops.h"
#include "mlx/backend/cpu/encoder.h"
#include "row_major.h"
#include "threads.h"

namespace ufb {

namespace {

DType to_dtype(const mx::array& a, const char* what) {
  switch (a.dtype()) {
    case mx::float32: return DType::f32;
    case mx::float16: return DType::f16;
    case mx::bfloat16: return DType::bf16;
    default:
      throw std::invalid_argument(std::string("[ufb] ") + what + " must be float32, float16 or bfloat16");
  }
}

int64_t n_nodes(int depth) { return (int64_t(2) << depth) - 1; }

// The backward numbers each visit (token, tree, level) by its flat index in int32 (the
// order below, as the Metal kernels do): refuse a batch with 2^31 visits or more.
void check_visit_count(int64_t tokens, int trees, int depth) {
  const int64_t visits = tokens * trees * (int64_t(depth) + 1);
  if (visits > int64_t(INT32_MAX)) {
    throw std::invalid_argument("[ufb.fff_forward] the backward of " + std::to_string(visits) +
                                " visits (tokens * trees * (depth + 1)) exceeds 2^31 - 1: split the batch");
  }
}

// Visits grouped by row, token order kept within a row (a counting sort; ufb_mlx.fff's
// visits_by_row is the same routine in MLX ops): order[offsets[r] .. offsets[r+1]) are the
// flat indices of row r's visits, ascending. rows: `visits` row ids in [0, n_rows);
// order: `visits` entries; offsets: n_rows + 1.
void visits_by_row(const int32_t* rows, int64_t visits, int64_t n_rows, int32_t* order, int64_t* offsets) {
  std::fill(offsets, offsets + n_rows + 1, int64_t(0));
  for (int64_t v = 0; v < visits; ++v) ++offsets[rows[v] + 1];
  for (int64_t r = 0; r < n_rows; ++r) offsets[r + 1] += offsets[r];
  std::vector<int64_t> next(offsets, offsets + n_rows);
  for (int64_t v = 0; v < visits; ++v) order[next[size_t(rows[v])]++] = int32_t(v);
}

void check_inputs(const mx::array& x, const mx::array& w_in, const mx::array& b_in, const mx::array& w_out,
                  int trees, int depth) {
  if (trees < 1 || depth < 0 || depth > 30) {
    throw std::invalid_argument("[ufb.fff_forward] need trees >= 1 and 0 <= depth <= 30");
  }
  if (x.ndim() != 2) throw std::invalid_argument("[ufb.fff_forward] x must be (tokens, hidden)");
  const int64_t H = x.shape(1), R = trees * n_nodes(depth);
  if (w_in.ndim() != 2 || w_in.shape(0) != R || w_in.shape(1) != H) {
    throw std::invalid_argument("[ufb.fff_forward] w_in must be (trees * (2^(depth+1) - 1), hidden)");
  }
  if (b_in.ndim() != 1 || b_in.shape(0) != R) throw std::invalid_argument("[ufb.fff_forward] b_in must be (rows,)");
  if (w_out.ndim() != 2 || w_out.shape(0) != H || w_out.shape(1) != R) {
    throw std::invalid_argument("[ufb.fff_forward] w_out must be (hidden, rows)");
  }
  to_dtype(x, "x");
  to_dtype(w_in, "w_in");
  if (R * H >= (int64_t(1) << 62)) throw std::invalid_argument("[ufb.fff_forward] weights too large");
}

// Tokens per parallel task: one forward block (loops_fff.h), and enough work to
// amortise waking a thread.
constexpr int64_t TOKENS_PER_TASK = 64;

void alloc(mx::array& a) { a.set_data(mx::allocator::malloc(a.nbytes())); }

// The sizes and dtypes that ForwardArgs and BackwardArgs share.
template <class Args>
void set_sizes(Args& a, const mx::array& x, const mx::array& w_in, int trees, int depth) {
  a.xt = to_dtype(x, "x");
  a.wt = to_dtype(w_in, "w_in");
  a.T = x.shape(0);
  a.H = x.shape(1);
  a.P = trees;
  a.D = depth;
}

}  // namespace

// ---------------------------------------------------------------------------------------
// Ops

std::vector<mx::array> fff_forward(const mx::array& x, const mx::array& w_in, const mx::array& b_in,
                                   const mx::array& w_out, int trees, int depth, mx::StreamOrDevice s) {
  check_inputs(x, w_in, b_in, w_out, trees, depth);
  auto stream = mx::to_stream(s, mx::Device::cpu);
  const auto wt = w_in.dtype();
  const int T = x.shape(0), L = depth + 1;
  return mx::array::make_arrays(
      {x.shape(), {T, trees, L}, {T, trees, L}}, {x.dtype(), mx::int32, mx::float32},
      std::make_shared<FFFForward>(stream, trees, depth),
      {row_major(x, stream), row_major(w_in, stream), row_major(mx::astype(b_in, wt, stream), stream),
       column_major(mx::astype(w_out, wt, stream), stream)});
}

mx::array gelu(const mx::array& x, mx::StreamOrDevice s) {
  auto stream = mx::to_stream(s, mx::Device::cpu);
  auto xf = row_major(mx::astype(x, mx::float32, stream), stream);
  auto y = mx::array(xf.shape(), mx::float32, std::make_shared<Gelu>(stream), {xf});
  return mx::astype(y, x.dtype(), stream);
}

// ---------------------------------------------------------------------------------------
// Forward

void FFFForward::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  const auto &x = inputs[0], &w_in = inputs[1], &b_in = inputs[2], &w_out = inputs[3];
  auto &y = outputs[0], &rows = outputs[1], &z = outputs[2];
  for (auto& o : outputs) alloc(o);
  ForwardArgs a{};
  set_sizes(a, x, w_in, trees_, depth_);
  a.y = y.data<void>();
  a.rows = rows.data<int32_t>();
  a.z = z.data<float>();
  a.x = row_major_data<void>(x, "x");
  a.w_in = row_major_data<void>(w_in, "w_in");
  a.b_in = row_major_data<void>(b_in, "b_in");
  a.w_out_t = column_major_data<void>(w_out, "w_out");  // w_out^T row-major
  auto& enc = mx::cpu::get_command_encoder(stream());
  enc.set_input_array(x);
  enc.set_input_array(w_in);
  enc.set_input_array(b_in);
  enc.set_input_array(w_out);
  for (auto& o : outputs) enc.set_output_array(o);
  enc.dispatch([a]() {
    const LoopTable& loops = table();
    const int64_t tasks = (a.T + TOKENS_PER_TASK - 1) / TOKENS_PER_TASK;
    const int threads = num_threads();
    const Scratch scratch(slots(tasks, threads), loops.forward_scratch(a));
    parallel_for(tasks, threads, [&](int64_t i, int slot) {
      loops.forward(a, i * TOKENS_PER_TASK, std::min(a.T, (i + 1) * TOKENS_PER_TASK), scratch[slot]);
    });
  });
}

void FFFForward::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("[ufb] FFFForward runs on the CPU only; on a GPU use the Metal kernels (backend='metal')");
}

std::vector<mx::Shape> FFFForward::output_shapes(const std::vector<mx::array>& inputs) {
  const int T = inputs[0].shape(0), L = depth_ + 1;
  return {inputs[0].shape(), {T, trees_, L}, {T, trees_, L}};
}

bool FFFForward::is_equivalent(const mx::Primitive& other) const {
  auto& o = static_cast<const FFFForward&>(other);
  return trees_ == o.trees_ && depth_ == o.depth_;
}

std::vector<mx::array> FFFForward::vjp(const std::vector<mx::array>& primals,
                                       const std::vector<mx::array>& cotangents, const std::vector<int>& argnums,
                                       const std::vector<mx::array>& outputs) {
  const auto &x = primals[0], &w_in = primals[1], &b_in = primals[2], &w_out = primals[3];
  check_visit_count(x.shape(0), trees_, depth_);
  const auto dy = row_major(mx::astype(cotangents[0], x.dtype(), stream()), stream());
  auto grads = mx::array::make_arrays(
      {x.shape(), w_in.shape(), b_in.shape(), w_out.shape()}, {x.dtype(), w_in.dtype(), w_in.dtype(), w_in.dtype()},
      std::make_shared<FFFBackward>(stream(), trees_, depth_), {x, w_in, w_out, outputs[1], outputs[2], dy});
  std::vector<mx::array> out;
  for (int i : argnums) out.push_back(mx::astype(grads[i], primals[i].dtype(), stream()));
  return out;
}

// ---------------------------------------------------------------------------------------
// Backward

void FFFBackward::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  const auto &x = inputs[0], &w_in = inputs[1], &w_out = inputs[2], &rows = inputs[3], &z = inputs[4],
             &dy = inputs[5];
  auto &dx = outputs[0], &d_w_in = outputs[1], &d_b_in = outputs[2], &d_w_out = outputs[3];
  alloc(dx);
  alloc(d_w_in);
  alloc(d_b_in);
  // d_w_out (H, R) is written column-major: its column r (row r of the transpose) is the
  // contiguous sum over node r's visits, and the layout matches the one load() gives w_out.
  {
    const int64_t H = d_w_out.shape(0), R = d_w_out.shape(1);
    mx::array::Flags f;
    f.contiguous = true;
    f.row_contiguous = (H == 1 || R == 1);
    f.col_contiguous = true;
    d_w_out.set_data(mx::allocator::malloc(d_w_out.nbytes()), size_t(H * R), {1, H}, f);
  }
  BackwardArgs a{};
  set_sizes(a, x, w_in, trees_, depth_);
  a.dx = dx.data<void>();
  a.d_w_in = d_w_in.data<void>();
  a.d_b_in = d_b_in.data<void>();
  a.d_w_out_t = d_w_out.data<void>();
  auto& enc = mx::cpu::get_command_encoder(stream());
  for (auto& in : inputs) enc.set_input_array(in);
  for (auto& o : outputs) enc.set_output_array(o);
  a.x = row_major_data<void>(x, "x");
  a.w_in = row_major_data<void>(w_in, "w_in");
  a.w_out_t = column_major_data<void>(w_out, "w_out");
  a.dy = row_major_data<void>(dy, "dy");
  a.rows = row_major_data<int32_t>(rows, "rows");  // outputs of FFFForward
  a.z = row_major_data<float>(z, "z");
  enc.dispatch([a, wbytes = d_w_in.itemsize()]() mutable {
    const int64_t T = a.T, H = a.H, L = a.D + 1, V = int64_t(a.P) * L;
    const int64_t R = a.P * n_nodes(a.D);
    std::vector<float> dz(size_t(T * V)), act(size_t(T * V));
    a.dz = dz.data();
    a.act = act.data();
    const LoopTable& loops = table();
    const int threads = num_threads();

    // 1. per token: dx, dz, act
    const int64_t tasks = (T + TOKENS_PER_TASK - 1) / TOKENS_PER_TASK;
    {
      const Scratch scratch(slots(tasks, threads), loops.backward_tokens_scratch(a));
      parallel_for(tasks, threads, [&](int64_t i, int slot) {
        loops.backward_tokens(a, i * TOKENS_PER_TASK, std::min(T, (i + 1) * TOKENS_PER_TASK), scratch[slot]);
      });
    }

    // 2. visits grouped by row, token order kept
    std::vector<int32_t> order(size_t(T * V));
    std::vector<int64_t> offsets(size_t(R + 1));
    visits_by_row(a.rows, T * V, R, order.data(), offsets.data());
    a.order = order.data();
    a.offsets = offsets.data();

    // 3. per (row, column range), heaviest rows first (top levels of each tree); rows with
    // many visits are split across columns so that the root does not serialise the work.
    struct Unit {
      int64_t r, h0, h1;
    };
    std::vector<Unit> units;
    std::vector<int64_t> empty;
    const int64_t N = n_nodes(a.D);
    for (int64_t level = 0; level < L; ++level) {
      for (int64_t tree = 0; tree < a.P; ++tree) {
        for (int64_t node = (int64_t(1) << level) - 1; node < (int64_t(2) << level) - 1; ++node) {
          const int64_t r = tree * N + node;
          const int64_t c = offsets[size_t(r + 1)] - offsets[size_t(r)];
          if (c == 0) {
            empty.push_back(r);
            continue;
          }
          const int64_t work = c * H;
          const int64_t pieces = std::max<int64_t>(1, std::min<int64_t>((H + 127) / 128, work / (64 * 1024)));
          const int64_t step = ((H + pieces - 1) / pieces + 15) / 16 * 16;
          for (int64_t h0 = 0; h0 < H; h0 += step) units.push_back({r, h0, std::min(H, h0 + step)});
        }
      }
    }
    parallel_for(int64_t(units.size()), threads,
                 [&](int64_t i, int) { loops.backward_rows(a, units[i].r, units[i].h0, units[i].h1); });
    // Unvisited rows get zeros.
    char* d_in = static_cast<char*>(a.d_w_in);
    char* d_out = static_cast<char*>(a.d_w_out_t);
    char* d_b = static_cast<char*>(a.d_b_in);
    const int64_t per_task = 64;
    parallel_for((int64_t(empty.size()) + per_task - 1) / per_task, threads, [&](int64_t i, int) {
      const int64_t e = std::min<int64_t>(int64_t(empty.size()), (i + 1) * per_task);
      for (int64_t j = i * per_task; j < e; ++j) {
        const int64_t r = empty[size_t(j)];
        std::memset(d_in + r * H * wbytes, 0, size_t(H) * wbytes);
        std::memset(d_out + r * H * wbytes, 0, size_t(H) * wbytes);
        std::memset(d_b + r * wbytes, 0, wbytes);
      }
    });
  });
}

void FFFBackward::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("[ufb] FFFBackward runs on the CPU only");
}

std::vector<mx::Shape> FFFBackward::output_shapes(const std::vector<mx::array>& inputs) {
  const auto &x = inputs[0], &w_in = inputs[1], &w_out = inputs[2];
  return {x.shape(), w_in.shape(), {w_in.shape(0)}, w_out.shape()};
}

bool FFFBackward::is_equivalent(const mx::Primitive& other) const {
  auto& o = static_cast<const FFFBackward&>(other);
  return trees_ == o.trees_ && depth_ == o.depth_;
}

// ---------------------------------------------------------------------------------------
// GELU

namespace {
constexpr int64_t ELEMS_PER_TASK = 1 << 15;

template <class F>
void elementwise(mx::Stream s, const std::vector<mx::array>& inputs, mx::array& out, F f) {
  alloc(out);
  auto& enc = mx::cpu::get_command_encoder(s);
  for (auto& in : inputs) enc.set_input_array(in);
  enc.set_output_array(out);
  std::vector<const float*> ptrs;
  for (auto& in : inputs) ptrs.push_back(row_major_data<float>(in, "x"));
  enc.dispatch([ptrs, out_p = out.data<float>(), n = int64_t(out.size()), f]() {
    const int64_t tasks = (n + ELEMS_PER_TASK - 1) / ELEMS_PER_TASK;
    parallel_for(tasks, num_threads(), [&](int64_t i, int) {
      const int64_t b = i * ELEMS_PER_TASK, e = std::min(n, b + ELEMS_PER_TASK);
      f(ptrs, out_p, b, e - b);
    });
  });
}
}  // namespace

void Gelu::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  elementwise(stream(), inputs, out, [](const std::vector<const float*>& in, float* o, int64_t b, int64_t n) {
    table().gelu(in[0] + b, o + b, n);
  });
}

void Gelu::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("[ufb] gelu runs on the CPU only");
}

std::vector<mx::array> Gelu::vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                                 const std::vector<int>&, const std::vector<mx::array>&) {
  auto dy = row_major(mx::astype(cotangents[0], mx::float32, stream()), stream());
  return {mx::array(primals[0].shape(), mx::float32, std::make_shared<GeluVjp>(stream()), {primals[0], dy})};
}

void GeluVjp::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  elementwise(stream(), inputs, out, [](const std::vector<const float*>& in, float* o, int64_t b, int64_t n) {
    table().gelu_vjp(in[0] + b, in[1] + b, o + b, n);
  });
}

void GeluVjp::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("[ufb] gelu runs on the CPU only");
}

}  // namespace ufb
