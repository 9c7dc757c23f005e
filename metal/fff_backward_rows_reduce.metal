// fff_backward_rows_reduce: the weight gradients of each row, the sum of its chunks'
// partial sums from fff_backward_rows (used when some row has more than C visits).
//
// Launch: grid (W, P*N, 1), threadgroup (W, 1, 1), W as fff_backward_rows: one
//   threadgroup per row, its threads splitting H with stride W.
// Template: H, P, D as compile-time ints (N = 2^(D+1) - 1).
// Inputs (row-contiguous, float): part_w_in (K, H), part_b_in (K,), part_w_out_t (K, H);
//   chunk_offsets (P*N + 1,) int32: row r's chunks are chunk_offsets[r] .. [r+1] - 1.
// Outputs, all float, every element written: d_w_in (P*N, H), d_b_in (P*N,),
//   d_w_out_t (P*N, H).
// Registers: per thread, two float accumulators (gin, gout) for the column it is on;
//   no array, so nothing depends on unrolling and nothing can spill.
// The chunks of a row are added in chunk (token) order: deterministic.

const uint row = threadgroup_position_in_grid.y;
const uint tid = thread_position_in_threadgroup.x;
const uint width = threads_per_threadgroup.x;
const uint first = uint(chunk_offsets[row]);
const uint last = uint(chunk_offsets[row + 1u]);

for (uint h = tid; h < uint(H); h += width) {
  float gin = 0.0f;
  float gout = 0.0f;
  for (uint k = first; k < last; ++k) {
    gin += part_w_in[k * uint(H) + h];
    gout += part_w_out_t[k * uint(H) + h];
  }
  d_w_in[row * uint(H) + h] = gin;
  d_w_out_t[row * uint(H) + h] = gout;
}

if (tid == 0) {
  float gb = 0.0f;
  for (uint k = first; k < last; ++k) {
    gb += part_b_in[k];
  }
  d_b_in[row] = gb;
}
