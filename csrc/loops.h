// The CPU loops behind the MLX primitives (fff_cpu.cpp, attention_cpu.cpp, norm_cpu.cpp),
// independent of MLX (plain pointers). Not to be confused with the Metal kernels
// (metal/, ufb_mlx/metal_kernels.py): these are the C++ extension's CPU code.
//
// Layouts (all row-major, element types named by DType):
//   x (T, H), y (T, H), dy (T, H), dx (T, H): activations, dtype `xt`;
//   w_in (R, H), b_in (R), w_out_t (R, H): weights, dtype `wt`, R = P * N rows,
//     N = 2^(D+1) - 1 nodes per tree; w_out_t is linear_out.weight transposed, so the
//     output row of node r is contiguous, like its input row;
//   rows (T, P, L) int32 global row ids tree*N + node, z (T, P, L) float32 logits, L = D+1;
//   dz, act (T, P, L) float32: the backward's per-visit coefficients.
// Every loop accumulates in float32. The loops are written once per family (loops_vec.h:
// vector primitives, conversions, exp/erf and the elementwise GELU; loops_fff.h;
// loops_attention.h; loops_norm.h) and compiled per instruction set by
// loops_avx512.cpp, loops_avx2.cpp and loops_generic.cpp through loops_table.h;
// `table()` picks one build at run time.
//
// Scratch: a loop that needs working memory takes `scratch`, and the table says how many
// floats one call needs (the *_scratch entries); the caller plans one part per thread
// before the parallel region (threads.h: Scratch), so nothing is allocated inside it.
#pragma once

#include <cstdint>

namespace ufb {

enum class DType : int { f32 = 0, f16 = 1, bf16 = 2 };

struct ForwardArgs {
  const void* x;
  const void* w_in;
  const void* b_in;
  const void* w_out_t;
  void* y;
  int32_t* rows;
  float* z;
  DType xt, wt;
  int64_t T, H;
  int P, D;
};

struct BackwardArgs {
  const void* x;
  const void* dy;
  const void* w_in;
  const void* w_out_t;
  const int32_t* rows;
  const float* z;
  void* dx;        // (T, H), xt
  float* dz;       // (T, P, L)
  float* act;      // (T, P, L)
  void* d_w_in;    // (R, H), wt
  void* d_b_in;    // (R,), wt
  void* d_w_out_t; // (R, H), wt
  // Visits grouped by row (visits_by_row in fff_cpu.cpp): order[offsets[r] ..
  // offsets[r+1]) are the flat visit indices (t * P + tree) * L + level of row r, in token
  // order.
  const int32_t* order;
  const int64_t* offsets;
  DType xt, wt;
  int64_t T, H;
  int P, D;
};

// Softmax attention of one (batch, head) pair, reading q, k, v straight from the fused
// projection's output: qkv (B, S, 3 * heads * dh) with head h's q, k, v in columns
// [3 dh h, 3 dh h + dh), [.. + dh, .. + 2 dh), [.. + 2 dh, .. + 3 dh) (the checkpoint's
// per-head interleaved layout); out (B, S, heads * dh) head-major; lse (B, heads, S) the
// log-sum-exp of each query row's scores; mask (B, S) additive on the keys, or null.
struct AttnArgs {
  const float* qkv;
  const float* mask;
  float* out;
  float* lse;
  // backward only
  const float* dout;   // (B, S, heads * dh)
  float* dqkv;         // (B, S, 3 * heads * dh)
  int64_t B, S, heads, dh;
  float scale;
};

struct LoopTable {
  const char* isa;
  // Tokens [t0, t1): descent, y, rows and z. Scratch: forward_scratch(a) floats.
  int64_t (*forward_scratch)(const ForwardArgs&);
  void (*forward)(const ForwardArgs&, int64_t t0, int64_t t1, float* scratch);
  // Tokens [t0, t1): dx, dz, act. Scratch: backward_tokens_scratch(a) floats.
  int64_t (*backward_tokens_scratch)(const BackwardArgs&);
  void (*backward_tokens)(const BackwardArgs&, int64_t t0, int64_t t1, float* scratch);
  // Row r, columns [h0, h1): d_w_in, d_w_out_t (and d_b_in when h0 == 0), each a sum
  // over the row's visits in token order (unvisited rows: zeros). Fixed-size stack buffers.
  void (*backward_rows)(const BackwardArgs&, int64_t r, int64_t h0, int64_t h1);
  // y = gelu(x) elementwise, n values (float32); and its backward dx = dy * gelu'(x).
  void (*gelu)(const float* x, float* y, int64_t n);
  void (*gelu_vjp)(const float* x, const float* dy, float* dx, int64_t n);
  // LayerNorm of rows [r0, r1) of x (rows, n), float32: y = (x - mean) * rstd * w + b,
  // mean and rstd per row kept for the backward.
  void (*layer_norm)(const float* x, const float* w, const float* b, float eps, int64_t n, int64_t r0,
                     int64_t r1, float* y, float* mean, float* rstd);
  // Its backward for rows [r0, r1): dx, and this range's partial sums of dw and db (each
  // n floats, summed over the rows in order; the caller adds ranges in a fixed order).
  // Scratch: layer_norm_vjp_scratch(n) floats.
  int64_t (*layer_norm_vjp_scratch)(int64_t n);
  void (*layer_norm_vjp)(const float* x, const float* w, const float* mean, const float* rstd, const float* dy,
                         int64_t n, int64_t r0, int64_t r1, float* dx, float* dw_part, float* db_part,
                         float* scratch);
  // Attention of pair (b, h): out and lse (forward), or dqkv (backward, from dout, out,
  // lse), for that head's columns. Scratch: the matching *_scratch(a) floats.
  int64_t (*attention_forward_scratch)(const AttnArgs&);
  void (*attention_forward)(const AttnArgs&, int64_t b, int64_t h, float* scratch);
  int64_t (*attention_backward_scratch)(const AttnArgs&);
  void (*attention_backward)(const AttnArgs&, int64_t b, int64_t h, float* scratch);
};

// The best table this CPU supports (UFB_CPU_ISA=generic|avx2|avx512 forces one).
const LoopTable& table();
// Every table compiled in and usable on this CPU (for tests), and switching to one by
// name (false if it is not usable here). Switch only while no loop runs.
int n_tables();
const LoopTable& table_at(int i);
bool use_table(const char* isa);

namespace generic {
extern const LoopTable kTable;
}
#if defined(__x86_64__) || defined(_M_X64)
namespace avx2 {
extern const LoopTable kTable;
}
namespace avx512 {
extern const LoopTable kTable;
}
#endif

} // namespace ufb
