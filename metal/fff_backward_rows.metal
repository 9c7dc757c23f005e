// fff_backward_rows: per-row half of the FFF backward pass (weight gradients).
//
// Launch: grid (W, P*N, 1), threadgroup (W, 1, 1), W = min(256, 32 * ceil(H / 32)):
//   one threadgroup per row of w_in (row = y of the threadgroup position); its W threads
//   split H with stride W, so the reads of x and dy rows are coalesced.
// Template: H, P, D as compile-time ints (N = 2^(D+1) - 1, L = D + 1).
// Inputs (row-contiguous): x (T, H) and dy (T, H) any float dtype; act (T, P, L) and
//   dz (T, P, L) float from fff_backward_tokens; order (T*P*L,) int32, the flat visit
//   indices (token*P + tree)*L + level sorted by (row, token); offsets (P*N + 1,) int32,
//   order[offsets[r] .. offsets[r+1]) are the visits of row r.
// Outputs, all float, every element written (unvisited rows get zeros):
//   d_w_in (P*N, H) = sum over visits of dz * x[token];  d_b_in (P*N,) = sum of dz;
//   d_w_out_t (P*N, H) = sum over visits of act * dy[token].
// float32 accumulation. No atomics: each row's sums run in the fixed (token) order of
//   its segment, so the gradients are bitwise deterministic.

constexpr uint VISITS = uint(P) * (uint(D) + 1u);

const uint row = threadgroup_position_in_grid.y;
const uint tid = thread_position_in_threadgroup.x;
const uint width = threads_per_threadgroup.x;
const uint begin = uint(offsets[row]);
const uint end = uint(offsets[row + 1u]);

for (uint h = tid; h < uint(H); h += width) {
  float gin = 0.0f;
  float gout = 0.0f;
  for (uint i = begin; i < end; ++i) {
    const uint visit = uint(order[i]);
    const uint token = visit / VISITS;
    gin += dz[visit] * float(x[token * uint(H) + h]);
    gout += act[visit] * float(dy[token * uint(H) + h]);
  }
  d_w_in[row * uint(H) + h] = gin;
  d_w_out_t[row * uint(H) + h] = gout;
}

if (tid == 0) {
  float gb = 0.0f;
  for (uint i = begin; i < end; ++i) {
    gb += dz[uint(order[i])];
  }
  d_b_in[row] = gb;
}
