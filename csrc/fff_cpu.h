// MLX primitives for the conditional FFF on the CPU (and the fast elementwise GELU).
//
// fff_forward(x (T, H), w_in (R, H), b_in (R,), w_out (H, R), trees P, depth D)
//   -> [y (T, H) in x's dtype, rows (T, P, D+1) int32, z (T, P, D+1) float32]
// R = P * (2^(D+1) - 1). Weights float32, float16 or bfloat16 (one dtype), x any of the
// three; float32 accumulation. w_out may be row- or column-major: load() stores it
// column-major so that node r's output weights (a column) are contiguous.
// The vjp is FFFBackward: dx, and weight gradients touching only visited rows, summed
// per row in token order (bitwise deterministic for any thread count).
#pragma once

#include <vector>

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace ufb {

namespace mx = mlx::core;

std::vector<mx::array> fff_forward(const mx::array& x, const mx::array& w_in, const mx::array& b_in,
                                   const mx::array& w_out, int trees, int depth,
                                   mx::StreamOrDevice s = {});

// Exact-erf GELU, elementwise, float32 (other dtypes are computed in float32).
mx::array gelu(const mx::array& x, mx::StreamOrDevice s = {});

class FFFForward : public mx::Primitive {
 public:
  FFFForward(mx::Stream stream, int trees, int depth) : mx::Primitive(stream), trees_(trees), depth_(depth) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums, const std::vector<mx::array>& outputs) override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;
  const char* name() const override { return "FFFForward"; }
  bool is_equivalent(const mx::Primitive& other) const override;

 private:
  int trees_, depth_;
};

class FFFBackward : public mx::Primitive {
 public:
  FFFBackward(mx::Stream stream, int trees, int depth) : mx::Primitive(stream), trees_(trees), depth_(depth) {}
  // inputs: x, w_in, w_out, rows, z, dy; outputs: dx, d_w_in, d_b_in, d_w_out
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;
  const char* name() const override { return "FFFBackward"; }
  bool is_equivalent(const mx::Primitive& other) const override;

 private:
  int trees_, depth_;
};

class Gelu : public mx::UnaryPrimitive {
 public:
  explicit Gelu(mx::Stream stream) : mx::UnaryPrimitive(stream) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums, const std::vector<mx::array>& outputs) override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override { return {inputs[0].shape()}; }
  const char* name() const override { return "UfbGelu"; }
  bool is_equivalent(const mx::Primitive&) const override { return true; }
};

class GeluVjp : public mx::UnaryPrimitive {
 public:
  explicit GeluVjp(mx::Stream stream) : mx::UnaryPrimitive(stream) {}
  // inputs: x, dy (float32, same shape)
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override { return {inputs[0].shape()}; }
  const char* name() const override { return "UfbGeluVjp"; }
  bool is_equivalent(const mx::Primitive&) const override { return true; }
};

}  // namespace ufb
