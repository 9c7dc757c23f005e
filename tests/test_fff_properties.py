"""Property tests: every implementation of the FFF layer computes the same function and
the same gradient, for random trees, widths, shapes and dtypes.

Implementations: NumPy masked-dense and descent (float64: the ground truth), MLX
masked-dense, MLX conditional (with the top-level matmul split at random depths, so both
the matmul part and the gather/scatter part are exercised), and the Metal path of
``fff_conditional`` (the custom_function over the kernels in metal/, forward and VJP): on
the GPU on a Mac, else through the emulator (``ufb_mlx.metal_emu.metal_kernels`` decides).
The kernels take H, P and D as template constants, so each new shape is a compiler run:
the Metal draws pick their (P, D, H) from a fixed set and randomise everything else.

Routing near z = 0: two correct implementations may route a token differently when a
logit it decides on is within rounding of 0. Every comparison excuses exactly the tokens
whose float64 reference has some decision with |z| < eps (eps stated per dtype below)
and compares all the others tightly; logits that are exactly 0 are never excused: they
are built in on purpose (zero weight row and bias) and must go left everywhere. So that
the excuse cannot empty a comparison, the draws keep every decision out of the tie band:
each node's bias is chosen, top down, at least the largest eps away from -x.w of every
drawn token that reaches the node (``away_from_ties``), and every comparison asserts
that at least MIN_COMPARED of the tokens were compared.

Profiles: CI runs a fixed, derandomised set of examples (UFB_HYPOTHESIS_PROFILE=ci, the
default); UFB_HYPOTHESIS_PROFILE=long runs many more.
"""

from __future__ import annotations

import os
import mlx.core as mx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ufb_mlx import fff as mlx_fff
from ufb_mlx.check import UNIT, fff_forward_tolerance, fff_grad_tolerance
from ufb_mlx.check import TIE_EPS as EPS_COND
from ufb_mlx.check import near_ties as excused  # tokens with a decision within eps of 0
from ufb_mlx.metal_emu import metal_kernels
from ufb_ref import fff as ref_fff

settings.register_profile("ci", max_examples=40, derandomize=True, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=1000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("UFB_HYPOTHESIS_PROFILE", "ci"))

MX_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
# UNIT (unit roundoff per dtype: outputs returned in that dtype carry one rounding),
# EPS_COND (|z| below which a conditional path's routing may differ from float64's) and the
# conditional paths' tolerances are ufb_mlx.check's, which `python -m ufb_mlx.check` applies
# on a user's machine. The masked-dense path in half precision computes the logits in that
# precision: its error is about sqrt(H) * |x||w| * unit, hence the larger eps.
EPS_DENSE = {"float32": 1e-4, "float16": 0.05, "bfloat16": 0.4}


METAL_SHAPES = [(1, 3, 20), (2, 5, 37), (3, 0, 64)]  # (P, D, H), see the module docstring

# The draws put every routing decision outside the widest tie band (away_from_ties), so
# every token is compared; a comparison that excuses more than this fraction means the
# construction failed, and fails the test instead of passing on what is left.
MIN_COMPARED = 0.9
# Biases are multiples of 1/32 below 8 in magnitude: exact in bfloat16, float16 and
# float32, so rounding the inputs to the test dtype cannot move a decision into a tie.
BIAS_GRID, BIAS_MAX = 1 / 32, 8.0


