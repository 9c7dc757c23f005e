// fff_backward_rows: per-row half of the FFF backward pass (weight gradients), over
// chunks of at most C visits of a row, so that a row visited by many tokens (the root,
// which every token visits, and the levels below it) is spread over many threadgroups.
//
// Chunks: row r's visits order[offsets[r] .. offsets[r+1]) are cut into
//   max(1, ceil(count / C)) chunks of C consecutive visits (the last one shorter);
//   chunk_offsets (P*N + 1,) int32 numbers them: row r owns chunks chunk_offsets[r] ..
//   chunk_offsets[r+1] - 1, so every row owns at least one (an unvisited row's chunk is
//   empty and yields zeros). The grid may hold more chunks than exist (the host sizes it
//   with a bound); those threadgroups return at once.
// Launch: grid (W, K, 1), threadgroup (W, 1, 1), K chunks, W = min(256, 32 * ceil(H / 32)):
//   one threadgroup per chunk (its index = y of the threadgroup position); its W threads
//   split H with stride W, so the reads of x and dy rows are coalesced.
// Template: H, P, D as compile-time ints (N = 2^(D+1) - 1, L = D + 1); C visits per chunk.
// Inputs (row-contiguous): x (T, H) and dy (T, H) any float dtype; act (T, P, L) and
//   dz (T, P, L) float from fff_backward_tokens; order (T*P*L,) int32, the flat visit
//   indices (token*P + tree)*L + level sorted by (row, token); offsets (P*N + 1,) int32,
//   order[offsets[r] .. offsets[r+1]) are the visits of row r; chunk_offsets as above.
// Outputs, all float, one entry per chunk:
//   part_w_in (K, H) = sum over the chunk's visits of dz * x[token];
//   part_b_in (K,) = sum of dz; part_w_out_t (K, H) = sum of act * dy[token].
//   When every row has one chunk (T <= C) the chunk of row r is r, and these are the
//   gradients d_w_in, d_b_in, d_w_out_t themselves; otherwise fff_backward_rows_reduce
//   adds up each row's chunks.
// Registers: per thread, two float accumulators (gin, gout) for the column it is on;
//   no array, so nothing depends on unrolling and nothing can spill.
// float32 accumulation. No atomics: each chunk's sums run in the fixed (token) order of
//   its visits, and the chunks are cut by counts alone, so the gradients are bitwise
//   deterministic.

constexpr uint VISITS = uint(P) * (uint(D) + 1u);
constexpr uint ROWS = uint(P) * ((2u << D) - 1u);

const uint chunk = threadgroup_position_in_grid.y;
const uint tid = thread_position_in_threadgroup.x;
const uint width = threads_per_threadgroup.x;
if (chunk >= uint(chunk_offsets[ROWS])) {
  return;
}
// the row owning this chunk: chunk_offsets is strictly increasing
uint lo = 0;
uint hi = ROWS;
while (hi - lo > 1u) {
  const uint mid = (lo + hi) / 2u;
  if (uint(chunk_offsets[mid]) <= chunk) {
    lo = mid;
  } else {
    hi = mid;
  }
}
const uint row = lo;
const uint begin = uint(offsets[row]) + (chunk - uint(chunk_offsets[row])) * uint(C);
const uint end = min(uint(offsets[row + 1u]), begin + uint(C));

for (uint h = tid; h < uint(H); h += width) {
  float gin = 0.0f;
  float gout = 0.0f;
  for (uint i = begin; i < end; ++i) {
    const uint visit = uint(order[i]);
    const uint token = visit / VISITS;
    gin += dz[visit] * float(x[token * uint(H) + h]);
    gout += act[visit] * float(dy[token * uint(H) + h]);
  }
  part_w_in[chunk * uint(H) + h] = gin;
  part_w_out_t[chunk * uint(H) + h] = gout;
}

if (tid == 0) {
  float gb = 0.0f;
  for (uint i = begin; i < end; ++i) {
    gb += dz[uint(order[i])];
  }
  part_b_in[chunk] = gb;
}
