"""Fast feedforward (FFF) layer in MLX: the original masked-dense computation and the
conditional one, forward and backward. Same names as ``ufb_ref.fff``.

Shapes: x (..., H); w_in (P*n, H); b_in (P*n,); w_out (H, P*n) as in the checkpoint.
``rows`` are global row ids k*n + node of the visited nodes, (T, P, D+1) int32, and ``z``
their logits, (T, P, D+1) float32.

The conditional path cuts each tree after ``top`` levels. The m = 2^top - 1 top nodes are
few, so one small matmul computes all their logits, and the route through them is found
in one step: of the 2^top exits below the top part, the reached one is the only exit
whose path agrees with every decision on it (a matmul of the decisions with a +-1 path
table, then argmax). Below the top part each token reads only its own rows by gather,
and the backward sums into only those rows (visits sorted by row, one segmented matmul).
Either way exactly the visited neurons contribute: the result is the masked-dense
function and gradient. Where Metal is available the same custom_function runs the
kernels of metal/ instead (see metal_kernels.py).

Reading rows of ``w_out`` needs it transposed, (P*n, H) row-major; ``load()`` stores
``linear_out.weight`` as a transposed view of such a buffer, so ``mx.contiguous(w_out.T)``
is free at inference (after an optimizer step it is one copy per layer).
"""

from __future__ import annotations

from functools import lru_cache

import mlx.core as mx
import numpy as np

from ufb_ref.fff import n_nodes

from . import backend as backend_lib
from . import cpu_kernels, metal_kernels

# Levels computed as one small matmul: 63 rows per tree. 6 measured faster than 7 at
# 128-8192 tokens (2026-11, 2-core Xeon VM, MLX CPU with OpenBLAS); the best split depends
# on the machine's matmul and gather speeds.
TOP_LEVELS = 6
COMPILE_MAX_TOKENS = 256  # up to this many tokens the forward runs as a compiled graph


def gelu(z):
    """Exact (erf) GELU, as the original's torch.nn.GELU()."""
    return z * (1 + mx.erf(z * 0.7071067811865476)) * 0.5


def fast_gelu(z, impl: str | None = None):
    """The same GELU, through the extension's vectorised primitive where the implementation
    ``impl`` (resolved by ufb_mlx.backend.resolve; None: "auto" resolved at this call) is
    "cpu" (a few ulp; MLX's erf costs ~42 ns an element on the CPU), else ``gelu``. Dense
    layers use it, so no dense baseline is slowed by its activation."""
    if (impl or backend_lib.resolve("auto")) == "cpu":
        return cpu_kernels.gelu(z)
    return gelu(z)


def gelu_grad(z):
    return (1 + mx.erf(z * 0.7071067811865476)) * 0.5 + z * mx.exp(-0.5 * z * z) * 0.3989422804014327


def child(node, z):
    """Right child when the logit is strictly positive; z == 0 goes left."""
    return 2 * node + 1 + (z > 0).astype(node.dtype)


@lru_cache(maxsize=None)
def _exit_tables(top: int):
    """Tables of a tree's top part (m = 2^top - 1 nodes, E = 2^top exits below it):
    sign (m, E): +1 where exit e's path turns right at node j, -1 left, 0 off the path;
    n_left (E,): left turns on each path; path (E, top): the nodes on each path;
    on_path (E, m): 0/1, the nodes on each path."""
    m, E = 2**top - 1, 2**top
    sign = np.zeros((m, E), np.float32)
    path = np.zeros((E, top), np.int32)
    for e in range(E):
        node = m + e
        for level in range(top - 1, -1, -1):
            parent = (node - 1) // 2
            sign[parent, e] = 1.0 if node == 2 * parent + 2 else -1.0
            path[e, level] = parent
            node = parent
    n_left = (sign < 0).sum(0).astype(np.float32)
    return mx.array(sign), mx.array(n_left), mx.array(path), mx.array(np.abs(sign.T))


