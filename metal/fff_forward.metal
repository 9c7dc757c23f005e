// fff_forward: fused hard descent of P trees of depth D, G simdgroups per token.
//
// Launch: grid (32*G, T, 1), threadgroup (32*G, S, 1) with G and S chosen from H by
//   ufb_mlx/metal_kernels.py: G = min(8, ceil(H / 1024)) simdgroups per token, S tokens
//   per threadgroup, at most 256 threads whatever H (a pipeline of a register-heavy
//   kernel may allow fewer than 1024). The 32*G threads along x split H with stride
//   32*G, so every load below is coalesced; y of the grid is the token. Simdgroups are
//   cut from the x-fastest thread index, so each one belongs to a single token. Every
//   launched thread owns a valid (token, lane): all threads of a threadgroup take the
//   same branches (the barriers are uniform).
// Template: YT = dtype of y (x's dtype); H, P, D, G as compile-time ints.
//   TGS = simdgroups per threadgroup at most (sizes the cross-simdgroup scratch).
// Registers, per lane: xv, this lane's PER_LANE values of x, loaded once and reused by
//   the dot product of every level; acc, its PER_LANE values of y, accumulated over all
//   P*(D+1) visited rows and stored once at the end. PER_LANE = ceil(H / (32*G)) is a
//   compile-time constant (H, G are template arguments) and every loop over it is fully
//   unrolled, so each array element has a constant index: only then can the compiler
//   keep the arrays in registers (a dynamically indexed array lives in slow thread
//   memory). Up to H = 8192, PER_LANE <= 32 (64 floats for both arrays); wider, G stays
//   8 and PER_LANE grows (64 at H = 16384): still correct, but the arrays may spill.
// Inputs (row-contiguous, any float dtype, read through float()):
//   x (T, H); w_in (P*N, H); b_in (P*N,); w_out_t (P*N, H) with N = 2^(D+1) - 1
//   (w_out_t is linear_out.weight transposed, so a visited row is one contiguous read).
// Outputs: y (T, H) in YT; rows (T, P, D+1) int32, the global row k*N + node visited
//   at each level; z (T, P, D+1) float, its logit.
// float32: x, the logit (per-lane partial dot, simd_sum, then for G > 1 the G simdgroup
//   sums added in simdgroup order through threadgroup memory: a fixed order, so the
//   result does not depend on scheduling), GELU and the y accumulator, which stays in
//   registers until the single store at the end.
// Routing: node = 2*node + 1 + (z > 0): strictly positive goes right, z == 0 left.
// Indices are 32-bit: the host checks T*H and P*N*H fit.

constexpr uint N = (2u << D) - 1u;
constexpr uint L = uint(D) + 1u;
constexpr uint LANES = 32u * uint(G);
constexpr uint PER_LANE = (uint(H) + LANES - 1u) / LANES;
// every lane's last value is inside the row: the compiler drops the bounds checks
constexpr bool FULL = uint(H) % LANES == 0u;

const uint lane = thread_position_in_threadgroup.x;
const uint token = thread_position_in_grid.y;
// this token's G simdgroup sums, double-buffered so that one barrier per level suffices
threadgroup float sums[2 * TGS];
const uint sum_base = thread_position_in_threadgroup.y * uint(G);
uint buf = 0;

float xv[PER_LANE];
float acc[PER_LANE];
#pragma clang loop unroll(full)
for (uint j = 0; j < PER_LANE; ++j) {
  const uint h = lane + LANES * j;
  xv[j] = FULL || h < uint(H) ? float(x[token * uint(H) + h]) : 0.0f;
  acc[j] = 0.0f;
}

for (uint k = 0; k < uint(P); ++k) {
  uint node = 0;
  for (uint level = 0; level < L; ++level) {
    const uint row = k * N + node;
    float part = 0.0f;
    #pragma clang loop unroll(full)
    for (uint j = 0; j < PER_LANE; ++j) {
      const uint h = lane + LANES * j;
      if (FULL || h < uint(H)) {
        part += xv[j] * float(w_in[row * uint(H) + h]);
      }
    }
    float dot = simd_sum(part);
    if (G > 1) {
      if (thread_index_in_simdgroup == 0) {
        sums[buf * TGS + sum_base + lane / 32u] = dot;
      }
      threadgroup_barrier(mem_flags::mem_threadgroup);
      dot = 0.0f;
      #pragma clang loop unroll(full)
      for (uint g = 0; g < uint(G); ++g) {
        dot += sums[buf * TGS + sum_base + g];
      }
      buf ^= 1u;
    }
    const float logit = dot + float(b_in[row]);
    const float act = fff_gelu(logit);
    #pragma clang loop unroll(full)
    for (uint j = 0; j < PER_LANE; ++j) {
      const uint h = lane + LANES * j;
      if (FULL || h < uint(H)) {
        acc[j] += act * float(w_out_t[row * uint(H) + h]);
      }
    }
    if (lane == 0) {
      const uint slot = (token * uint(P) + k) * L + level;
      rows[slot] = int(row);
      z[slot] = logit;
    }
    node = 2u * node + (logit > 0.0f ? 2u : 1u);
  }
}

#pragma clang loop unroll(full)
for (uint j = 0; j < PER_LANE; ++j) {
  const uint h = lane + LANES * j;
  if (FULL || h < uint(H)) {
    y[token * uint(H) + h] = YT(acc[j]);
  }
}
