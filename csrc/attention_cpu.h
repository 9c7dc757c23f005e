// MLX primitive for softmax attention on the CPU, fused with the checkpoint's layouts.
//
// attention(qkv (B, S, 3 * heads * dh), mask (B, S), heads, scale)
//   -> [out (B, S, heads * dh), lse (B, heads, S)]
// qkv is the fused projection's output with each head's q, k, v interleaved per head
// (docs/DESIGN.md section 2), so no transposes are needed; out is head-major, ready for
// the output projection; mask is additive on the keys ((1 - attention_mask) * -10000).
// float32. The vjp (AttentionBackward) recomputes the probabilities from lse.
#pragma once

#include <vector>

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace ufb {

namespace mx = mlx::core;

std::vector<mx::array> attention(const mx::array& qkv, const mx::array& mask, int heads, float scale,
                                 mx::StreamOrDevice s = {});

class Attention : public mx::Primitive {
 public:
  Attention(mx::Stream stream, int heads, float scale) : mx::Primitive(stream), heads_(heads), scale_(scale) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums, const std::vector<mx::array>& outputs) override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;
  const char* name() const override { return "UfbAttention"; }
  bool is_equivalent(const mx::Primitive& other) const override;

 private:
  int heads_;
  float scale_;
};

class AttentionBackward : public mx::UnaryPrimitive {
 public:
  AttentionBackward(mx::Stream stream, int heads, float scale)
      : mx::UnaryPrimitive(stream), heads_(heads), scale_(scale) {}
  // inputs: qkv, mask, out, lse, dout; output: dqkv
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;
  const char* name() const override { return "UfbAttentionBackward"; }
  bool is_equivalent(const mx::Primitive& other) const override;

 private:
  int heads_;
  float scale_;
};

}  // namespace ufb
