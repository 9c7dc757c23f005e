"""Fast feedforward (FFF) layer: the paper's equations in NumPy.

A layer holds P balanced binary trees of depth D. Tree k owns rows k*n .. k*n+n-1
of ``w_in`` (and the same columns of ``w_out``), n = 2**(D+1) - 1, nodes numbered
in level order: root 0, children of node m are 2m+1 (left) and 2m+2 (right).

Shapes: x (..., H); w_in (P*n, H); b_in (P*n,); w_out (H, P*n), the layout of the
checkpoint's ``linear_out.weight``.
"""

from __future__ import annotations

import math

import numpy as np

_erf = np.frompyfunc(math.erf, 1, 1)


def gelu(z: np.ndarray) -> np.ndarray:
    """Exact GELU, z * Phi(z), evaluated in float64 and returned in z's dtype."""
    z64 = np.asarray(z, dtype=np.float64)
    return (0.5 * z64 * (1.0 + _erf(z64 / math.sqrt(2.0)).astype(np.float64))).astype(
        np.result_type(z, np.float32)
    )


def gelu_grad(z: np.ndarray) -> np.ndarray:
    """d gelu / dz = Phi(z) + z * phi(z)."""
    z64 = np.asarray(z, dtype=np.float64)
    cdf = 0.5 * (1.0 + _erf(z64 / math.sqrt(2.0)).astype(np.float64))
    pdf = np.exp(-0.5 * z64 * z64) / math.sqrt(2.0 * math.pi)
    return (cdf + z64 * pdf).astype(np.result_type(z, np.float32))


def n_nodes(depth: int) -> int:
    """Nodes in one balanced tree of the given depth (depth 0 is a single neuron)."""
    return 2 ** (depth + 1) - 1


def child(node: np.ndarray, z: np.ndarray) -> np.ndarray:
    """One routing step: right child if the logit is strictly positive, else left."""
    return 2 * node + 1 + (z > 0)


def descend(x, w_in, b_in, trees: int, depth: int):
    """Hard descent. Returns (paths, z): paths (..., P, D+1) within-tree node ids,
    z (..., P, D+1) the logits of the visited nodes. Only visited rows are read."""
    n = n_nodes(depth)
    lead = x.shape[:-1]
    node = np.zeros(lead + (trees,), dtype=np.int64)
    offset = np.arange(trees) * n
    paths, logits = [], []
    for _level in range(depth + 1):
        rows = offset + node                                   # (..., P)
        z = np.einsum("...ph,...h->...p", w_in[rows], x) + b_in[rows]
        paths.append(node)
        logits.append(z)
        node = child(node, z)
    return np.stack(paths, -1), np.stack(logits, -1)


def global_rows(paths, trees: int, depth: int):
    """Within-tree node ids (..., P, D+1) -> rows of w_in: tree k's node m is row k*n + m."""
    return paths + (np.arange(trees) * n_nodes(depth))[:, None]


def fff_descent(x, w_in, b_in, w_out, trees: int, depth: int):
    """Conditional FFF: y = sum over visited nodes of gelu(z_node) * w_out[:, node]."""
    paths, z = descend(x, w_in, b_in, trees, depth)
    cols = w_out.T[global_rows(paths, trees, depth)]              # (..., P, D+1, H)
    return np.einsum("...pl,...plh->...h", gelu(z), cols).astype(x.dtype)


def visited_mask(x, w_in, b_in, trees: int, depth: int) -> np.ndarray:
    """0/1 mask over all P*n nodes: 1 where the token's descent visits the node."""
    paths, _ = descend(x, w_in, b_in, trees, depth)
    rows = global_rows(paths, trees, depth)
    mask = np.zeros(x.shape[:-1] + (trees * n_nodes(depth),), dtype=x.dtype)
    np.put_along_axis(mask, rows.reshape(x.shape[:-1] + (-1,)), 1, axis=-1)
    return mask


def fff_dense(x, w_in, b_in, w_out, trees: int, depth: int):
    """The original computation: every logit, GELU on all, times the visited mask."""
    z = x @ w_in.T + b_in
    return ((gelu(z) * visited_mask(x, w_in, b_in, trees, depth)) @ w_out.T).astype(x.dtype)


def fff_descent_vjp(x, w_in, b_in, w_out, trees: int, depth: int, dy):
    """Gradients of sum(dy * fff(x)) w.r.t. (x, w_in, b_in, w_out): the masked-dense
    gradients, which reach only visited rows; routing carries no gradient."""
    paths, z = descend(x, w_in, b_in, trees, depth)
    rows = global_rows(paths, trees, depth).reshape(-1)            # (T*P*(D+1),)
    H = x.shape[-1]
    xf, dyf = x.reshape(-1, H), dy.reshape(-1, H)
    zf = z.reshape(xf.shape[0], -1)                                # (T, P*(D+1))
    per_token = zf.shape[1]
    tok = np.repeat(np.arange(xf.shape[0]), per_token)
    a = gelu(zf).reshape(-1)
    dz = (np.einsum("th,th->t", dyf[tok], w_out.T[rows]) * gelu_grad(zf).reshape(-1))
    d_w_out_t = np.zeros_like(w_out.T)
    np.add.at(d_w_out_t, rows, a[:, None] * dyf[tok])
    d_w_in = np.zeros_like(w_in)
    np.add.at(d_w_in, rows, dz[:, None] * xf[tok])
    d_b_in = np.zeros_like(b_in)
    np.add.at(d_b_in, rows, dz)
    dx = np.zeros_like(xf)
    np.add.at(dx, tok, dz[:, None] * w_in[rows])
    return dx.reshape(x.shape), d_w_in, d_b_in, d_w_out_t.T