def _top_rows(w, trees: int, depth: int, m: int):
    """Rows of the top m nodes of every tree, (P*m, H); a plain slice when P == 1."""
    if trees == 1:
        return w[:m]
    return w.reshape(trees, n_nodes(depth), *w.shape[1:])[:, :m].reshape(trees * m, *w.shape[1:])


def _route(x, w_in, b_in, trees, depth, top):
    """Routing of a (T, H) float32 batch: rows (T, P, D+1), z (T, P, D+1), and for the
    top part its logits z_top (T, P, m) and 0/1 path mask (T, P, m)."""
    T = x.shape[0]
    n, m = n_nodes(depth), 2**top - 1
    offset = (mx.arange(trees, dtype=mx.int32) * n)[None, :]
    rows, zs = [], []
    z_top = on_path = None
    node = mx.zeros((T, trees), dtype=mx.int32)
    if top:
        sign, n_left, path, path_mask = _exit_tables(top)
        z_top = (x @ _top_rows(w_in, trees, depth, m).T + _top_rows(b_in, trees, depth, m)).reshape(T, trees, m)
        agree = (z_top > 0).astype(mx.float32) @ sign + n_left       # (T, P, E): == top only on the route
        exit_ = mx.argmax(agree, axis=-1).astype(mx.int32)           # (T, P)
        top_nodes = path[exit_]                                      # (T, P, top)
        on_path = path_mask[exit_]                                   # (T, P, m)
        rows.append(offset[..., None] + top_nodes)
        zs.append(mx.take_along_axis(z_top, top_nodes, axis=-1))
        node = m + exit_
    for _ in range(top, depth + 1):
        r = offset + node                                            # (T, P)
        z = (w_in[r] @ x[:, :, None])[..., 0] + b_in[r]
        rows.append(r[..., None])
        zs.append(z[..., None])
        node = child(node, z)
    rows = mx.stop_gradient(mx.concatenate(rows, -1))
    return rows, mx.stop_gradient(mx.concatenate(zs, -1)), z_top, on_path


def _split(depth: int, top: int | None) -> int:
    return max(0, min(depth + 1, TOP_LEVELS if top is None else top))


def descend(x, w_in, b_in, trees: int, depth: int, top: int | None = None):
    """Hard descent, as ``ufb_ref.fff.descend``: (paths (..., P, D+1) within-tree node ids
    visited per level, z (..., P, D+1) their logits)."""
    lead = x.shape[:-1]
    f32 = mx.float32
    rows, z, _, _ = _route(x.reshape(-1, x.shape[-1]).astype(f32), w_in.astype(f32), b_in.astype(f32),
                           trees, depth, _split(depth, top))
    paths = rows - (mx.arange(trees, dtype=mx.int32) * n_nodes(depth))[None, :, None]
    return paths.reshape(*lead, trees, depth + 1), z.reshape(*lead, trees, depth + 1)