def away_from_ties(x, w_in, b_in, trees: int, depth: int, margin: float, fixed) -> np.ndarray:
    """Biases, chosen node by node from the root down, so that every token of x (rows of
    (-1, H)) that reaches a node decides there with |x.w + b| >= margin: the drawn bias
    when it already is (on the grid), else the grid point nearest to it in a gap of the
    tokens' -x.w at least 2 * margin wide (beyond the extremes, all go one way, if no gap
    is). Nodes in `fixed` keep their bias (the exact-zero nodes: z == 0 is no tie)."""
    n = ref_fff.n_nodes(depth)
    b = np.round(np.clip(b_in, -BIAS_MAX / 2, BIAS_MAX / 2) / BIAS_GRID) * BIAS_GRID
    xs = x.reshape(-1, x.shape[-1])
    for tree in range(trees):
        at = np.zeros(len(xs), dtype=np.int64)  # node each token has reached in this tree
        for level in range(depth + 1):
            for node in range(2**level - 1, 2 ** (level + 1) - 1):
                r = tree * n + node
                here = at == node
                if not here.any() or r in fixed:
                    continue
                s = xs[here] @ w_in[r]
                if np.abs(s + b[r]).min() < margin:
                    edges = np.sort(-s)
                    lo = np.concatenate([[-BIAS_MAX], edges + margin])   # allowed intervals [lo, hi]
                    hi = np.concatenate([edges - margin, [BIAS_MAX]])
                    lo, hi = np.ceil(lo / BIAS_GRID) * BIAS_GRID, np.floor(hi / BIAS_GRID) * BIAS_GRID
                    ok = lo <= hi
                    if ok.any():
                        nearest = np.clip(b[r], lo[ok], hi[ok])  # per interval, the point nearest b
                        b[r] = nearest[np.argmin(np.abs(nearest - b[r]))]
            z = np.einsum("th,th->t", xs, w_in[tree * n + at]) + b[tree * n + at]
            at = 2 * at + np.where(z > 0, 2, 1)
    return b


@st.composite
def fff_problem(draw, shapes=None, dtypes=("float32", "float32", "float16", "bfloat16")):
    if shapes is None:
        trees, depth, hidden = draw(st.integers(1, 4)), draw(st.integers(0, 8)), draw(st.integers(1, 70))
    else:
        trees, depth, hidden = draw(st.sampled_from(shapes))
    lead = draw(st.sampled_from([(1,), (5,), (2, 3), (3, 1, 4)]))
    dtype = draw(st.sampled_from(dtypes))
    top = draw(st.one_of(st.none(), st.integers(0, depth + 2)))
    seed = draw(st.integers(0, 2**31 - 1))
    n_zero = draw(st.integers(0, 3))
    rng = np.random.default_rng(seed)
    n = ref_fff.n_nodes(depth)
    x = rng.normal(size=(*lead, hidden))
    w_in = rng.normal(size=(trees * n, hidden)) / np.sqrt(hidden)
    b_in = rng.normal(size=trees * n) * 0.1
    w_out = rng.normal(size=(hidden, trees * n)) / np.sqrt(depth + 1)
    # Nodes whose logit is exactly 0 for every token: they must route left everywhere.
    zero_nodes = rng.choice(trees * n, size=min(n_zero, trees * n), replace=False)
    w_in[zero_nodes] = 0.0
    b_in[zero_nodes] = 0.0
    # Round the inputs to the test dtype once, so every implementation sees the same values.
    x, w_in, w_out = [np.array(mx.array(a.astype(np.float32)).astype(MX_DTYPES[dtype]).astype(mx.float32))
                      .astype(np.float64) for a in (x, w_in, w_out)]
    b_in = away_from_ties(x, w_in, b_in, trees, depth, 1.01 * max(EPS_DENSE[dtype], EPS_COND), set(zero_nodes))
    return trees, depth, top, dtype, [x, w_in, b_in, w_out], rng.normal(size=(*lead, hidden))


def compared(keep: np.ndarray) -> np.ndarray:
    """keep (tokens,) bool, after asserting that enough tokens are compared."""
    assert keep.mean() >= MIN_COMPARED, f"only {keep.sum()} of {keep.size} tokens compared"
    return keep


def as_mx(a, dtype):
    return mx.array(a.astype(np.float32)).astype(MX_DTYPES[dtype])


def assert_close_on(got, want, keep, atol, what):
    got = np.asarray(got, dtype=np.float64).reshape(keep.shape[0], -1)
    want = np.asarray(want, dtype=np.float64).reshape(keep.shape[0], -1)
    err = np.abs(got - want)[keep]
    assert err.size == 0 or err.max() <= atol, f"{what}: max error {err.max():.3g} > {atol:.3g}"


