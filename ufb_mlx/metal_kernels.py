"""Custom Metal kernels for the FFF layer, loaded from metal/ through mx.fast.metal_kernel.

Design (the comment block at the top of each metal/*.metal file has the details):
- fff_forward: G simdgroups (32*G lanes) per token, lanes splitting H; the descent over
  all P trees and D+1 levels is fused in one launch (no tokens x nodes logit matrix):
  per level a simd_sum dot product, the routing decision, and y accumulated in registers.
- fff_backward: fff_backward_tokens (per token, like the forward: dx, dz, gelu(z)), then
  the visits are grouped by row with a few MLX ops (argsort, scatter-add of counts,
  cumsum), then fff_backward_rows (one threadgroup per chunk of at most ROW_CHUNK visits
  of a row: d_w_in, d_b_in, d_w_out_t summed over the chunk in token order) and, when
  some row has more visits than that (only possible past ROW_CHUNK tokens: the root and
  the levels below it), fff_backward_rows_reduce (each row's chunks added in order). No
  atomics: gradients are bitwise deterministic, and the rows every token visits are
  spread over many threadgroups instead of one.
Everything is accumulated in float32 and GELU is the exact erf GELU (metal/fff_gelu.h).

Launch configuration from the model width H (``token_layout``): G = ceil(H / 1024)
simdgroups per token, at most MAX_GROUPS, so that each lane keeps at most MAX_PER_LANE
values of a row in registers (two such arrays per lane: 64 floats) up to H = 8192, and as
many tokens per threadgroup as keep it at THREADGROUP_MAX threads. A wider model keeps
G = MAX_GROUPS (one token, 256 threads per threadgroup) and gives each lane more values
(64 per array at H = 16384): valid for any width, though the Metal compiler may spill such
arrays to memory. MLX 0.32 does not expose a pipeline's maxTotalThreadsPerThreadgroup to
Python (it checks the launch against it during evaluation and raises "Thread group size
(...) is greater than the maximum allowed threads per threadgroup (...)"). The lowest such
limits MLX users report for register-heavy kernels on Apple GPUs are 384 to 448 threads;
no launch here exceeds 256 (not yet run on a Mac: there, ``python -m ufb_mlx.check``
would show that error).

`launch` is the only function that touches Metal; off a Mac it raises RuntimeError unless
a launcher is installed (``use_launcher``: ufb_mlx.metal_emu runs the same kernel text on
the CPU). The MLX-ops fallback for non-Metal devices is ufb_mlx.fff, not this module.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import mlx.core as mx

from ufb_ref.errors import UFBError
from ufb_ref.fff import n_nodes

from . import fff

# An installed package carries metal/ as ufb_mlx/metal/ (pyproject.toml maps it there); in
# the source tree and in an editable install it is the repository's top-level metal/.
_HERE = Path(__file__).resolve().parent
METAL_DIRS = (_HERE / "metal", _HERE.parent / "metal")
HEADER_FILE = "fff_gelu.h"
METAL_DIR = next((d for d in METAL_DIRS if (d / HEADER_FILE).is_file()), METAL_DIRS[0])

SIMD_WIDTH = 32
# Values of a row each lane keeps in registers (per array): beyond H = 32 * 32 a token
# gets more simdgroups instead of longer per-lane arrays.
MAX_PER_LANE = 32
# Threads per threadgroup of the per-token kernels (8 tokens up to H = 1024): enough
# simdgroups to hide memory latency, within every pipeline limit (module docstring).
THREADGROUP_MAX = 256
# Simdgroups per token at most: one token fills a threadgroup; wider rows loop over the
# width with more values per lane instead of more threads.
MAX_GROUPS = THREADGROUP_MAX // SIMD_WIDTH
ROWS_THREADGROUP_MAX = 256
# Visits of a row one threadgroup of fff_backward_rows sums; a row with more is split.
ROW_CHUNK = 256
_FLOAT_DTYPES = (mx.float32, mx.float16, mx.bfloat16)


def token_layout(hidden: int) -> tuple[int, int]:
    """(G simdgroups per token, tokens per threadgroup at most) for width ``hidden``:
    32 * G * tokens <= THREADGROUP_MAX threads for every width."""
    groups = min(MAX_GROUPS, -(-hidden // (SIMD_WIDTH * MAX_PER_LANE)))
    return groups, max(1, THREADGROUP_MAX // (SIMD_WIDTH * groups))


@dataclass(frozen=True)
class Launch:
    """The per-call arguments of a metal_kernel object, computed from the inputs."""

    template: list
    grid: tuple
    threadgroup: tuple
    output_shapes: list
    output_dtypes: list
    init_value: float | None = None

    def kwargs(self) -> dict:
        return dict(
            template=self.template,
            grid=self.grid,
            threadgroup=self.threadgroup,
            output_shapes=self.output_shapes,
            output_dtypes=self.output_dtypes,
            init_value=self.init_value,
        )


@dataclass(frozen=True)
class KernelSpec:
    """One kernel: its body file in metal/, the argument names MLX declares in the
    generated signature, and `configure(inputs, trees, depth, ...) -> Launch`."""

    name: str
    file: str
    input_names: tuple
    output_names: tuple
    configure: Callable[..., Launch]
    header_file: str | None = HEADER_FILE
    atomic_outputs: bool = False
    ensure_row_contiguous: bool = True

    @property
    def source(self) -> str:
        return _read(self.file)

    @property
    def header(self) -> str:
        return _read(self.header_file) if self.header_file else ""


@functools.cache
def _read(filename: str) -> str:
    path = METAL_DIR / filename
    if not path.is_file():
        raise UFBError(
            f"Metal kernel source {filename} not found (looked in "
            f"{' and '.join(str(d) for d in METAL_DIRS)}): the installation is incomplete; "
            "reinstall ultrafastbert-mlx, or pass backend='ops'"
        )
    return path.read_text()


@functools.cache
def missing_sources() -> tuple[str, ...]:
    """The kernel source files not found next to this module (empty when complete)."""
    names = {s.file for s in KERNELS} | {s.header_file for s in KERNELS if s.header_file}
    return tuple(sorted(n for n in names if not (METAL_DIR / n).is_file()))


def _per_token_launch(tokens: int, hidden: int, template: list, outputs: list) -> Launch:
    groups, per_group = token_layout(hidden)
    return Launch(
        template=template + [("G", groups), ("TGS", groups * per_group)],
        grid=(SIMD_WIDTH * groups, tokens, 1),
        threadgroup=(SIMD_WIDTH * groups, min(per_group, tokens), 1),
        output_shapes=[shape for shape, _ in outputs],
        output_dtypes=[dtype for _, dtype in outputs],
    )


def _configure_forward(inputs, trees: int, depth: int) -> Launch:
    x = inputs[0]
    tokens, hidden = x.shape
    visits = (tokens, trees, depth + 1)
    return _per_token_launch(
        tokens, hidden, [("YT", x.dtype), ("H", hidden), ("P", trees), ("D", depth)],
        [((tokens, hidden), x.dtype), (visits, mx.int32), (visits, mx.float32)])


def _configure_backward_tokens(inputs, trees: int, depth: int) -> Launch:
    dy = inputs[4]
    tokens, hidden = dy.shape
    visits = (tokens, trees, depth + 1)
    return _per_token_launch(
        tokens, hidden, [("H", hidden), ("P", trees), ("D", depth)],
        [((tokens, hidden), mx.float32), (visits, mx.float32), (visits, mx.float32)])


def _rows_launch(hidden: int, template: list, groups: int) -> Launch:
    """One threadgroup per row (or chunk), its threads splitting H; float32 outputs
    (groups, H), (groups,), (groups, H)."""
    width = min(ROWS_THREADGROUP_MAX, SIMD_WIDTH * -(-hidden // SIMD_WIDTH))
    return Launch(
        template=template,
        grid=(width, groups, 1),
        threadgroup=(width, 1, 1),
        output_shapes=[(groups, hidden), (groups,), (groups, hidden)],
        output_dtypes=[mx.float32, mx.float32, mx.float32],
    )


def _configure_backward_rows(inputs, trees: int, depth: int, chunks: int) -> Launch:
    hidden = inputs[0].shape[1]
    return _rows_launch(hidden, [("H", hidden), ("P", trees), ("D", depth), ("C", ROW_CHUNK)], chunks)


def _configure_backward_rows_reduce(inputs, trees: int, depth: int) -> Launch:
    hidden, n_rows = inputs[0].shape[1], inputs[3].shape[0] - 1
    return _rows_launch(hidden, [("H", hidden), ("P", trees), ("D", depth)], n_rows)


FORWARD = KernelSpec(
    name="fff_forward",
    file="fff_forward.metal",
    input_names=("x", "w_in", "b_in", "w_out_t"),
    output_names=("y", "rows", "z"),
    configure=_configure_forward,
)
BACKWARD_TOKENS = KernelSpec(
    name="fff_backward_tokens",
    file="fff_backward_tokens.metal",
    input_names=("w_in", "w_out_t", "rows", "z", "dy"),
    output_names=("dx", "dz", "act"),
    configure=_configure_backward_tokens,
)
BACKWARD_ROWS = KernelSpec(
    name="fff_backward_rows",
    file="fff_backward_rows.metal",
    input_names=("x", "dy", "act", "dz", "order", "offsets", "chunk_offsets"),
    output_names=("part_w_in", "part_b_in", "part_w_out_t"),
    configure=_configure_backward_rows,
)
BACKWARD_ROWS_REDUCE = KernelSpec(
    name="fff_backward_rows_reduce",
    file="fff_backward_rows_reduce.metal",
    input_names=("part_w_in", "part_b_in", "part_w_out_t", "chunk_offsets"),
    output_names=("d_w_in", "d_b_in", "d_w_out_t"),
    configure=_configure_backward_rows_reduce,
    header_file=None,
)
KERNELS = [FORWARD, BACKWARD_TOKENS, BACKWARD_ROWS, BACKWARD_ROWS_REDUCE]

# Runs a kernel instead of Metal when set (use_launcher): the emulator, off a Mac.
_launcher: Callable | None = None


@contextlib.contextmanager
def use_launcher(launcher: Callable):
    """Within: every kernel launch goes to ``launcher(spec, inputs, config)`` instead of
    Metal, and ``available()`` is True (ufb_mlx.metal_emu.metal_kernels uses this)."""
    global _launcher
    saved, _launcher = _launcher, launcher
    try:
        yield
    finally:
        _launcher = saved


def available() -> bool:
    return mx.metal.is_available() or _launcher is not None


@functools.cache
def kernel(spec: KernelSpec):
    """The mx.fast.metal_kernel object for `spec`, built on first use."""
    return mx.fast.metal_kernel(
        name=spec.name,
        input_names=list(spec.input_names),
        output_names=list(spec.output_names),
        source=spec.source,
        header=spec.header,
        ensure_row_contiguous=spec.ensure_row_contiguous,
        atomic_outputs=spec.atomic_outputs,
        # fff_gelu.h's exact exp(-x^2) split needs IEEE arithmetic (no reassociation)
        compile_options={"math_mode": "safe"},
    )


def launch(spec: KernelSpec, inputs: Sequence[mx.array], config: Launch) -> list[mx.array]:
    if _launcher is not None:
        return _launcher(spec, inputs, config)
    if not mx.metal.is_available():
        raise RuntimeError(
            f"ufb_mlx.metal_kernels: kernel {spec.name!r} needs a Metal GPU, and "
            "mx.metal.is_available() is False on this machine; use the MLX-ops FFF path "
            "(ufb_mlx.fff) instead"
        )
    return kernel(spec)(inputs=list(inputs), **config.kwargs())


def _check_shape(name: str, a: mx.array, shape: tuple) -> None:
    if tuple(a.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(a.shape)}, expected {tuple(shape)}")


def _check_float(name: str, a: mx.array) -> None:
    if a.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} has dtype {a.dtype}; the kernels take float32/float16/bfloat16")


def _check_index_range(tokens: int, hidden: int, n_rows: int, visits: int) -> None:
    # The kernels index with 32-bit uint, and visit indices travel as int32 (chunks of
    # fff_backward_rows: at most n_rows + T*visits/ROW_CHUNK rows of H).
    chunks = n_rows + tokens * visits // ROW_CHUNK
    if tokens * hidden >= 2**32 or chunks * hidden >= 2**32 or tokens * visits >= 2**31:
        raise ValueError(
            f"FFF kernels use 32-bit indices: T*H={tokens * hidden}, chunks*H={chunks * hidden}, "
            f"T*P*(D+1)={tokens * visits} are too large; split the batch"
        )


def fff_forward(x, w_in, b_in, w_out_t, trees: int, depth: int):
    """Conditional FFF forward on the GPU.

    x (T, H) float32/float16/bfloat16; w_in (P*n, H); b_in (P*n,); w_out_t (P*n, H), the
    transpose of linear_out.weight; n = 2**(depth+1) - 1, P = trees.
    Returns y (T, H) in x.dtype, rows (T, P, depth+1) int32 (global row k*n + node of the
    visited node per level), z (T, P, depth+1) float32 (its logit).
    """
    if not (isinstance(trees, int) and trees >= 1 and isinstance(depth, int) and depth >= 0):
        raise ValueError(f"need trees >= 1 and depth >= 0, got trees={trees}, depth={depth}")
    if x.ndim != 2 or x.shape[0] < 1:
        raise ValueError(f"x must be (T, H) with T >= 1, got shape {tuple(x.shape)}")
    tokens, hidden = x.shape
    n_rows = trees * n_nodes(depth)
    _check_shape("w_in", w_in, (n_rows, hidden))
    _check_shape("b_in", b_in, (n_rows,))
    _check_shape("w_out_t", w_out_t, (n_rows, hidden))
    for name, a in (("x", x), ("w_in", w_in), ("b_in", b_in), ("w_out_t", w_out_t)):
        _check_float(name, a)
    _check_index_range(tokens, hidden, n_rows, trees * (depth + 1))
    inputs = [x, w_in, b_in, w_out_t]
    y, rows, z = launch(FORWARD, inputs, FORWARD.configure(inputs, trees, depth))
    return y, rows, z


def row_chunks(offsets: mx.array, tokens: int, visits: int) -> tuple[mx.array, int]:
    """How fff_backward_rows splits the rows: row r gets max(1, ceil(count_r / ROW_CHUNK))
    chunks, numbered chunk_offsets[r] .. chunk_offsets[r+1] - 1; returns chunk_offsets
    (n_rows + 1,) int32 and the number of chunks to launch, a bound computed on the host
    (n_rows + T*visits // ROW_CHUNK) so that nothing waits for the counts. A row is
    visited at most once per token, so up to ROW_CHUNK tokens every row has one chunk."""
    n_rows = offsets.shape[0] - 1
    if tokens <= ROW_CHUNK:
        return mx.arange(n_rows + 1, dtype=mx.int32), n_rows
    counts = offsets[1:] - offsets[:-1]
    per_row = mx.maximum((counts + ROW_CHUNK - 1) // ROW_CHUNK, 1)
    chunk_offsets = mx.concatenate([mx.zeros((1,), dtype=mx.int32), mx.cumsum(per_row)])
    return chunk_offsets.astype(mx.int32), n_rows + tokens * visits // ROW_CHUNK


def fff_backward(x, w_in, w_out_t, rows, z, dy):
    """Gradients of sum(dy * y) for the forward that produced (rows, z).

    Per visited (token, row): a = gelu(z), dz = (dy . w_out_t[row]) * gelu'(z);
    d_w_out_t[row] += a * dy; d_w_in[row] += dz * x; d_b_in[row] += dz;
    dx[token] += dz * w_in[row]. The routing carries no gradient.
    Returns (dx, d_w_in, d_b_in, d_w_out_t), all float32 (the caller casts).
    """
    if x.ndim != 2 or x.shape[0] < 1:
        raise ValueError(f"x must be (T, H) with T >= 1, got shape {tuple(x.shape)}")
    tokens, hidden = x.shape
    if rows.ndim != 3 or rows.shape[0] != tokens:
        raise ValueError(f"rows must be (T, P, depth+1) with T={tokens}, got {tuple(rows.shape)}")
    _, trees, levels = rows.shape
    depth = levels - 1
    n_rows = trees * n_nodes(depth)
    _check_shape("w_in", w_in, (n_rows, hidden))
    _check_shape("w_out_t", w_out_t, (n_rows, hidden))
    _check_shape("z", z, tuple(rows.shape))
    _check_shape("dy", dy, (tokens, hidden))
    for name, a in (("x", x), ("w_in", w_in), ("w_out_t", w_out_t), ("dy", dy)):
        _check_float(name, a)
    if rows.dtype != mx.int32 or z.dtype != mx.float32:
        raise ValueError(f"rows must be int32 and z float32 (as fff_forward returns them), "
                         f"got {rows.dtype} and {z.dtype}")
    _check_index_range(tokens, hidden, n_rows, trees * levels)

    token_inputs = [w_in, w_out_t, rows, z, dy]
    dx, dz, act = launch(
        BACKWARD_TOKENS, token_inputs, BACKWARD_TOKENS.configure(token_inputs, trees, depth)
    )
    order, offsets = fff.visits_by_row(rows, n_rows)
    chunk_offsets, chunks = row_chunks(offsets, tokens, trees * levels)
    row_inputs = [x, dy, act, dz, order, offsets, chunk_offsets]
    grads = launch(BACKWARD_ROWS, row_inputs, BACKWARD_ROWS.configure(row_inputs, trees, depth, chunks))
    if chunks != n_rows:  # some row may have more than one chunk
        reduce_inputs = [*grads, chunk_offsets]
        grads = launch(BACKWARD_ROWS_REDUCE, reduce_inputs,
                       BACKWARD_ROWS_REDUCE.configure(reduce_inputs, trees, depth))
    d_w_in, d_b_in, d_w_out_t = grads
    return dx, d_w_in, d_b_in, d_w_out_t
