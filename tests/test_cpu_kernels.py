"""The fused CPU primitive (csrc/ -> ufb_mlx._ext) against the float64 NumPy reference.

Same problems and tolerances as tests/test_fff_properties.py (random P, D, H, shapes,
dtypes, exact-zero logits, near-tie tokens excused against float64), plus what only this
implementation has: every instruction-set build usable on this CPU (AVX-512, AVX2,
portable), thread counts 1..4, both layouts of linear_out.weight, half-precision weights
under float32 activations, a bitwise-deterministic backward, mx.compile, and the checks
that refuse a module built for another mlx.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from test_fff_properties import EPS_COND, MX_DTYPES, UNIT, as_mx, assert_close_on, compared, excused, fff_problem
from ufb_mlx import backend, cpu_kernels
from ufb_mlx import fff as mlx_fff
from ufb_ref import fff as ref_fff
from ufb_ref.errors import UFBError

from conftest import require_extension

require_extension()  # skips this module, saying why, when the extension is not built

ext = cpu_kernels.ext()
ISAS = ext.isas()


@pytest.fixture(autouse=True)
def restore_isa_and_threads():
    isa, threads = ext.isa(), ext.num_threads()
    yield
    ext.set_isa(isa)
    ext.set_num_threads(threads)


def layout(w_out: mx.array, column_major: bool) -> mx.array:
    """linear_out.weight as load() stores it (column-major) or as training leaves it."""
    return mx.contiguous(w_out.T).T if column_major else mx.contiguous(w_out)


settings_cpu = st.tuples(st.sampled_from(ISAS), st.integers(1, 4), st.booleans())


@given(fff_problem(), settings_cpu, st.booleans())
def test_forward_matches_reference(problem, cfg, f32_activations):
    trees, depth, _, dtype, (x, w_in, b_in, w_out), _ = problem
    isa, threads, column_major = cfg
    ext.set_isa(isa)
    ext.set_num_threads(threads)
    xdt = "float32" if f32_activations else dtype  # half weights under float32 activations too
    xs = as_mx(x, xdt).reshape(-1, x.shape[-1])
    ws = [as_mx(a, dtype) for a in (w_in, b_in)]
    y, rows, z = ext.fff_forward(xs, *ws, layout(as_mx(w_out, dtype), column_major), trees, depth)
    truth = ref_fff.fff_descent(x, w_in, b_in, w_out, trees, depth).reshape(xs.shape)
    keep = compared(~excused(x, w_in, b_in, trees, depth, EPS_COND))
    assert y.dtype == MX_DTYPES[xdt] and y.shape == xs.shape
    # float32 accumulation (~1e-6 relative) plus one rounding to the output dtype.
    scale = 1 + np.abs(truth).max()
    assert_close_on(np.array(y.astype(mx.float32)), truth, keep, scale * (1e-5 + 2 * UNIT[xdt]), f"cpu/{isa}")
    paths, zref = ref_fff.descend(x, w_in, b_in, trees, depth)
    flat = lambda a: a.reshape(keep.shape[0], -1)
    nodes = np.array(rows) - (np.arange(trees) * ref_fff.n_nodes(depth))[:, None]
    np.testing.assert_array_equal(flat(nodes)[keep], flat(paths)[keep])
    # Logits: a float32 dot product of H <= 70 terms of size ~1: 1e-5 absolute.
    assert_close_on(np.array(z), zref, keep, 1e-5 * (1 + np.abs(zref).max()), "logits")


@given(fff_problem(), settings_cpu)
def test_gradients_match_reference(problem, cfg):
    trees, depth, _, dtype, (x, w_in, b_in, w_out), dy = problem
    isa, threads, column_major = cfg
    ext.set_isa(isa)
    ext.set_num_threads(threads)
    bad = ~compared(~excused(x, w_in, b_in, trees, depth, EPS_COND))
    dy = dy.reshape(bad.shape[0], -1).copy()
    dy[bad] = 0  # tokens near a routing tie would send their gradient to other rows
    cot = as_mx(dy.reshape(x.shape), dtype)
    dy = np.array(cot.astype(mx.float32)).astype(np.float64)  # the reference sees the rounded dy
    want = ref_fff.fff_descent_vjp(x, w_in, b_in, w_out, trees, depth, dy)
    args = [as_mx(a, dtype) for a in (x, w_in, b_in)] + [layout(as_mx(w_out, dtype), column_major)]
    loss = lambda *a: (mlx_fff.fff_conditional(*a, trees, depth, backend="cpu").astype(mx.float32)
                       * cot.astype(mx.float32)).sum()
    got = mx.grad(loss, argnums=(0, 1, 2, 3))(*args)
    for name, g, w, p in zip(("x", "w_in", "b_in", "w_out"), got, want, args):
        assert g.dtype == p.dtype and g.shape == p.shape
        # float32 sums of at most T * P * (D+1) terms of size ~1 (1e-5 relative to the
        # gradient's scale, far below one misplaced contribution), then one rounding to
        # the parameter's dtype.
        tol = (1e-5 + 2 * UNIT[dtype]) * (1 + np.abs(w).max())
        g = np.array(g.astype(mx.float32))
        if name == "x":
            assert_close_on(g, w, ~bad, tol, f"cpu/{isa} dx")
        else:
            np.testing.assert_allclose(g, w, atol=tol, rtol=0, err_msg=f"cpu/{isa} d{name}")


def _layer(T, H, P, D, seed=0):
    rng = np.random.default_rng(seed)
    n = ref_fff.n_nodes(D)
    return [mx.array(a.astype(np.float32)) for a in (
        rng.normal(size=(T, H)), rng.normal(size=(P * n, H)) / np.sqrt(H), rng.normal(size=P * n) * 0.1,
        rng.normal(size=(H, P * n)) / np.sqrt(D + 1), rng.normal(size=(T, H)))]


def test_backward_is_bitwise_deterministic_across_threads_and_runs():
    """The root row is visited by all 600 tokens and is split across column ranges; each
    output element is still summed by one unit in token order, so every thread count
    gives the same bits."""
    x, w_in, b_in, w_out, dy = _layer(600, 96, 2, 6)
    loss = lambda *a: (mlx_fff.fff_conditional(*a, 2, 6, backend="cpu") * dy).sum()
    runs = []
    for threads in (1, 2, 3, 4, 2):
        ext.set_num_threads(threads)
        runs.append([np.array(g) for g in mx.grad(loss, argnums=(0, 1, 2, 3))(x, w_in, b_in, w_out)])
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert np.array_equal(a, b)


def test_instruction_sets_agree_on_routing_and_closely_on_values():
    x, w_in, b_in, w_out, _ = _layer(64, 768, 1, 11)
    outs = {}
    for isa in ISAS:
        ext.set_isa(isa)
        outs[isa] = [np.array(a) for a in ext.fff_forward(x, w_in, b_in, w_out, 1, 11)]
    first = outs[ISAS[0]]
    for isa in ISAS[1:]:
        # Different vector widths sum in different orders: 1e-5 of the output scale.
        np.testing.assert_allclose(outs[isa][0], first[0], atol=1e-5 * (1 + np.abs(first[0]).max()), rtol=0)
        assert np.array_equal(outs[isa][1], first[1])


def test_released_size_matches_float64_reference():
    """768 wide, one tree of depth 11 (the released layer), 64 tokens."""
    x, w_in, b_in, w_out, _ = _layer(64, 768, 1, 11, seed=3)
    a64 = [np.array(a).astype(np.float64) for a in (x, w_in, b_in, w_out)]
    y, rows, _ = ext.fff_forward(x, w_in, b_in, w_out, 1, 11)
    keep = ~excused(*a64[:3], 1, 11, EPS_COND)
    truth = ref_fff.fff_descent(*a64, 1, 11)
    assert keep.mean() > 0.9
    assert_close_on(np.array(y), truth, keep, 1e-5 * (1 + np.abs(truth).max()), "released size")


def test_exact_zero_logit_goes_left():
    H = 8
    x = np.random.default_rng(0).normal(size=(4, H))
    w_in = np.ones((7, H))
    w_in[0] = 0.0
    args = [mx.array(a.astype(np.float32)) for a in (x, w_in, np.zeros(7), np.eye(H, 7))]
    _, rows, z = ext.fff_forward(*args, 1, 2)
    assert (np.array(z)[:, 0, 0] == 0).all() and (np.array(rows)[:, 0, 1] == 1).all()


def test_compile_and_model_path():
    x, w_in, b_in, w_out, _ = _layer(10, 32, 1, 3)
    f = lambda *a: mlx_fff.fff_conditional(*a, 1, 3, backend="cpu")
    np.testing.assert_array_equal(np.array(mx.compile(f)(x, w_in, b_in, w_out)), np.array(f(x, w_in, b_in, w_out)))
    # The model picks the primitive by default on a CPU stream.
    assert backend.resolve("auto") == "cpu"


def test_gelu_primitive_is_exact_erf_to_a_few_ulp():
    z = np.concatenate([np.random.default_rng(1).normal(size=20000) * 4, np.linspace(-13, 13, 4001)]).astype(np.float32)
    z64 = z.astype(np.float64)
    truth = 0.5 * z64 * np.array([math.erfc(-v / math.sqrt(2)) for v in z64])
    got = np.array(ext.gelu(mx.array(z))).astype(np.float64)
    tiny = np.abs(truth) < 1e-30  # float32 subnormals: absolute error only
    ulp = np.abs(got - truth)[~tiny] / np.spacing(np.abs(truth[~tiny]).astype(np.float32))
    # Measured 6 ulp at most (the erfc tail's exp split); 16 leaves room for other CPUs' FMA.
    assert ulp.max() <= 16
    assert np.abs(got - truth)[tiny].max() < 1e-30  # below exp's float32 range: 0 or subnormal
    dz = np.array(mx.grad(lambda a: ext.gelu(a).sum())(mx.array(z))).astype(np.float64)
    dtruth = 0.5 * np.array([math.erfc(-v / math.sqrt(2)) for v in z64]) + z64 * np.exp(-0.5 * z64**2) / math.sqrt(2 * math.pi)
    assert np.abs(dz - dtruth).max() < 1e-6  # gelu' crosses 0 near z = -0.75: absolute


def test_mismatched_build_is_refused_in_one_line(monkeypatch):
    assert cpu_kernels.version_mismatch("0.32.4", "0.32.4") is None
    msg = cpu_kernels.version_mismatch("0.32.3", "0.32.4")
    assert "0.32.3" in msg and "0.32.4" in msg and "\n" not in msg

    class WrongAbi:
        @staticmethod
        def gelu(x):
            raise TypeError("gelu(): incompatible function arguments. The following argument types are supported:\n ...")

    msg = cpu_kernels._probe(WrongAbi)
    assert "nanobind" in msg and "\n" not in msg
    monkeypatch.setattr(cpu_kernels, "_load", lambda: (None, msg))
    with pytest.raises(UFBError, match="backend 'cpu' is not available: .*nanobind"):
        backend.resolve("cpu")
    assert backend.resolve("auto") == "ops"


def attention_reference(qkv, mask, heads, scale, dout):
    """float64 softmax attention on the per-head [q|k|v] layout, and its gradient."""
    B, S, H3 = qkv.shape
    dh = H3 // 3 // heads
    x = qkv.reshape(B, S, heads, 3, dh).transpose(3, 0, 2, 1, 4)
    q, k, v = x[0], x[1], x[2]
    s = q @ k.transpose(0, 1, 3, 2) * scale + mask[:, None, None, :]
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    o = p @ v
    do = dout.reshape(B, S, heads, dh).transpose(0, 2, 1, 3)
    dv = p.transpose(0, 1, 3, 2) @ do
    dp = do @ v.transpose(0, 1, 3, 2)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True))
    dq, dk = ds @ k * scale, ds.transpose(0, 1, 3, 2) @ q * scale
    dqkv = np.stack([dq, dk, dv]).transpose(1, 3, 2, 0, 4).reshape(B, S, H3)
    return o.transpose(0, 2, 1, 3).reshape(B, S, heads * dh), dqkv


@given(st.integers(1, 3), st.integers(1, 70), st.integers(1, 4), st.integers(1, 40), st.integers(0, 2**31 - 1),
       settings_cpu)
def test_attention_matches_reference(B, S, heads, dh, seed, cfg):
    isa, threads, _ = cfg
    ext.set_isa(isa)
    ext.set_num_threads(threads)
    rng = np.random.default_rng(seed)
    qkv = rng.normal(size=(B, S, 3 * heads * dh)).astype(np.float32).astype(np.float64)
    mask = np.where(rng.random((B, S)) < 0.3, -10000.0, 0.0)
    mask[:, 0] = 0.0  # at least one visible key, as with real padding
    dout = rng.normal(size=(B, S, heads * dh)).astype(np.float32).astype(np.float64)
    scale = dh ** -0.5
    want, dwant = attention_reference(qkv, mask, heads, scale, dout)
    f32 = lambda a: mx.array(a.astype(np.float32))
    out, _ = ext.attention(f32(qkv), f32(mask), heads, scale)
    # float32 scores, exp (a couple of ulp) and sums over <= 70 keys: 1e-5 of the scale.
    np.testing.assert_allclose(np.array(out), want, atol=1e-5 * (1 + np.abs(want).max()), rtol=0)
    loss = lambda a: (ext.attention(a, f32(mask), heads, scale)[0] * f32(dout)).sum()
    got = np.array(mx.grad(loss)(f32(qkv)))
    np.testing.assert_allclose(got, dwant, atol=1e-5 * (1 + np.abs(dwant).max()), rtol=0)


def test_attention_ignores_masked_keys():
    """A key with the -10000 additive mask gets weight exp(-10000) = 0 in float32: its
    values cannot change any output."""
    rng = np.random.default_rng(5)
    qkv = rng.normal(size=(1, 9, 3 * 2 * 8)).astype(np.float32)
    mask = np.zeros((1, 9), np.float32)
    mask[0, 4] = -10000.0
    out = np.array(ext.attention(mx.array(qkv), mx.array(mask), 2, 8 ** -0.5)[0])
    qkv[0, 4] += 100.0  # changes key 4's q, k and v; only row 4's own query moves
    out2 = np.array(ext.attention(mx.array(qkv), mx.array(mask), 2, 8 ** -0.5)[0])
    keep = np.arange(9) != 4
    np.testing.assert_array_equal(out[0, keep], out2[0, keep])


def test_openblas_gets_kernels_for_the_cpu_it_runs_on():
    """Debian's OpenBLAS 0.3.21 takes recent Xeons for a generic "Prescott" and runs x @ W.T
    ~4x slower; ufb_mlx.blas names the kernels from the CPU's instruction sets unless the
    user chose (OPENBLAS_CORETYPE)."""
    from ufb_mlx import blas

    avx512 = {"avx2", "fma", "avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}
    assert blas.coretype_for(avx512) == "SkylakeX"
    assert blas.coretype_for({"avx2", "fma", "avx512f"}) == "Haswell"  # incomplete AVX-512
    assert blas.coretype_for({"sse2", "avx"}) is None
    if blas.status.startswith("OpenBLAS") and blas.coretype_for(blas._cpu_flags()):
        assert "Prescott" not in blas.status and "kernels)" in blas.status


@given(st.lists(st.integers(1, 5), min_size=0, max_size=2), st.integers(1, 300), st.sampled_from([1e-12, 1e-5]),
       st.integers(0, 2**31 - 1), settings_cpu)
def test_layer_norm_matches_reference(lead, n, eps, seed, cfg):
    isa, threads, _ = cfg
    ext.set_isa(isa)
    ext.set_num_threads(threads)
    rng = np.random.default_rng(seed)
    f32 = lambda a: np.asarray(a, np.float32).astype(np.float64)
    x, dy = f32(rng.normal(size=(*lead, n)) * 3 + 1), f32(rng.normal(size=(*lead, n)))
    w, b = f32(rng.normal(size=n)), f32(rng.normal(size=n))
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    rstd = 1 / np.sqrt(var + eps)
    xh = (x - mu) * rstd
    want = xh * w + b
    g = dy * w
    dx = rstd * (g - g.mean(-1, keepdims=True) - xh * (g * xh).mean(-1, keepdims=True))
    dw, db = (dy * xh).reshape(-1, n).sum(0), dy.reshape(-1, n).sum(0)
    X, W, B, DY = (mx.array(a.astype(np.float32)) for a in (x, w, b, dy))
    y = np.array(ext.layer_norm(X, W, B, eps)[0])
    # float32 two-pass mean and variance: a few ulp of |x - mean| * rstd * |w| (~10 here).
    np.testing.assert_allclose(y, want, atol=1e-5 * (1 + np.abs(want).max()), rtol=0)
    got = mx.grad(lambda *a: (ext.layer_norm(*a, eps)[0] * DY).sum(), argnums=(0, 1, 2))(X, W, B)
    # dx is rstd times a cancelling sum of terms of size |dy * w|: float32 leaves a few ulp
    # of those terms, times rstd (large where a row's values nearly agree; MLX's own
    # layer_norm does the same). Per row: 16 ulp of max |dy w| times rstd, plus 1e-5.
    tol_dx = 1e-5 * (1 + np.abs(dx).max()) + 16 * 2.0**-24 * rstd * np.abs(g).max(-1, keepdims=True)
    err = np.abs(np.array(got[0]) - dx)
    assert (err <= tol_dx).all(), f"dx: max error {err.max():.3g}"
    for name, gv, wv in zip(("dw", "db"), got[1:], (dw, db)):
        # float32 sums over up to 25 rows of terms ~10: 1e-5 of the largest
        np.testing.assert_allclose(np.array(gv), wv, atol=1e-5 * (1 + np.abs(wv).max()), rtol=0, err_msg=name)


def test_layer_norm_backward_is_deterministic_across_threads():
    rng = np.random.default_rng(2)
    X, DY = (mx.array(rng.normal(size=(700, 96)).astype(np.float32)) for _ in range(2))
    W, B = (mx.array(rng.normal(size=96).astype(np.float32)) for _ in range(2))
    runs = []
    for threads in (1, 2, 3, 4):
        ext.set_num_threads(threads)
        got = mx.grad(lambda *a: (ext.layer_norm(*a, 1e-12)[0] * DY).sum(), argnums=(0, 1, 2))(X, W, B)
        runs.append([np.array(g) for g in got])
    for other in runs[1:]:
        assert all(np.array_equal(a, b) for a, b in zip(runs[0], other))


def test_strided_inputs_are_read_as_their_values():
    """Inputs that are views (a slice, a transpose, a broadcast) are made row-major by MLX's
    own contiguous copy when the graph is built (csrc/row_major.h) and give the bits of a
    contiguous copy, forward and backward."""
    rng = np.random.default_rng(4)
    x, w_in, b_in, w_out, _ = _layer(12, 40, 1, 3)
    wide = mx.array(rng.normal(size=(12, 80)).astype(np.float32))
    xs = wide[:, ::2]  # strided columns
    same = lambda a, b: np.array_equal(np.array(a), np.array(b))
    assert same(ext.fff_forward(xs, w_in, b_in, w_out, 1, 3)[0],
                ext.fff_forward(mx.contiguous(xs), w_in, b_in, w_out, 1, 3)[0])
    qkv = mx.array(rng.normal(size=(5, 2, 3 * 2 * 8)).astype(np.float32)).transpose(1, 0, 2)  # (2, 5, 48) view
    mask = mx.zeros((2, 5))
    assert same(ext.attention(qkv, mask, 2, 0.35)[0], ext.attention(mx.contiguous(qkv), mask, 2, 0.35)[0])
    t = mx.array(rng.normal(size=(30, 7)).astype(np.float32)).T  # (7, 30) view
    w, b = mx.ones((30,)), mx.zeros((30,))
    assert same(ext.layer_norm(t, w, b, 1e-5)[0], ext.layer_norm(mx.contiguous(t), w, b, 1e-5)[0])
    z = mx.broadcast_to(mx.array([0.5]), (1000,))
    assert same(ext.gelu(z), ext.gelu(mx.full((1000,), 0.5)))
    # Backward: a transposed cotangent and a row-major w_out give a contiguous run's bits.
    dy = mx.array(rng.normal(size=(40, 12)).astype(np.float32)).T
    f = lambda *a: ext.fff_forward(*a, 1, 3)[0]
    for w in (w_out, mx.contiguous(w_out.T).T):
        got = mx.vjp(f, [x, w_in, b_in, w], [dy])[1]
        want = mx.vjp(f, [x, w_in, b_in, mx.contiguous(w)], [mx.contiguous(dy)])[1]
        assert all(same(g, h) for g, h in zip(got, want))


def test_backward_refuses_2_31_visits_when_built():
    """The CPU backward numbers visits (token, tree, level) in int32: a batch of 2^31 visits
    is refused in one line when the gradient graph is built. Broadcast inputs and a graph
    that is never evaluated: nothing of that size is allocated."""
    P, D = 2, 0
    w_in, b_in, w_out = mx.zeros((P, 1)), mx.zeros((P,)), mx.zeros((1, P))
    f = lambda x: ext.fff_forward(x, w_in, b_in, w_out, P, D)[0]
    big = mx.broadcast_to(mx.zeros((1, 1)), (2**30, 1))  # 2^30 tokens * 2 trees * 1 level
    with pytest.raises(ValueError, match=r"2147483648 visits .* exceeds 2\^31 - 1") as e:
        mx.vjp(f, [big], [big])
    assert "\n" not in str(e.value)
    fits = mx.broadcast_to(mx.zeros((1, 1)), (2**30 - 1, 1))
    mx.vjp(f, [fits], [fits])  # one token fewer: built (and never evaluated)
