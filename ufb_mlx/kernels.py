"""Custom Metal kernels for the FFF layer, loaded from metal/ through mx.fast.metal_kernel.

Design (the comment block at the top of each metal/*.metal file has the details):
- fff_forward: one simdgroup (32 lanes) per token, lanes splitting H; the descent over
  all P trees and D+1 levels is fused in one launch (no tokens x nodes logit matrix):
  per level a simd_sum dot product, the routing decision, and y accumulated in registers.
- fff_backward: fff_backward_tokens (per token, like the forward: dx, dz, gelu(z)), then
  the visits are grouped by row with a few MLX ops (argsort, scatter-add of counts,
  cumsum), then fff_backward_rows (one threadgroup per row: d_w_in, d_b_in, d_w_out_t
  summed over that row's visits in token order). No atomics: gradients are bitwise
  deterministic, and no root-row contention between thousands of tokens.
Everything is accumulated in float32 and GELU is the exact erf GELU (metal/fff_gelu.h).

`launch` is the only function that touches Metal; off a Mac it raises RuntimeError, and
the tests substitute the CPU emulator in tests/metal_emu there. The MLX-ops fallback for
non-Metal devices is ufb_mlx.fff, not this module.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import mlx.core as mx

# metal/ sits at the repository root next to ufb_mlx/ (works for editable installs; a
# regular wheel must ship it at the same relative place).
METAL_DIR = Path(__file__).resolve().parent.parent / "metal"
HEADER_FILE = "fff_gelu.h"

SIMD_WIDTH = 32
# Tokens (simdgroups) per threadgroup for the per-token kernels: 8 x 32 = 256 threads,
# enough simdgroups per threadgroup to hide memory latency without large register files.
TOKENS_PER_THREADGROUP = 8
ROWS_THREADGROUP_MAX = 256
_FLOAT_DTYPES = (mx.float32, mx.float16, mx.bfloat16)


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
    generated signature, and `configure(inputs, trees, depth) -> Launch`."""

    name: str
    file: str
    input_names: tuple
    output_names: tuple
    configure: Callable[[Sequence[mx.array], int, int], Launch]
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
        raise FileNotFoundError(
            f"Metal kernel source {path} not found: metal/ must sit next to the ufb_mlx "
            "package (install the repository with `pip install -e .`)"
        )
    return path.read_text()


def _per_token_grid(tokens: int) -> tuple[tuple, tuple]:
    return (SIMD_WIDTH, tokens, 1), (SIMD_WIDTH, min(TOKENS_PER_THREADGROUP, tokens), 1)


def _configure_forward(inputs, trees: int, depth: int) -> Launch:
    x = inputs[0]
    tokens, hidden = x.shape
    grid, threadgroup = _per_token_grid(tokens)
    visits = (tokens, trees, depth + 1)
    return Launch(
        template=[("YT", x.dtype), ("H", hidden), ("P", trees), ("D", depth)],
        grid=grid,
        threadgroup=threadgroup,
        output_shapes=[(tokens, hidden), visits, visits],
        output_dtypes=[x.dtype, mx.int32, mx.float32],
    )


def _configure_backward_tokens(inputs, trees: int, depth: int) -> Launch:
    dy = inputs[4]
    tokens, hidden = dy.shape
    grid, threadgroup = _per_token_grid(tokens)
    visits = (tokens, trees, depth + 1)
    return Launch(
        template=[("H", hidden), ("P", trees), ("D", depth)],
        grid=grid,
        threadgroup=threadgroup,
        output_shapes=[(tokens, hidden), visits, visits],
        output_dtypes=[mx.float32, mx.float32, mx.float32],
    )


