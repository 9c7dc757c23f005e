// Python bindings of the fused CPU kernels: module ufb_mlx._ext.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>

#include "attention_cpu.h"
#include "fff_cpu.h"
#include "norm_cpu.h"
#include "loops.h"
#include "mlx/stream.h"
#include "mlx/transforms.h"
#include "mlx/version.h"
#include "threads.h"

namespace nb = nanobind;
using namespace nb::literals;

#define UFB_STR2(s) #s
#define UFB_STR(s) UFB_STR2(s)

// Waits for the kernels queued on the CPU's default stream, the one the primitives take
// when given none. synchronize() alone waits for the default device's stream, which on a
// Mac is the GPU's, while CPU work may still run.
static void sync_cpu_stream() {
  mlx::core::synchronize(mlx::core::default_stream(mlx::core::Device::cpu));
}

NB_MODULE(_ext, m) {
  m.doc() = "Fused CPU kernels of UltraFastBERT-MLX (MLX extension primitives)";
  // The mlx version whose headers this module was compiled against (ufb_mlx.cpu_kernels
  // refuses to use the module under any other mlx).
  m.attr("MLX_VERSION") = UFB_STR(MLX_VERSION_MAJOR) "." UFB_STR(MLX_VERSION_MINOR) "." UFB_STR(MLX_VERSION_PATCH);
  m.def("fff_forward", &ufb::fff_forward, "x"_a, "w_in"_a, "b_in"_a, "w_out"_a, "trees"_a, "depth"_a,
        nb::kw_only(), "stream"_a = nb::none(),
        "Conditional FFF forward: [y, rows, z]. See csrc/fff_cpu.h.");
  m.def("attention", &ufb::attention, "qkv"_a, "mask"_a, "heads"_a, "scale"_a, nb::kw_only(),
        "stream"_a = nb::none(), "Fused softmax attention: [out, lse]. See csrc/attention_cpu.h.");
  m.def("layer_norm", &ufb::layer_norm, "x"_a, "weight"_a, "bias"_a, "eps"_a, nb::kw_only(),
        "stream"_a = nb::none(), "LayerNorm over the last axis, float32: [y, mean, rstd]. See csrc/norm_cpu.h.");
  m.def("gelu", &ufb::gelu, "x"_a, nb::kw_only(), "stream"_a = nb::none(), "Exact-erf GELU (vectorised, CPU).");
  m.def("isa", [] { return std::string(ufb::table().isa); }, "Instruction set of the kernels in use.");
  m.def("isas", [] {
    std::vector<std::string> out;
    for (int i = 0; i < ufb::n_tables(); ++i) out.push_back(ufb::table_at(i).isa);
    return out;
  }, "Every instruction-set build usable on this CPU, best first.");
  m.def("set_isa", [](const std::string& isa) {
    sync_cpu_stream();
    if (!ufb::use_table(isa.c_str())) throw nb::value_error(("instruction set not usable here: " + isa).c_str());
  }, "isa"_a, "Use one instruction-set build (tests compare them).");
  m.def("num_threads", &ufb::num_threads);
  m.def("set_num_threads", [](int n) {
    sync_cpu_stream();  // no kernel may be running while the pool changes
    ufb::set_num_threads(n);
  }, "n"_a);
}
