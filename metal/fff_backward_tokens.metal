// fff_backward_tokens: per-token half of the FFF backward pass, G simdgroups per token.
//
// Launch: grid (32*G, T, 1), threadgroup (32*G, S, 1), as fff_forward: the 32*G threads
//   along x split H with stride 32*G; y is the token.
// Template: H, P, D, G, TGS as fff_forward (N = 2^(D+1) - 1 nodes per tree, L = D + 1).
// Inputs (row-contiguous): w_in (P*N, H) and w_out_t (P*N, H) any float dtype;
//   rows (T, P, L) int32 and z (T, P, L) float from fff_forward; dy (T, H) any float.
// Outputs, all float: dx (T, H); dz (T, P, L) = (dy . w_out_t[row]) * gelu'(z);
//   act (T, P, L) = gelu(z), both consumed by fff_backward_rows.
// Registers, per lane (as fff_forward, same PER_LANE and fully unrolled loops, so that
//   constant indices let the compiler keep both arrays in registers): g, this lane's
//   PER_LANE values of dy, loaded once and reused by the dot product of every visit;
//   acc, its PER_LANE values of dx, accumulated over the token's P*(D+1) visits and
//   stored once.
// float32: dy cached in registers, the dot products (simd_sum, then the G simdgroup sums
//   in simdgroup order as in fff_forward), gelu/gelu', and dx, which is accumulated in
//   registers over the token's P*L visited rows and stored once.
// No atomics: each token's threads write only that token's outputs, so the result does
//   not depend on scheduling. The weight gradients, which many tokens share, are
//   reduced per row by fff_backward_rows.

constexpr uint L = uint(D) + 1u;
constexpr uint VISITS = uint(P) * L;
constexpr uint LANES = 32u * uint(G);
constexpr uint PER_LANE = (uint(H) + LANES - 1u) / LANES;
// every lane's last value is inside the row: the compiler drops the bounds checks
constexpr bool FULL = uint(H) % LANES == 0u;

const uint lane = thread_position_in_threadgroup.x;
const uint token = thread_position_in_grid.y;
threadgroup float sums[2 * TGS];
const uint sum_base = thread_position_in_threadgroup.y * uint(G);
uint buf = 0;

float g[PER_LANE];
float acc[PER_LANE];
#pragma clang loop unroll(full)
for (uint j = 0; j < PER_LANE; ++j) {
  const uint h = lane + LANES * j;
  g[j] = FULL || h < uint(H) ? float(dy[token * uint(H) + h]) : 0.0f;
  acc[j] = 0.0f;
}

for (uint v = 0; v < VISITS; ++v) {
  const uint slot = token * VISITS + v;
  const uint row = uint(rows[slot]);
  const float logit = z[slot];
  float part = 0.0f;
  #pragma clang loop unroll(full)
  for (uint j = 0; j < PER_LANE; ++j) {
    const uint h = lane + LANES * j;
    if (FULL || h < uint(H)) {
      part += g[j] * float(w_out_t[row * uint(H) + h]);
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
    for (uint s = 0; s < uint(G); ++s) {
      dot += sums[buf * TGS + sum_base + s];
    }
    buf ^= 1u;
  }
  const float dlogit = dot * fff_gelu_grad(logit);
  #pragma clang loop unroll(full)
  for (uint j = 0; j < PER_LANE; ++j) {
    const uint h = lane + LANES * j;
    if (FULL || h < uint(H)) {
      acc[j] += dlogit * float(w_in[row * uint(H) + h]);
    }
  }
  if (lane == 0) {
    dz[slot] = dlogit;
    act[slot] = fff_gelu(logit);
  }
}

#pragma clang loop unroll(full)
for (uint j = 0; j < PER_LANE; ++j) {
  const uint h = lane + LANES * j;
  if (FULL || h < uint(H)) {
    dx[token * uint(H) + h] = acc[j];
  }
}