def _configure_backward_rows(inputs, trees: int, depth: int) -> Launch:
    x, offsets = inputs[0], inputs[5]
    hidden = x.shape[1]
    n_rows = offsets.shape[0] - 1
    width = min(ROWS_THREADGROUP_MAX, SIMD_WIDTH * -(-hidden // SIMD_WIDTH))
    return Launch(
        template=[("H", hidden), ("P", trees), ("D", depth)],
        grid=(width, n_rows, 1),
        threadgroup=(width, 1, 1),
        output_shapes=[(n_rows, hidden), (n_rows,), (n_rows, hidden)],
        output_dtypes=[mx.float32, mx.float32, mx.float32],
    )


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
    input_names=("x", "dy", "act", "dz", "order", "offsets"),
    output_names=("d_w_in", "d_b_in", "d_w_out_t"),
    configure=_configure_backward_rows,
)
KERNELS = [FORWARD, BACKWARD_TOKENS, BACKWARD_ROWS]


def available() -> bool:
    return mx.metal.is_available()


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
    if not available():
        raise RuntimeError(
            f"ufb_mlx.kernels: kernel {spec.name!r} needs a Metal GPU, and "
            "mx.metal.is_available() is False on this machine; use the MLX-ops FFF path "
            "(ufb_mlx.fff) instead"
        )
    return kernel(spec)(inputs=list(inputs), **config.kwargs())


def _n_nodes(depth: int) -> int:
    return 2 ** (depth + 1) - 1


def _check_shape(name: str, a: mx.array, shape: tuple) -> None:
    if tuple(a.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(a.shape)}, expected {tuple(shape)}")


def _check_float(name: str, a: mx.array) -> None:
    if a.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} has dtype {a.dtype}; the kernels take float32/float16/bfloat16")


def _check_index_range(tokens: int, hidden: int, n_rows: int, visits: int) -> None:
    # The kernels index with 32-bit uint, and visit indices travel as int32.
    if tokens * hidden >= 2**32 or n_rows * hidden >= 2**32 or tokens * visits >= 2**31:
        raise ValueError(
            f"FFF kernels use 32-bit indices: T*H={tokens * hidden}, rows*H={n_rows * hidden}, "
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
    n_rows = trees * _n_nodes(depth)
    _check_shape("w_in", w_in, (n_rows, hidden))
    _check_shape("b_in", b_in, (n_rows,))
    _check_shape("w_out_t", w_out_t, (n_rows, hidden))
    for name, a in (("x", x), ("w_in", w_in), ("b_in", b_in), ("w_out_t", w_out_t)):
        _check_float(name, a)
    _check_index_range(tokens, hidden, n_rows, trees * (depth + 1))
    inputs = [x, w_in, b_in, w_out_t]
    y, rows, z = launch(FORWARD, inputs, FORWARD.configure(inputs, trees, depth))
    return y, rows, z


def visits_by_row(rows: mx.array, n_rows: int) -> tuple[mx.array, mx.array]:
    """Group the visits by row: `order` (T*P*L,) int32 lists the flat visit indices
    (token*P + tree)*L + level sorted by (row, token); row r's visits are
    order[offsets[r]:offsets[r+1]]. MLX ops, so it runs on any device."""
    flat = rows.reshape(-1).astype(mx.int32)
    m = flat.size
    # Unique keys make the order within a row (token order) independent of sort stability.
    key_dtype = mx.int32 if n_rows * m < 2**31 else mx.int64
    key = flat.astype(key_dtype) * m + mx.arange(m, dtype=key_dtype)
    order = mx.argsort(key).astype(mx.int32)
    counts = mx.zeros((n_rows,), dtype=mx.int32).at[flat].add(1)
    offsets = mx.concatenate([mx.zeros((1,), dtype=mx.int32), mx.cumsum(counts)])
    return order, offsets


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
    n_rows = trees * _n_nodes(depth)
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
    order, offsets = visits_by_row(rows, n_rows)
    row_inputs = [x, dy, act, dz, order, offsets]
    d_w_in, d_b_in, d_w_out_t = launch(
        BACKWARD_ROWS, row_inputs, BACKWARD_ROWS.configure(row_inputs, trees, depth)
    )
    return dx, d_w_in, d_b_in, d_w_out_t
