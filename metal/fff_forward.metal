// fff_forward: fused hard descent of P trees of depth D, one token per simdgroup.
//
// Launch: grid (32, T, 1), threadgroup (32, S, 1) with S = min(8, T). The 32 threads
//   along x are one simdgroup (simdgroups are cut from the x-fastest thread index) and
//   split H with stride 32, so every load below is coalesced; y of the grid is the
//   token. Every launched thread owns a valid (token, lane): no bounds checks and
//   the whole simdgroup always takes the same branch.
// Template: YT = dtype of y (x's dtype); H, P, D as compile-time ints, so the loops
//   unroll and the per-lane register arrays have fixed size (ceil(H/32) floats each).
// Inputs (row-contiguous, any float dtype, read through float()):
//   x (T, H); w_in (P*N, H); b_in (P*N,); w_out_t (P*N, H) with N = 2^(D+1) - 1
//   (w_out_t is linear_out.weight transposed, so a visited row is one contiguous read).
// Outputs: y (T, H) in YT; rows (T, P, D+1) int32, the global row k*N + node visited
//   at each level; z (T, P, D+1) float, its logit.
// float32: x, the logit (per-lane partial dot, then simd_sum), GELU and the y
//   accumulator, which stays in registers until the single store at the end.
// Routing: node = 2*node + 1 + (z > 0): strictly positive goes right, z == 0 left.
// Indices are 32-bit: the host checks T*H and P*N*H fit.

constexpr uint N = (2u << D) - 1u;
constexpr uint L = uint(D) + 1u;
constexpr uint PER_LANE = (uint(H) + 31u) / 32u;

const uint lane = thread_index_in_simdgroup;
const uint token = thread_position_in_grid.y;

float xv[PER_LANE];
float acc[PER_LANE];
for (uint j = 0; j < PER_LANE; ++j) {
  const uint h = lane + 32u * j;
  xv[j] = h < uint(H) ? float(x[token * uint(H) + h]) : 0.0f;
  acc[j] = 0.0f;
}

for (uint k = 0; k < uint(P); ++k) {
  uint node = 0;
  for (uint level = 0; level < L; ++level) {
    const uint row = k * N + node;
    float part = 0.0f;
    for (uint j = 0; j < PER_LANE; ++j) {
      const uint h = lane + 32u * j;
      if (h < uint(H)) {
        part += xv[j] * float(w_in[row * uint(H) + h]);
      }
    }
    const float logit = simd_sum(part) + float(b_in[row]);
    const float act = fff_gelu(logit);
    for (uint j = 0; j < PER_LANE; ++j) {
      const uint h = lane + 32u * j;
      if (h < uint(H)) {
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

for (uint j = 0; j < PER_LANE; ++j) {
  const uint h = lane + 32u * j;
  if (h < uint(H)) {
    y[token * uint(H) + h] = YT(acc[j]);
  }
}