@given(fff_problem())
def test_forward_agrees_across_implementations(problem):
    trees, depth, top, dtype, (x, w_in, b_in, w_out), _ = problem
    truth = ref_fff.fff_descent(x, w_in, b_in, w_out, trees, depth)
    dense_ref = ref_fff.fff_dense(x, w_in, b_in, w_out, trees, depth)
    np.testing.assert_allclose(dense_ref, truth, atol=1e-12, rtol=0)  # float64: same function

    scale = 1 + np.abs(truth).max()
    args = [as_mx(a, dtype) for a in (x, w_in, b_in, w_out)]
    cond = mlx_fff.fff_conditional(*args, trees, depth, top)
    assert cond.dtype == MX_DTYPES[dtype] and cond.shape == x.shape
    keep = compared(~excused(x, w_in, b_in, trees, depth, EPS_COND))
    # float32 accumulation error (~1e-6 relative here) plus one rounding to the output dtype.
    assert_close_on(np.array(cond.astype(mx.float32)), truth, keep, fff_forward_tolerance(truth, dtype), "conditional")

    dense = mlx_fff.fff_dense(*args, trees, depth)
    keep_d = compared(~excused(x, w_in, b_in, trees, depth, EPS_DENSE[dtype]))
    # The dense path works in the input dtype throughout: logits, GELU, and a sum over
    # all P*n nodes each carry that dtype's rounding.
    tol_d = scale * (1e-5 if dtype == "float32" else 40 * UNIT[dtype])
    assert_close_on(np.array(dense.astype(mx.float32)), truth, keep_d, tol_d, "masked-dense")

    # Routing itself, exactly, on the non-excused tokens; exact-zero logits went left.
    rows, z = mlx_fff.descend(*args[:3], trees, depth, top)
    paths, zref = ref_fff.descend(x, w_in, b_in, trees, depth)
    nodes = np.array(rows) % ref_fff.n_nodes(depth)
    flat = lambda a: a.reshape(keep.shape[0], -1)
    np.testing.assert_array_equal(flat(nodes)[keep], flat(paths)[keep])
    zero = flat(zref) == 0
    if zero[keep].any():
        nxt = flat(np.concatenate([paths[..., 1:], 2 * paths[..., -1:] + 1], -1))
        assert (nxt[keep][zero[keep]] == 2 * flat(paths)[keep][zero[keep]] + 1).all()


@given(fff_problem())
def test_gradients_agree_across_implementations(problem):
    trees, depth, top, dtype, (x, w_in, b_in, w_out), dy = problem
    if dtype != "float32":
        # Gradients are compared in float32: the half-precision forward is covered above,
        # and training keeps float32 master weights.
        dtype = "float32"
    want = ref_fff.fff_descent_vjp(x, w_in, b_in, w_out, trees, depth, dy)
    args = [as_mx(a, dtype) for a in (x, w_in, b_in, w_out)]
    cot = as_mx(dy, dtype)

    def grads(fn, *extra):
        loss = lambda *a: (fn(*a, trees, depth, *extra) * cot).sum()
        return [np.array(g) for g in mx.grad(loss, argnums=(0, 1, 2, 3))(*args)]

    cond = grads(mlx_fff.fff_conditional, top)
    dense = grads(mlx_fff.fff_dense)
    # Tokens near a routing tie would send their gradient to other rows: drop them from
    # the comparison entirely by recomputing every gradient with those tokens' dy zeroed.
    bad = ~compared(~excused(x, w_in, b_in, trees, depth, EPS_COND))
    if bad.any():
        dy = dy.reshape(bad.shape[0], -1).copy()
        dy[bad] = 0
        dy = dy.reshape(x.shape)
        want = ref_fff.fff_descent_vjp(x, w_in, b_in, w_out, trees, depth, dy)
        cot = as_mx(dy, dtype)
        cond = grads(mlx_fff.fff_conditional, top)
        dense = grads(mlx_fff.fff_dense)
    names = ("x", "w_in", "b_in", "w_out")
    for name, w, c, d in zip(names, want, cond, dense):
        assert c.shape == w.shape and d.shape == w.shape
        # float32 summation over at most T * P * (D+1) contributions of size ~1: 1e-5
        # relative to the gradient's scale, far below one misplaced contribution (~1).
        tol = fff_grad_tolerance(w)
        if name == "x":  # the excused tokens' input gradients are zeroed in dy, not in x
            keep = ~bad
            assert_close_on(c, w, keep, tol, "conditional dx")
            assert_close_on(d, w, keep, tol, "masked-dense dx")
            continue
        np.testing.assert_allclose(c, w, atol=tol, rtol=0, err_msg=f"conditional d{name}")
        np.testing.assert_allclose(d, w, atol=tol, rtol=0, err_msg=f"masked-dense d{name}")