@lru_cache(maxsize=None)
def _conditional(trees: int, depth: int, top: int):
    """The conditional FFF as an mx.custom_function for fixed (P, D, top), in float32, on
    (x, w_in, b_in, w_out_t). Extra outputs carry the routing to the VJP."""
    n, m = n_nodes(depth), 2**top - 1

    def bottom(rows, z):
        return rows[..., top:].reshape(rows.shape[0], -1), z[..., top:].reshape(z.shape[0], -1)

    @mx.custom_function
    def f(x, w_in, b_in, w_out_t):
        T = x.shape[0]
        rows, z, z_top, on_path = _route(x, w_in, b_in, trees, depth, top)
        y = mx.zeros_like(x)
        if top:
            a_top = (gelu(z_top) * on_path).reshape(T, trees * m)
            y = a_top @ _top_rows(w_out_t, trees, depth, m)
        if top <= depth:
            r, zb = bottom(rows, z)                                   # (T, K)
            y = y + _combine_rows(gelu(zb), w_out_t, r)
        if not top:
            z_top = on_path = mx.zeros((T, trees, 0), x.dtype)
        return y, rows, z, z_top, on_path

    @f.vjp
    def f_vjp(primals, cotangents, outputs):
        x, w_in, b_in, w_out_t = primals
        dy = cotangents[0]
        _, rows, z, z_top, on_path = outputs
        T, H = x.shape
        dx = mx.zeros_like(x)
        grads_top = grads_bottom = None
        if top:
            w_top, w_out_t_top = _top_rows(w_in, trees, depth, m), _top_rows(w_out_t, trees, depth, m)
            a_top = (gelu(z_top) * on_path).reshape(T, trees * m)
            dz_top = ((dy @ w_out_t_top.T).reshape(T, trees, m) * on_path * gelu_grad(z_top)).reshape(T, -1)
            dx = dz_top @ w_top
            grads_top = (dz_top.T @ x, dz_top.sum(0), a_top.T @ dy)
        if top <= depth:
            r, zb = bottom(rows, z)                                    # (T, K)
            dz = _dot_rows(w_out_t, r, dy) * gelu_grad(zb)            # (T, K)
            dx = dx + _combine_rows(dz, w_in, r)
            # Row gradients of the rows below the top part, (P*(n-m), ...): sort the
            # visits by row and let one segmented matmul sum each row's segment. Unlike a
            # scatter-add this reads memory in order, and the sums are deterministic.
            local = ((r // n) * (n - m) + (r % n) - m).reshape(-1)
            grads_bottom = _segment_sums(local, trees * (n - m), mx.repeat(mx.arange(T), r.shape[1]),
                                         dz.reshape(-1), gelu(zb).reshape(-1), x, dy)
        return (dx,) + tuple(_assemble(t, b, trees, n, m) for t, b in zip(
            grads_top or (None,) * 3, grads_bottom or (None,) * 3))

    return f


# Gathering all K visited rows of a large batch at once makes a (T, K, H) temporary
# (126 MB at 8192 tokens): past this many elements, gather one visit column at a time.
GATHER_AT_ONCE_MAX = 2**22


def _combine_rows(coeff, table, r):
    """sum_k coeff[t, k] * table[r[t, k]]: (T, K), (N, H), (T, K) -> (T, H)."""
    T, K = r.shape
    if T * K * table.shape[1] <= GATHER_AT_ONCE_MAX:
        return (coeff[:, None, :] @ table[r])[:, 0]
    out = coeff[:, :1] * table[r[:, 0]]
    for k in range(1, K):
        out = out + coeff[:, k:k + 1] * table[r[:, k]]
    return out


def _dot_rows(table, r, v):
    """table[r[t, k]] . v[t]: (N, H), (T, K), (T, H) -> (T, K)."""
    T, K = r.shape
    if T * K * table.shape[1] <= GATHER_AT_ONCE_MAX:
        return (table[r] @ v[:, :, None])[..., 0]
    return mx.stack([(table[r[:, k]] * v).sum(-1) for k in range(K)], axis=1)


def visits_by_row(rows: mx.array, n_rows: int) -> tuple[mx.array, mx.array]:
    """Group the visits by row: `order` (m,) int32 lists the flat indices of `rows` (for
    (T, P, L) rows: (token*P + tree)*L + level) sorted by (row, index), so a row's visits
    stay in token order; row r's visits are order[offsets[r]:offsets[r+1]], offsets
    (n_rows + 1,) int32. MLX ops, so it runs on any device; the Metal backward
    (kernels.py) and the segment sums below share it, csrc/fff_cpu.cpp has its C++ twin."""
    m = rows.size
    if m >= 2**31:  # order and offsets are int32, like the kernels' visit indices
        raise ValueError(f"{m} visits do not fit int32 visit indices (at most 2^31 - 1): split the batch")
    flat = rows.reshape(-1).astype(mx.int32)
    # Unique keys make the order within a row (token order) independent of sort stability.
    key_dtype = mx.int32 if n_rows * m < 2**31 else mx.int64
    key = flat.astype(key_dtype) * m + mx.arange(m, dtype=key_dtype)
    order = mx.argsort(key).astype(mx.int32)
    counts = mx.zeros((n_rows,), dtype=mx.int32).at[flat].add(1)
    offsets = mx.concatenate([mx.zeros((1,), dtype=mx.int32), mx.cumsum(counts)])
    return order, offsets


def _segment_sums(rows, n_rows, tokens, dz, a, x, dy):
    """For visits k = (token t_k, row r_k) with coefficients dz_k and a_k:
    d_w_in[r] = sum dz_k x[t_k], d_b_in[r] = sum dz_k, d_w_out_t[r] = sum a_k dy[t_k]."""
    order, offsets = visits_by_row(rows, n_rows)
    segments = mx.stack([offsets[:-1], offsets[1:]], axis=-1)
    tok = tokens[order]
    x1 = mx.concatenate([x[tok], mx.ones((tok.shape[0], 1), dtype=x.dtype)], axis=1)
    d_in = mx.segmented_mm(dz[order][None, :], x1, segments)[:, 0]   # (n_rows, H + 1)
    d_out = mx.segmented_mm(a[order][None, :], dy[tok], segments)[:, 0]
    return d_in[:, :-1], d_in[:, -1], d_out


def _assemble(top_part, bottom_part, trees, n, m):
    """Per-tree rows: [top m rows | bottom n - m rows] -> (P*n, ...)."""
    if top_part is None:
        return bottom_part
    if bottom_part is None:
        return top_part
    tail = top_part.shape[1:]
    return mx.concatenate([top_part.reshape(trees, m, *tail),
                           bottom_part.reshape(trees, n - m, *tail)], axis=1).reshape(trees * n, *tail)


@lru_cache(maxsize=None)
def _conditional_metal(trees: int, depth: int):
    """The same function on the GPU: the fused descent kernel forward, the two backward
    kernels (per token, then per visited row) in the VJP. Inputs stay in their dtype; the
    kernels accumulate in float32."""

    @mx.custom_function
    def f(x, w_in, b_in, w_out_t):
        return metal_kernels.fff_forward(x, w_in, b_in, w_out_t, trees, depth)

    @f.vjp
    def f_vjp(primals, cotangents, outputs):
        x, w_in, b_in, w_out_t = primals
        _, rows, z = outputs
        grads = metal_kernels.fff_backward(x, w_in, w_out_t, rows, z, cotangents[0].astype(x.dtype))
        return tuple(g.astype(p.dtype) for g, p in zip(grads, primals))

    return f


def fff_conditional(x, w_in, b_in, w_out, trees: int, depth: int, top: int | None = None,
                    backend: str = "auto"):
    """Conditional FFF: only the D+1 visited neurons per token and tree are computed,
    forward and backward. Accumulates in float32; returns x's dtype.

    ``backend`` (see ufb_mlx.backend): "auto" picks by the device of the current stream
    (GPU with Metal: the kernels of metal/; CPU: the fused C++ primitive when built; else
    MLX ops); "ops", "cpu" or "metal" name one implementation. ``top`` applies to "ops".
    The backend is resolved at each call; a model resolves it once (``run_conditional``)."""
    return run_conditional(backend_lib.resolve(backend), x, w_in, b_in, w_out, trees, depth, top,
                           place=backend != "auto")


def run_conditional(impl: str, x, w_in, b_in, w_out, trees: int, depth: int, top: int | None = None,
                    place: bool = True):
    """``fff_conditional`` by an implementation already resolved (ufb_mlx.backend.resolve),
    without deciding again; ``place``: on that implementation's own device (stream_for),
    which is the default device's when "auto" resolved it there."""
    if not x.size:
        impl = "ops"
    device = backend_lib.stream_for(impl) if place else None
    if device is None:
        return _IMPLEMENTATIONS[impl](x, w_in, b_in, w_out, trees, depth, top)
    with mx.stream(device):
        return _IMPLEMENTATIONS[impl](x, w_in, b_in, w_out, trees, depth, top)


def _fff_metal(x, w_in, b_in, w_out, trees, depth, top):
    lead, H = x.shape[:-1], x.shape[-1]
    dt = x.dtype
    w_out_t = mx.contiguous(w_out.T).astype(dt)
    y = _conditional_metal(trees, depth)(x.reshape(-1, H), w_in.astype(dt), b_in.astype(dt), w_out_t)[0]
    return y.reshape(*lead, H)


def _fff_cpu(x, w_in, b_in, w_out, trees, depth, top):
    lead, H = x.shape[:-1], x.shape[-1]
    return cpu_kernels.fff_conditional(x.reshape(-1, H), w_in, b_in, w_out, trees, depth).reshape(*lead, H)


def _fff_ops(x, w_in, b_in, w_out, trees, depth, top):
    lead, H = x.shape[:-1], x.shape[-1]
    f32 = mx.float32
    x2 = x.reshape(-1, H).astype(f32)
    w_out_t = mx.contiguous(w_out.T).astype(f32)
    T = x2.shape[0]
    if 0 < T <= COMPILE_MAX_TOKENS:
        # Few tokens: much of the time is op dispatch, which a compiled graph cuts. Pad to
        # a bucket (powers of two up to 32, then multiples of 32) so that each bucket
        # compiles once and padding adds little work (zero rows route harmlessly).
        bucket = 1 << (T - 1).bit_length() if T <= 32 else -(-T // 32) * 32
        if bucket != T:
            x2 = mx.concatenate([x2, mx.zeros((bucket - T, H), dtype=f32)])
        y = _compiled(trees, depth, _split(depth, top))(x2, w_in.astype(f32), b_in.astype(f32), w_out_t)[:T]
    else:
        y = _conditional(trees, depth, _split(depth, top))(x2, w_in.astype(f32), b_in.astype(f32), w_out_t)[0]
    return y.astype(x.dtype).reshape(*lead, H)


_IMPLEMENTATIONS = {"metal": _fff_metal, "cpu": _fff_cpu, "ops": _fff_ops}


@lru_cache(maxsize=None)
def _compiled(trees: int, depth: int, top: int):
    f = _conditional(trees, depth, top)
    return mx.compile(lambda x, w_in, b_in, w_out_t: f(x, w_in, b_in, w_out_t)[0])


def visited_mask(x, w_in, b_in, trees: int, depth: int, z=None):
    """0/1 (..., P*n) mask of the visited nodes, routed on all logits ``z`` (computed
    when not given); carries no gradient."""
    if z is None:
        z = x @ w_in.T + b_in
    z = mx.stop_gradient(z)
    lead = z.shape[:-1]
    n = n_nodes(depth)
    zt = z.reshape(-1, trees, n)
    node = mx.zeros((zt.shape[0], trees, 1), dtype=mx.int32)
    visited = []
    for _ in range(depth + 1):
        visited.append(node)
        node = child(node, mx.take_along_axis(zt, node, axis=-1))
    visited = mx.concatenate(visited, axis=-1)                       # (T, P, D+1)
    mask = mx.put_along_axis(mx.zeros(zt.shape, dtype=x.dtype), visited,
                             mx.ones(visited.shape, dtype=x.dtype), axis=-1)
    return mask.reshape(*lead, trees * n)


def fff_dense(x, w_in, b_in, w_out, trees: int, depth: int, impl: str | None = None):
    """The original computation: every logit, GELU on all (``fast_gelu`` by ``impl``),
    times the visited mask."""
    z = x @ w_in.T + b_in
    return (fast_gelu(z, impl) * visited_mask(x, w_in, b_in, trees, depth, z)) @ w_out.T
