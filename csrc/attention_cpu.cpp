#include "attention_cpu.h"

#include <memory>
#include <stdexcept>

#include "loops.h"
#include "mlx/backend/cpu/encoder.h"
#include "row_major.h"
#include "threads.h"

namespace ufb {

std::vector<mx::array> attention(const mx::array& qkv, const mx::array& mask, int heads, float scale,
                                 mx::StreamOrDevice s) {
  if (qkv.ndim() != 3 || heads < 1 || qkv.shape(2) % (3 * heads) != 0) {
    throw std::invalid_argument("[ufb.attention] qkv must be (batch, seq, 3 * heads * head_size)");
  }
  const int B = qkv.shape(0), S = qkv.shape(1);
  if (mask.ndim() != 2 || mask.shape(0) != B || mask.shape(1) != S) {
    throw std::invalid_argument("[ufb.attention] mask must be (batch, seq)");
  }
  auto stream = mx::to_stream(s, mx::Device::cpu);
  const int H = qkv.shape(2) / 3;
  return mx::array::make_arrays({{B, S, H}, {B, heads, S}}, {mx::float32, mx::float32},
                                std::make_shared<Attention>(stream, heads, scale),
                                {row_major(mx::astype(qkv, mx::float32, stream), stream),
                                 row_major(mx::astype(mask, mx::float32, stream), stream)});
}

namespace {

AttnArgs args_for(const mx::array& qkv, int heads, float scale) {
  AttnArgs a{};
  a.B = qkv.shape(0);
  a.S = qkv.shape(1);
  a.heads = heads;
  a.dh = qkv.shape(2) / (3 * heads);
  a.scale = scale;
  return a;
}

// Every (batch, head) pair, each thread with its own scratch.
void run_pairs(const AttnArgs& a, int64_t (*const scratch_floats)(const AttnArgs&),
               void (*const fn)(const AttnArgs&, int64_t, int64_t, float*)) {
  const int64_t pairs = a.B * a.heads;
  const int threads = num_threads();
  const Scratch scratch(slots(pairs, threads), scratch_floats(a));
  parallel_for(pairs, threads, [&](int64_t i, int slot) { fn(a, i / a.heads, i % a.heads, scratch[slot]); });
}

}  // namespace

void Attention::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  for (auto& o : outputs) o.set_data(mx::allocator::malloc(o.nbytes()));
  AttnArgs a = args_for(inputs[0], heads_, scale_);
  a.out = outputs[0].data<float>();
  a.lse = outputs[1].data<float>();
  auto& enc = mx::cpu::get_command_encoder(stream());
  for (auto& in : inputs) enc.set_input_array(in);
  for (auto& o : outputs) enc.set_output_array(o);
  a.qkv = row_major_data<float>(inputs[0], "qkv");
  a.mask = row_major_data<float>(inputs[1], "mask");
  enc.dispatch([a]() { run_pairs(a, table().attention_forward_scratch, table().attention_forward); });
}

void Attention::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("[ufb] attention runs on the CPU only");
}

std::vector<mx::Shape> Attention::output_shapes(const std::vector<mx::array>& inputs) {
  const auto& q = inputs[0];
  return {{q.shape(0), q.shape(1), q.shape(2) / 3}, {q.shape(0), heads_, q.shape(1)}};
}

bool Attention::is_equivalent(const mx::Primitive& other) const {
  auto& o = static_cast<const Attention&>(other);
  return heads_ == o.heads_ && scale_ == o.scale_;
}

std::vector<mx::array> Attention::vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                                      const std::vector<int>& argnums, const std::vector<mx::array>& outputs) {
  std::vector<mx::array> out;
  for (int i : argnums) {
    if (i == 0) {
      out.push_back(mx::array(primals[0].shape(), mx::float32,
                              std::make_shared<AttentionBackward>(stream(), heads_, scale_),
                              {primals[0], primals[1], outputs[0], outputs[1],
                               row_major(mx::astype(cotangents[0], mx::float32, stream()), stream())}));
    } else {  // the additive mask is a constant of the input, not a parameter
      out.push_back(mx::zeros_like(primals[i], stream()));
    }
  }
  return out;
}

void AttentionBackward::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  AttnArgs a = args_for(inputs[0], heads_, scale_);
  a.dqkv = out.data<float>();
  auto& enc = mx::cpu::get_command_encoder(stream());
  for (auto& in : inputs) enc.set_input_array(in);
  enc.set_output_array(out);
  a.qkv = row_major_data<float>(inputs[0], "qkv");
  a.mask = row_major_data<float>(inputs[1], "mask");
  a.out = const_cast<float*>(row_major_data<float>(inputs[2], "out"));  // read only here
  a.lse = const_cast<float*>(row_major_data<float>(inputs[3], "lse"));
  a.dout = row_major_data<float>(inputs[4], "dout");
  enc.dispatch([a]() { run_pairs(a, table().attention_backward_scratch, table().attention_backward); });
}

void AttentionBackward::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("[ufb] attention runs on the CPU only");
}

bool AttentionBackward::is_equivalent(const mx::Primitive& other) const {
  auto& o = static_cast<const AttentionBackward&>(other);
  return heads_ == o.heads_ && scale_ == o.scale_;
}

}  // namespace ufb
