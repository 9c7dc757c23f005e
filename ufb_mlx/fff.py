"""Fast feedforward (FFF) layer in MLX: the original masked-dense computation and the
conditional one, forward and backward. Same names as ``ufb_ref.fff``.

Shapes: x (..., H); w_in (P*n, H); b_in (P*n,); w_out (H, P*n) as in the checkpoint.
``rows`` are global row ids k*n + node of the visited nodes, (T, P, D+1) int32, and ``z``
their logits, (T, P, D+1) float32.

The conditional path splits each tree at ``top`` levels: the 2^top - 1 nodes of the top
levels are few, so one small matmul computes all their logits (and their gradients are
small matmuls too); below them each token reads only its own rows by gather, and the
backward scatter-adds into only those rows. Either way exactly the visited neurons
contribute, so the result is the masked-dense function and gradient.
"""

from __future__ import annotations

from functools import lru_cache

import mlx.core as mx

TOP_LEVELS = 7  # levels computed as a small matmul; 127 rows per tree (DESIGN.md sec. 5)


def n_nodes(depth: int) -> int:
    return 2 ** (depth + 1) - 1


def gelu(z):
    """Exact (erf) GELU, as the original's torch.nn.GELU()."""
    return z * (1 + mx.erf(z / 2**0.5)) / 2


def gelu_grad(z):
    return (1 + mx.erf(z / 2**0.5)) / 2 + z * mx.exp(-0.5 * z * z) * (2 * 3.141592653589793) ** -0.5


def child(node, z):
    """Right child when the logit is strictly positive; z == 0 goes left."""
    return 2 * node + 1 + (z > 0).astype(node.dtype)


def _top_split(depth: int, top: int) -> int:
    return max(0, min(depth + 1, top))


def _top_index(trees: int, depth: int, top: int):
    """Global rows of the top-level nodes of every tree, tree-major: (P * (2^top - 1),)."""
    m = 2**top - 1
    return (mx.arange(trees)[:, None] * n_nodes(depth) + mx.arange(m)[None, :]).reshape(-1)


def _descend(x, w_in, b_in, trees, depth, top):
    """Routing of a (T, H) float32 batch. Returns rows, z, and for the top part the full
    top logits z_top (T, P, m) and the visited 0/1 mask (T, P, m)."""
    T = x.shape[0]
    n, m = n_nodes(depth), 2**top - 1
    offset = (mx.arange(trees, dtype=mx.int32) * n)[None, :]
    node = mx.zeros((T, trees), dtype=mx.int32)
    rows, zs = [], []
    z_top = mask_top = None
    if top:
        idx = _top_index(trees, depth, top)
        z_top = (x @ w_in[idx].T + b_in[idx]).reshape(T, trees, m)
        mask_top = mx.zeros((T, trees, m), dtype=x.dtype)
        ar = mx.arange(m, dtype=mx.int32)
        for _ in range(top):
            z = mx.take_along_axis(z_top, node[..., None], axis=-1)[..., 0]
            mask_top = mask_top + (ar == node[..., None]).astype(x.dtype)
            rows.append(offset + node)
            zs.append(z)
            node = child(node, z)
    for _ in range(top, depth + 1):
        r = offset + node                                             # (T, P)
        z = (w_in[r] @ x[:, :, None])[..., 0] + b_in[r]
        rows.append(r)
        zs.append(z)
        node = child(node, z)
    rows = mx.stop_gradient(mx.stack(rows, -1))
    return rows, mx.stack(zs, -1), z_top, mask_top


def descend(x, w_in, b_in, trees: int, depth: int, top: int | None = None):
    """Hard descent: (rows (..., P, D+1) global ids, z (..., P, D+1) visited logits)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).astype(mx.float32)
    rows, z, _, _ = _descend(x2, w_in.astype(mx.float32), b_in.astype(mx.float32), trees, depth,
                             _top_split(depth, TOP_LEVELS if top is None else top))
    return rows.reshape(*lead, trees, depth + 1), z.reshape(*lead, trees, depth + 1)


@lru_cache(maxsize=None)
def _conditional(trees: int, depth: int, top: int):
    """The conditional FFF as an mx.custom_function for fixed (P, D, top), in float32.
    Outputs (y, rows, z, z_top, mask_top); the extra outputs let the VJP reuse routing."""
    n, m = n_nodes(depth), 2**top - 1
    idx = _top_index(trees, depth, top) if top else None

    @mx.custom_function
    def f(x, w_in, b_in, w_out):
        rows, z, z_top, mask_top = _descend(x, w_in, b_in, trees, depth, top)
        T = x.shape[0]
        y = mx.zeros_like(x)
        if top:
            a_top = (gelu(z_top) * mask_top).reshape(T, trees * m)
            y = a_top @ w_out[:, idx].T
        if top <= depth:
            r, zb = rows[..., top:], z[..., top:]                      # (T, P, L)
            cols = w_out.T[r.reshape(T, -1)]                           # (T, P*L, H)
            y = y + (gelu(zb).reshape(T, 1, -1) @ cols)[:, 0]
        if not top:
            mask_top = z_top = mx.zeros((T, trees, 0), x.dtype)
        return y, rows, z, z_top, mask_top

    @f.vjp
    def f_vjp(primals, cotangents, outputs):
        x, w_in, b_in, w_out = primals
        dy = cotangents[0]
        _, rows, z, z_top, mask_top = outputs
        T, H = x.shape
        dx = mx.zeros_like(x)
        d_w_in = mx.zeros_like(w_in)
        d_b_in = mx.zeros_like(b_in)
        d_w_out_t = mx.zeros((w_out.shape[1], H), dtype=w_out.dtype)
        if top:
            a_top = (gelu(z_top) * mask_top).reshape(T, trees * m)
            dz_top = ((dy @ w_out[:, idx]).reshape(T, trees, m) * mask_top * gelu_grad(z_top)).reshape(T, -1)
            dx = dz_top @ w_in[idx]
            d_w_in = d_w_in.at[idx].add(dz_top.T @ x)
            d_b_in = d_b_in.at[idx].add(dz_top.sum(0))
            d_w_out_t = d_w_out_t.at[idx].add(a_top.T @ dy)
        if top <= depth:
            r = rows[..., top:].reshape(T, -1)                          # (T, K)
            zb = z[..., top:].reshape(T, -1)
            cols = w_out.T[r]                                          # (T, K, H)
            dz = (cols @ dy[:, :, None])[..., 0] * gelu_grad(zb)       # (T, K)
            w_rows = w_in[r]                                           # (T, K, H)
            dx = dx + (dz[:, None, :] @ w_rows)[:, 0]
            rf = r.reshape(-1)
            d_w_in = d_w_in.at[rf].add((dz[..., None] * x[:, None, :]).reshape(-1, H))
            d_b_in = d_b_in.at[rf].add(dz.reshape(-1))
            d_w_out_t = d_w_out_t.at[rf].add((gelu(zb)[..., None] * dy[:, None, :]).reshape(-1, H))
        return dx, d_w_in, d_b_in, d_w_out_t.T

    return f


def fff_conditional(x, w_in, b_in, w_out, trees: int, depth: int, top: int | None = None):
    """Conditional FFF: only the D+1 visited neurons per token and tree are computed,
    forward and backward. Accumulates in float32; returns x's dtype."""
    lead, H = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, H)
    f32 = mx.float32
    f = _conditional(trees, depth, _top_split(depth, TOP_LEVELS if top is None else top))
    y = f(x2.astype(f32), w_in.astype(f32), b_in.astype(f32), w_out.astype(f32))[0]
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