def test_exact_zero_logit_goes_left_in_every_implementation():
    """A node with zero weights and bias has z == 0 exactly: the strict z > 0 rule sends
    every token left (node 1), in the reference, the conditional and the dense path."""
    H = 8
    x = np.random.default_rng(0).normal(size=(4, H))
    w_in = np.ones((7, H))
    w_in[0] = 0.0
    b_in = np.zeros(7)
    w_out = np.eye(H, 7)
    paths, z = ref_fff.descend(x, w_in, b_in, 1, 2)
    assert (z[..., 0] == 0).all() and (paths[..., 1] == 1).all()
    args = [mx.array(a.astype(np.float32)) for a in (x, w_in, b_in, w_out)]
    for top in (0, 1, 3):
        rows, _ = mlx_fff.descend(*args[:3], 1, 2, top)
        assert (np.array(rows)[..., 1] == 1).all()
    np.testing.assert_allclose(np.array(mlx_fff.fff_dense(*args, 1, 2)),
                               ref_fff.fff_descent(x, w_in, b_in, w_out, 1, 2), atol=1e-6)


@settings(max_examples=12)
@given(fff_problem(shapes=METAL_SHAPES))
def test_metal_path_agrees_with_reference(problem):
    """Forward in every dtype, gradients in float32, through the same custom_function the
    Mac runs. The kernels accumulate in float32 with their own erf (1e-7 relative), so
    the conditional tolerances apply."""
    trees, depth, _, dtype, (x, w_in, b_in, w_out), dy = problem
    truth = ref_fff.fff_descent(x, w_in, b_in, w_out, trees, depth)
    keep = compared(~excused(x, w_in, b_in, trees, depth, EPS_COND))
    args = [as_mx(a, dtype) for a in (x, w_in, b_in, w_out)]
    with metal_kernels():
        y = mlx_fff.fff_conditional(*args, trees, depth, backend="metal")
        assert y.dtype == MX_DTYPES[dtype] and y.shape == x.shape
        assert_close_on(np.array(y.astype(mx.float32)), truth, keep, fff_forward_tolerance(truth, dtype), "metal")
        if dtype != "float32":
            return
        dy = dy.reshape(keep.shape[0], -1).copy()
        dy[~keep] = 0  # tokens near a routing tie would send gradient to other rows
        dy = dy.reshape(x.shape)
        loss = lambda *a: (mlx_fff.fff_conditional(*a, trees, depth, backend="metal") * as_mx(dy, dtype)).sum()
        got = mx.grad(loss, argnums=(0, 1, 2, 3))(*args)
    want = ref_fff.fff_descent_vjp(x, w_in, b_in, w_out, trees, depth, dy)
    for name, g, w in zip(("x", "w_in", "b_in", "w_out"), got, want):
        tol = fff_grad_tolerance(w)
        if name == "x":
            assert_close_on(np.array(g), w, keep, tol, "metal dx")
        else:
            np.testing.assert_allclose(np.array(g), w, atol=tol, rtol=0, err_msg=f"metal d{name}")


def test_visits_by_row_groups_in_token_order_and_refuses_int32_overflow():
    """The one grouping routine of the Python side (the MLX-ops backward and the Metal
    backward both use it): row r's visits, in flat index order, at order[offsets[r]:...]."""
    rng = np.random.default_rng(3)
    rows = rng.integers(0, 9, size=(50, 2, 3)).astype(np.int32)
    rows[:, :, 0] = 0  # a heavy row, as every tree's root is
    order, offsets = mlx_fff.visits_by_row(mx.array(rows), 10)  # row 9: never visited
    flat = rows.reshape(-1)
    np.testing.assert_array_equal(np.array(order), np.argsort(flat, kind="stable"))
    np.testing.assert_array_equal(np.array(offsets), np.concatenate([[0], np.cumsum(np.bincount(flat, minlength=10))]))
    assert order.dtype == offsets.dtype == mx.int32
    # 2^31 visits would overflow the int32 indices: refused before anything is computed
    # (a broadcast, never evaluated, allocates nothing).
    with pytest.raises(ValueError, match=r"2147483648 visits"):
        mlx_fff.visits_by_row(mx.broadcast_to(mx.zeros((1, 1, 1), mx.int32), (2**30, 2, 1)), 1)
