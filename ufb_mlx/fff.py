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
and the backward scatter-adds into only those rows. Either way exactly the visited
neurons contribute: the result is the masked-dense function and gradient.

Reading rows of ``w_out`` needs it transposed, (P*n, H) row-major; ``load()`` stores
``linear_out.weight`` as a transposed view of such a buffer, so ``mx.contiguous(w_out.T)``
is free at inference (after an optimizer step it is one copy per layer).
"""

from __future__ import annotations

from functools import lru_cache

import mlx.core as mx
import numpy as np

TOP_LEVELS = 7  # levels computed as one small matmul: 127 rows per tree (DESIGN.md sec. 5)


def n_nodes(depth: int) -> int:
    return 2 ** (depth + 1) - 1


def gelu(z):
    """Exact (erf) GELU, as the original's torch.nn.GELU()."""
    return z * (1 + mx.erf(z * 0.7071067811865476)) * 0.5


def gelu_grad(z):
    return (1 + mx.erf(z * 0.7071067811865476)) * 0.5 + z * mx.exp(-0.5 * z * z) * 0.3989422804014327


def child(node, z):
    """Right child when the logit is strictly positive; z == 0 goes left."""
    return 2 * node + 1 + (z > 0).astype(node.dtype)


@lru_cache(maxsize=None)
def _exit_tables(top: int):
    """Tables of a tree's top part (m = 2^top - 1 nodes, E = 2^top exits below it):
    sign (m, E): +1 where exit e's path turns right at node j, -1 left, 0 off the path;
    n_left (E,): left turns on each path; path (E, top): the nodes on each path."""
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
    return mx.array(sign), mx.array(n_left), mx.array(path)


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
        sign, n_left, path = _exit_tables(top)
        z_top = (x @ _top_rows(w_in, trees, depth, m).T + _top_rows(b_in, trees, depth, m)).reshape(T, trees, m)
        agree = (z_top > 0).astype(mx.float32) @ sign + n_left       # (T, P, E): == top only on the route
        exit_ = mx.argmax(agree, axis=-1).astype(mx.int32)           # (T, P)
        top_nodes = path[exit_]                                      # (T, P, top)
        on_path = (mx.abs(sign.T)[exit_])                            # (T, P, m)
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
    """Hard descent: (rows (..., P, D+1) global ids, z (..., P, D+1) visited logits)."""
    lead = x.shape[:-1]
    f32 = mx.float32
    rows, z, _, _ = _route(x.reshape(-1, x.shape[-1]).astype(f32), w_in.astype(f32), b_in.astype(f32),
                           trees, depth, _split(depth, top))
    return rows.reshape(*lead, trees, depth + 1), z.reshape(*lead, trees, depth + 1)


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
            y = y + (gelu(zb)[:, None, :] @ w_out_t[r])[:, 0]
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
            dz = (w_out_t[r] @ dy[:, :, None])[..., 0] * gelu_grad(zb)  # (T, K)
            dx = dx + (dz[:, None, :] @ w_in[r])[:, 0]
            # Scatter into the rows below the top part only: (P, n - m) of them.
            local = ((r // n) * (n - m) + (r % n) - m).reshape(-1)
            zeros = mx.zeros((trees * (n - m), H), dtype=x.dtype)
            grads_bottom = (zeros.at[local].add((dz[..., None] * x[:, None, :]).reshape(-1, H)),
                            mx.zeros((trees * (n - m),), dtype=x.dtype).at[local].add(dz.reshape(-1)),
                            zeros.at[local].add((gelu(zb)[..., None] * dy[:, None, :]).reshape(-1, H)))
        return (dx,) + tuple(_assemble(t, b, trees, n, m) for t, b in zip(
            grads_top or (None,) * 3, grads_bottom or (None,) * 3))

    return f


def _assemble(top_part, bottom_part, trees, n, m):
    """Per-tree rows: [top m rows | bottom n - m rows] -> (P*n, ...)."""
    if top_part is None:
        return bottom_part
    if bottom_part is None:
        return top_part
    tail = top_part.shape[1:]
    return mx.concatenate([top_part.reshape(trees, m, *tail),
                           bottom_part.reshape(trees, n - m, *tail)], axis=1).reshape(trees * n, *tail)


def fff_conditional(x, w_in, b_in, w_out, trees: int, depth: int, top: int | None = None):
    """Conditional FFF: only the D+1 visited neurons per token and tree are computed,
    forward and backward. Accumulates in float32; returns x's dtype."""
    lead, H = x.shape[:-1], x.shape[-1]
    f32 = mx.float32
    w_out_t = mx.contiguous(w_out.T).astype(f32)
    f = _conditional(trees, depth, _split(depth, top))
    y = f(x.reshape(-1, H).astype(f32), w_in.astype(f32), b_in.astype(f32), w_out_t)[0]
    return y.astype(x.dtype).reshape(*lead, H)


def visited_mask(x, w_in, b_in, trees: int, depth: int):
    """0/1 (..., P*n) mask of the visited nodes, from all logits; carries no gradient."""
    z = mx.stop_gradient(x @ w_in.T + b_in)
    lead = z.shape[:-1]
    n = n_nodes(depth)
    zt = z.reshape(*lead, trees, n)
    node = mx.zeros((*lead, trees), dtype=mx.int32)
    ar = mx.arange(n, dtype=mx.int32)
    mask = mx.zeros(zt.shape, dtype=x.dtype)
    for _ in range(depth + 1):
        mask = mask + (ar == node[..., None]).astype(x.dtype)
        node = child(node, mx.take_along_axis(zt, node[..., None], axis=-1)[..., 0])
    return mask.reshape(*lead, trees * n)


def fff_dense(x, w_in, b_in, w_out, trees: int, depth: int):
    """The original computation: every logit, GELU on all, times the visited mask."""
    z = x @ w_in.T + b_in
    return (gelu(z) * visited_mask(x, w_in, b_in, trees, depth)) @ w_out.T
