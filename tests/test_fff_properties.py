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
are built in on purpose (zero weight row and bias) and must go left everywhere.

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
    arrays = [np.array(mx.array(a.astype(np.float32)).astype(MX_DTYPES[dtype]).astype(mx.float32)).astype(np.float64)
              for a in (x, w_in, b_in, w_out)]
    return trees, depth, top, dtype, arrays, rng.normal(size=(*lead, hidden))


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
    keep = ~excused(x, w_in, b_in, trees, depth, EPS_COND)
    # float32 accumulation error (~1e-6 relative here) plus one rounding to the output dtype.
    assert_close_on(np.array(cond.astype(mx.float32)), truth, keep, fff_forward_tolerance(truth, dtype), "conditional")

    dense = mlx_fff.fff_dense(*args, trees, depth)
    keep_d = ~excused(x, w_in, b_in, trees, depth, EPS_DENSE[dtype])
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
    bad = excused(x, w_in, b_in, trees, depth, EPS_COND)
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
    keep = ~excused(x, w_in, b_in, trees, depth, EPS_COND)
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
