"""The Metal kernels in metal/ compared with the NumPy reference (ufb_ref.fff) evaluated
in float64: on the GPU wherever MLX has Metal (a Mac), else through the emulator in
ufb_mlx/metal_emu, which runs the same kernel text on the CPU. The choice is made in one
place, ``ufb_mlx.metal_emu.metal_kernels()`` (the `metal` fixture enters it).

ufb_mlx.metal_kernels.launch is the one place that calls Metal, so fff_forward / fff_backward
run end to end (validation, launch configuration, the MLX glue between the backward
kernels) exactly as on a Mac. The tests of the emulator itself (its text generation,
faults and simdgroup semantics) need only a C++ compiler, and run on a Mac too.

Routing: every token is drawn so that each logit its reference descent decides on has
|z| > MARGIN. The kernels' float32 logits differ from float64 by ~1e-6 here, so both
descents take the same path and outputs are comparable element by element; nothing has
to be excused. The exact-zero test checks the z == 0 -> left rule separately.

Tolerances (references in float64 from the same rounded inputs the kernels read):
- float32 results: |a - r| <= RTOL * m, with m the magnitude of the computation, the
  sum of |terms| that float32 adds up for that element (propagating the magnitudes of
  its float32 inputs z, gelu(z), dz). Rounding error is a multiple of float32's 6e-8
  times m whatever cancels in r, so a bound relative to |r| would fail on cancelling
  sums (e.g. d_b_in of a row that 3 tokens visit). RTOL = 2e-6 is ~30 roundings;
  over 20 seeds x 3 token counts per case the worst float32 error was 2e-7 * m. A GPU
  that contracts a*b+c into one fma rounds less often, and its simd_sum order only
  changes which roundings happen, so the same bound holds there.
- y in float16 / bfloat16: plus the final rounding of y to the dtype, half an ulp:
  2**-11 (float16) and 2**-8 (bfloat16) of |r|.
"""

from __future__ import annotations

import functools
import math
import re
import zlib

import mlx.core as mx
import numpy as np
import pytest

from ufb_mlx import metal_kernels as K
from ufb_mlx.metal_emu import harness
from ufb_mlx.metal_emu import (HarnessError, Kernel, compiled_text, emulated_launch, metal_kernels,
                               metal_runner, run_kernel, unavailable_reason)
from ufb_ref import fff as ref

needs_compiler = pytest.mark.skipif(unavailable_reason() is not None,
                                    reason=f"emulator tests: {unavailable_reason()}")

MARGIN = 1e-3
RTOL = 2e-6
ROUNDING = {mx.float32: 0.0, mx.float16: 2.0**-11, mx.bfloat16: 2.0**-8}

# (trees P, depth D, hidden H, tokens T, dtype): P 1..3, D 0..6, H mostly not a multiple
# of 32 (and one below 32), T = 1, T not a multiple of the 8 tokens per threadgroup.
CASES = [
    (1, 0, 40, 1, mx.float32),
    (1, 1, 33, 7, mx.float32),
    (2, 2, 72, 16, mx.float32),
    (3, 3, 100, 9, mx.float32),
    (1, 4, 64, 33, mx.float32),
    (2, 5, 45, 20, mx.float32),
    (3, 6, 101, 24, mx.float32),
    (1, 6, 31, 40, mx.float32),
    (2, 3, 70, 12, mx.float16),
    (3, 2, 50, 10, mx.bfloat16),
]


def case_id(c):
    p, d, h, t, dt = c
    return f"P{p}-D{d}-H{h}-T{t}-{str(dt).split('.')[-1]}"


def rounded(a: np.ndarray, dtype) -> np.ndarray:
    """a rounded to `dtype` (as the kernel will read it), back in float64."""
    return np.array(mx.array(a.astype(np.float32)).astype(dtype).astype(mx.float32), dtype=np.float64)


class Layer:
    """A random FFF layer and tokens whose reference decisions all have |z| > MARGIN.
    `*64` are float64 copies of the values the kernels see (after rounding to dtype)."""

    def __init__(self, trees, depth, hidden, tokens, dtype, seed=0, w_in=None, b_in=None):
        rng = np.random.default_rng(seed)
        n = ref.n_nodes(depth)
        self.trees, self.depth, self.dtype = trees, depth, dtype
        self.w_in64 = rounded(rng.standard_normal((trees * n, hidden)) / math.sqrt(hidden), dtype)
        self.b_in64 = rounded(0.1 * rng.standard_normal(trees * n), dtype)
        if w_in is not None:
            self.w_in64, self.b_in64 = w_in, b_in
        w_out = rng.standard_normal((hidden, trees * n)) / math.sqrt(trees * (depth + 1))
        self.w_out64 = rounded(w_out, dtype)
        cand = rounded(rng.standard_normal((4 * tokens + 16, hidden)), dtype)
        _, z = ref.descend(cand, self.w_in64, self.b_in64, trees, depth)
        ok = np.abs(z).reshape(len(cand), -1).min(axis=1) > MARGIN
        if w_in is not None:  # exact zeros are planted on purpose
            ok = np.ones(len(cand), dtype=bool)
        assert ok.sum() >= tokens
        self.x64 = cand[ok][:tokens]
        self.dy64 = rounded(rng.standard_normal((tokens, hidden)), dtype)

    def mx(self, a):
        return mx.array(a.astype(np.float32)).astype(self.dtype)

    def forward_inputs(self):
        return (self.mx(self.x64), self.mx(self.w_in64), self.mx(self.b_in64),
                self.mx(np.ascontiguousarray(self.w_out64.T)))


def magnitudes(layer: Layer, block: int = 1024) -> dict:
    """For each output, the magnitude m of its float32 computation (see the module
    docstring), from the reference descent; tokens in blocks, to bound the (T, V, H)
    temporaries."""
    P, D = layer.trees, layer.depth
    T, H = layer.x64.shape
    paths, z = ref.descend(layer.x64, layer.w_in64, layer.b_in64, P, D)
    rows = (paths + (np.arange(P) * ref.n_nodes(D))[:, None]).reshape(T, -1)  # (T, V)
    z = z.reshape(T, -1)
    w_in, b_in, w_out_t = np.abs(layer.w_in64), np.abs(layer.b_in64), np.abs(layer.w_out64.T)
    out = {"z": np.zeros(z.shape), "y": np.zeros((T, H)), "dx": np.zeros((T, H)),
           "d_w_in": np.zeros_like(w_in), "d_b_in": np.zeros_like(b_in), "d_w_out_t": np.zeros_like(w_out_t)}
    for t0 in range(0, T, block):
        sl = slice(t0, t0 + block)
        r, zb = rows[sl], z[sl]
        x, dy = np.abs(layer.x64[sl]), np.abs(layer.dy64[sl])
        m_z = np.einsum("tvh,th->tv", w_in[r], x) + b_in[r]
        slope = np.abs(ref.gelu_grad(zb))
        m_act = np.abs(ref.gelu(zb)) + slope * m_z
        # |gelu''| < 1, so an error e in z moves gelu'(z) by less than e
        m_dz = np.einsum("tvh,th->tv", w_out_t[r], dy) * (slope + m_z)
        flat = r.reshape(-1)
        np.add.at(out["d_w_in"], flat, (m_dz[:, :, None] * x[:, None, :]).reshape(-1, H))
        np.add.at(out["d_b_in"], flat, m_dz.reshape(-1))
        np.add.at(out["d_w_out_t"], flat, (m_act[:, :, None] * dy[:, None, :]).reshape(-1, H))
        out["z"][sl] = m_z
        out["y"][sl] = np.einsum("tv,tvh->th", m_act, w_out_t[r])
        out["dx"][sl] = np.einsum("tv,tvh->th", m_dz, w_in[r])
    out["z"] = out["z"].reshape(paths.shape)
    return out


def assert_close(actual, expected, magnitude, name, rounding=0.0):
    a = np.array(mx.array(actual).astype(mx.float32), dtype=np.float64)
    r = np.asarray(expected, dtype=np.float64)
    assert a.shape == r.shape, (name, a.shape, r.shape)
    bound = RTOL * magnitude + rounding * np.abs(r)
    err = np.abs(a - r)
    worst = np.unravel_index(np.argmax(err - bound), err.shape)
    assert (err <= bound).all(), (
        f"{name}: error {err[worst]:.3g} > bound {bound[worst]:.3g} at {worst}: "
        f"got {a[worst]}, expected {r[worst]}"
    )


def _recording_launches(monkeypatch, ftz: bool):
    if metal_runner() == "emulator" and unavailable_reason() is not None:
        pytest.skip(unavailable_reason())
    launched = []
    real = K.launch

    def recorded(spec, inputs, config):
        launched.append(spec.name)
        return real(spec, inputs, config)

    monkeypatch.setattr(K, "launch", recorded)
    with metal_kernels(ftz=ftz):
        yield launched


@pytest.fixture(params=[False, True], ids=["ieee", "ftz"])
def metal(request, monkeypatch):
    """The kernels run where this machine runs them (metal_kernels()); yields the names of
    the kernels launched, in order. Off a Mac every test runs twice in the emulator: with
    IEEE float32 subnormals, and flushed to zero as Apple GPUs compute ("ftz"), so that a
    test or kernel that relies on subnormals fails here. On a GPU the hardware decides,
    and the second run would repeat the first. Without a GPU or a C++ compiler: skipped,
    saying why."""
    if request.param and metal_runner() == "gpu":
        pytest.skip("on a Metal GPU the hardware's own float32 handling runs (the 'ieee' run)")
    yield from _recording_launches(monkeypatch, ftz=request.param)


@pytest.fixture
def metal_ieee(monkeypatch):
    """`metal` with IEEE subnormals only, for a test about indexing rather than arithmetic."""
    yield from _recording_launches(monkeypatch, ftz=False)


def reference_forward(layer: Layer):
    paths, z = ref.descend(layer.x64, layer.w_in64, layer.b_in64, layer.trees, layer.depth)
    rows = paths + (np.arange(layer.trees) * ref.n_nodes(layer.depth))[:, None]
    y = ref.fff_descent(layer.x64, layer.w_in64, layer.b_in64, layer.w_out64, layer.trees, layer.depth)
    return y, rows, z


# ---- forward and backward against the reference -------------------------------------------


def check_against_reference(layer: Layer):
    """fff_forward and fff_backward on `layer` against the float64 reference."""
    P, D, dtype = layer.trees, layer.depth, layer.dtype
    x, w_in, b_in, w_out_t = layer.forward_inputs()
    y, rows, z = K.fff_forward(x, w_in, b_in, w_out_t, P, D)
    y_ref, rows_ref, z_ref = reference_forward(layer)
    assert y.dtype == dtype and rows.dtype == mx.int32 and z.dtype == mx.float32
    np.testing.assert_array_equal(np.array(rows), rows_ref)
    mag = magnitudes(layer)
    assert_close(z, z_ref, mag["z"], "z")
    assert_close(y, y_ref, mag["y"], "y", rounding=ROUNDING[dtype])

    dy = layer.mx(layer.dy64)
    grads = K.fff_backward(x, w_in, w_out_t, rows, z, dy)
    dx_r, dwin_r, db_r, dwout_r = ref.fff_descent_vjp(
        layer.x64, layer.w_in64, layer.b_in64, layer.w_out64, P, D, layer.dy64
    )
    for g, r, name in zip(grads, (dx_r, dwin_r, db_r, dwout_r.T), ("dx", "d_w_in", "d_b_in", "d_w_out_t")):
        assert g.dtype == mx.float32, name
        assert_close(g, r, mag[name], name)


ONE_CHUNK_PER_ROW = ["fff_forward", "fff_backward_tokens", "fff_backward_rows"]
SPLIT_ROWS = ONE_CHUNK_PER_ROW + ["fff_backward_rows_reduce"]


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_forward_and_backward_match_reference(case, metal):
    P, D, H, T, dtype = case
    check_against_reference(Layer(P, D, H, T, dtype, seed=zlib.crc32(case_id(case).encode())))
    assert metal == ONE_CHUNK_PER_ROW


def test_zero_logit_goes_left(metal):
    """Rows 0, 1, 2 of tree 0 (root and both level-1 nodes) have zero weights and bias:
    their logits are exactly 0.0 for every token, which must route left (node 1, then
    node 3), in the kernel as in the reference."""
    P, D, H, T = 2, 2, 40, 12
    base = Layer(P, D, H, T, mx.float32, seed=7)
    w_in, b_in = base.w_in64.copy(), base.b_in64.copy()
    w_in[:3] = 0.0
    b_in[:3] = 0.0
    layer = Layer(P, D, H, T, mx.float32, seed=7, w_in=w_in, b_in=b_in)
    _, z_all = ref.descend(layer.x64, w_in, b_in, P, D)
    assert (np.abs(z_all[:, 1]) > MARGIN).all(), "tree 1 must stay away from ties"

    x, w_in_k, b_in_k, w_out_t = layer.forward_inputs()
    y, rows, z = K.fff_forward(x, w_in_k, b_in_k, w_out_t, P, D)
    rows, z = np.array(rows), np.array(z)
    assert (z[:, 0, :2] == 0.0).all()
    np.testing.assert_array_equal(rows[:, 0, :], np.broadcast_to([0, 1, 3], (T, 3)))
    y_ref, rows_ref, _ = reference_forward(layer)
    np.testing.assert_array_equal(rows, rows_ref)
    mag = magnitudes(layer)
    assert_close(y, y_ref, mag["y"], "y")
    grads = K.fff_backward(x, w_in_k, w_out_t, mx.array(rows), mx.array(z), layer.mx(layer.dy64))
    refs = ref.fff_descent_vjp(layer.x64, w_in, b_in, layer.w_out64, P, D, layer.dy64)
    for g, r, name in zip(grads, (*refs[:3], refs[3].T), ("dx", "d_w_in", "d_b_in", "d_w_out_t")):
        assert_close(g, r, mag[name], name)


def _outputs(layer: Layer) -> list[np.ndarray]:
    P, D = layer.trees, layer.depth
    args = layer.forward_inputs()
    y, rows, z = K.fff_forward(*args, P, D)
    grads = K.fff_backward(args[0], args[1], args[3], rows, z, layer.mx(layer.dy64))
    # bfloat16 widens to float32 exactly (NumPy has no bfloat16)
    return [np.array(a.astype(mx.float32) if a.dtype == mx.bfloat16 else a) for a in (y, rows, z, *grads)]


def assert_deterministic(layer: Layer):
    """Same outputs, bit for bit, run after run. Under the emulator the second run takes
    its lanes in reverse order between sync points: no lane may read what another lane
    writes without a sync. On a GPU the scheduling itself varies between runs."""
    first = _outputs(layer)
    if metal_runner() == "emulator":
        # the metal fixture's launcher (its ftz mode kept), lanes in reverse order
        with K.use_launcher(functools.partial(K._launcher, lane_order="reverse")):
            second = _outputs(layer)
    else:
        second = _outputs(layer)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)


def test_results_do_not_depend_on_scheduling(metal):
    P, D, H, T, dtype = CASES[3]
    assert_deterministic(Layer(P, D, H, T, dtype, seed=zlib.crc32(case_id(CASES[3]).encode())))


@pytest.mark.parametrize("has_metal", [True, False], ids=["mac", "elsewhere"])
def test_where_the_metal_path_runs(monkeypatch, has_metal):
    """The one decision: the real kernels where MLX has Metal (nothing is redirected),
    else every launch goes to the emulator, for the block only; without a compiler the
    emulator is refused in one line."""
    from ufb_mlx import check
    from ufb_mlx.metal_emu import runner

    monkeypatch.setattr(mx.metal, "is_available", lambda: has_metal)
    monkeypatch.setattr(runner, "unavailable_reason", lambda: None)  # a compiler, to begin with
    assert metal_runner() == ("gpu" if has_metal else "emulator")
    assert check.runs_on("metal")[1] is (not has_metal)
    assert K._launcher is None
    with metal_kernels() as where:
        assert where == metal_runner()
        assert (K._launcher is None) is has_metal and K.available()
    assert K._launcher is None
    monkeypatch.setattr(runner, "unavailable_reason", lambda: "no C++ compiler here")
    if has_metal:
        with metal_kernels():  # the GPU needs no compiler
            pass
    else:
        with pytest.raises(HarnessError, match="^no C\\+\\+ compiler here$"):
            with metal_kernels():
                pass


# ---- launch configuration from the width; rows visited by many tokens ----------------------


@pytest.mark.parametrize("hidden", [1, 40, 768, 1024, 1025, 2048, 4096, 8192, 8224, 16384, 32768,
                                    40000])
def test_launch_configuration_follows_the_width(hidden):
    """Per-token kernels: 32*G lanes per token with at most MAX_PER_LANE values of a row
    per lane up to G = MAX_GROUPS, then more values per lane; threadgroups of at most
    THREADGROUP_MAX threads whatever the width (Metal's cap is 1024, a register-heavy
    pipeline's may be 384 or less). Row kernels: at most ROWS_THREADGROUP_MAX threads
    splitting H."""
    inputs = [mx.zeros((16, hidden))] + [mx.zeros((7, hidden)), mx.zeros((7,)), mx.zeros((7, hidden))]
    config = K.FORWARD.configure(inputs, 1, 2)
    template = dict(config.template)
    lanes, tokens_per_group = config.threadgroup[0], config.threadgroup[1]
    assert lanes == 32 * template["G"] and config.grid == (lanes, 16, 1)
    per_lane = -(-hidden // lanes)
    assert per_lane <= K.MAX_PER_LANE or template["G"] == K.MAX_GROUPS
    assert lanes * tokens_per_group <= K.THREADGROUP_MAX == 256
    assert template["TGS"] >= template["G"] * tokens_per_group  # scratch for every token's sums
    if hidden <= 32 * K.MAX_PER_LANE:
        assert template["G"] == 1 and tokens_per_group == 8
    rows = K._configure_backward_rows([mx.zeros((16, hidden))], 1, 2, chunks=7)
    assert rows.threadgroup[0] <= K.ROWS_THREADGROUP_MAX and rows.threadgroup[0] % 32 == 0


# Widths of the released model (768) and wider; H=2048 takes two simdgroups per token
# (and 4 tokens per threadgroup, 6 or 13 tokens leaving a partial threadgroup).
WIDE_CASES = [
    (1, 3, 768, 11, mx.float32),
    (2, 2, 1024, 9, mx.float32),
    (1, 2, 2048, 6, mx.float32),
    (2, 3, 2048, 13, mx.bfloat16),
]


@pytest.mark.parametrize("case", WIDE_CASES, ids=case_id)
def test_wide_models_match_reference(case, metal):
    P, D, H, T, dtype = case
    layer = Layer(P, D, H, T, dtype, seed=zlib.crc32(case_id(case).encode()))
    check_against_reference(layer)
    if H == 2048:
        assert_deterministic(layer)


@pytest.mark.parametrize("case", [(1, 2, 8192 + 32, 3, mx.float32), (2, 1, 16384, 2, mx.bfloat16)],
                         ids=case_id)
def test_widths_past_8192_match_reference(case, metal):
    """Past H = 8192 a token keeps 8 simdgroups (256 threads) and each lane more than 32
    values of a row (33 at 8192 + 32, with a partial last column; 64 at 16384): launches
    within every pipeline limit, results as at any width. Few tokens: the emulator's cost
    grows with T * H."""
    P, D, H, T, dtype = case
    layer = Layer(P, D, H, T, dtype, seed=zlib.crc32(case_id(case).encode()))
    x, w_in, b_in, w_out_t = layer.forward_inputs()
    config = K.FORWARD.configure([x, w_in, b_in, w_out_t], P, D)
    assert dict(config.template)["G"] == K.MAX_GROUPS and config.threadgroup[:2] == (256, 1)
    check_against_reference(layer)


@pytest.mark.parametrize("case", [(1, 3, 40, 20, mx.float32), (3, 2, 70, 33, mx.float16),
                                  (1, 4, 2048, 12, mx.float32)], ids=case_id)
def test_rows_split_into_chunks_match_reference(case, metal, monkeypatch):
    """With chunks of 3 visits (ROW_CHUNK is the kernel's template constant C) every row
    visited more than 3 times is split: the root into ceil(T / 3) chunks, added up by
    fff_backward_rows_reduce in order."""
    monkeypatch.setattr(K, "ROW_CHUNK", 3)
    P, D, H, T, dtype = case
    layer = Layer(P, D, H, T, dtype, seed=zlib.crc32(case_id(case).encode()))
    check_against_reference(layer)
    assert metal == SPLIT_ROWS
    assert_deterministic(layer)


def test_8192_tokens(metal_ieee):
    """A pretraining-sized batch with the default chunk: the root of each tree (8192
    visits) is split into 32 chunks, the levels below into fewer, down to one. The
    width stays small (H=96) because the split depends on visit counts, not on H (the
    width cases above cover H), and the emulator pays per lane and sync point: this
    case alone is ~1.5M lane-syncs, so it runs once (IEEE), not also with flush-to-zero:
    the split is integer arithmetic."""
    P, D, H, T = 2, 5, 96, 8192
    layer = Layer(P, D, H, T, mx.float32, seed=8192)
    check_against_reference(layer)
    assert metal_ieee == SPLIT_ROWS
    from ufb_mlx.fff import visits_by_row  # the Metal backward's grouping, shared with fff.py

    rows = mx.array(reference_forward(layer)[1].astype(np.int32))
    _, offsets = visits_by_row(rows, P * ref.n_nodes(D))
    chunk_offsets, bound = K.row_chunks(offsets, T, P * (D + 1))
    per_row = np.diff(np.array(chunk_offsets))
    roots = np.arange(P) * ref.n_nodes(D)
    assert (per_row[roots] == T // K.ROW_CHUNK).all() and per_row.max() == T // K.ROW_CHUNK
    assert np.array(chunk_offsets)[-1] <= bound


# ---- coverage of metal/ and fidelity to what MLX compiles -----------------------------------


def test_every_metal_file_is_a_kernel_and_every_kernel_runs(metal, monkeypatch):
    files = {p.name for p in K.METAL_DIR.iterdir() if p.is_file()}
    covered = {s.file for s in K.KERNELS} | {s.header_file for s in K.KERNELS if s.header_file}
    assert files == covered, f"metal/ files without a KernelSpec: {sorted(files - covered)}"
    assert len({s.name for s in K.KERNELS}) == len(K.KERNELS)
    monkeypatch.setattr(K, "ROW_CHUNK", 2)
    P, D, H, T, dtype = CASES[1]
    _outputs(Layer(P, D, H, T, dtype, seed=zlib.crc32(case_id(CASES[1]).encode())))
    assert set(metal) == {s.name for s in K.KERNELS}, "a KernelSpec is not exercised by these tests"


def _spec_inputs(spec, dtype):
    """Small inputs of the right shapes and dtypes for each kernel (P=2, D=2, H=40, T=3)."""
    P, D, H, T = 2, 2, 40, 3
    R, L = P * ref.n_nodes(D), D + 1
    f = lambda *s: mx.zeros(s, dtype=dtype)  # noqa: E731
    g = lambda *s: mx.zeros(s, dtype=mx.float32)  # noqa: E731
    i = lambda *s: mx.zeros(s, dtype=mx.int32)  # noqa: E731
    inputs = {
        "fff_forward": [f(T, H), f(R, H), f(R), f(R, H)],
        "fff_backward_tokens": [f(R, H), f(R, H), i(T, P, L), g(T, P, L), f(T, H)],
        "fff_backward_rows": [f(T, H), f(T, H), g(T, P, L), g(T, P, L), i(T * P * L), i(R + 1), i(R + 1)],
        "fff_backward_rows_reduce": [g(R + 2, H), g(R + 2), g(R + 2, H), i(R + 1)],
    }[spec.name]
    extra = (R + 2,) if spec is K.BACKWARD_ROWS else ()
    return inputs, spec.configure(inputs, P, D, *extra)


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16], ids=str)
@pytest.mark.parametrize("spec", K.KERNELS, ids=lambda s: s.name)
def test_harness_compiles_exactly_what_mlx_generates(spec, dtype, capfd, tmp_path):
    """MLX prints the kernel text it would compile (verbose=True) while exporting a
    function, which works without Metal. It must equal the harness's text."""
    inputs, config = _spec_inputs(spec, dtype)
    kernel = K.kernel(spec)

    def call(*arrays):
        return kernel(inputs=list(arrays), **config.kwargs(), verbose=True)

    capfd.readouterr()
    mx.export_function(str(tmp_path / "k.mlxfn"), call, *inputs)
    printed = capfd.readouterr().out
    m = re.search(r"Generated source code for `[^`]*`:\n```\n(.*)\n```\n", printed, re.S)
    assert m, printed[:500]
    ours = compiled_text(spec, inputs, config.template, config.output_dtypes)
    assert ours.text == m.group(1)
    s0, s1 = ours.source_span
    assert ours.text[s0:s1] == (K.METAL_DIR / spec.file).read_text()


@pytest.mark.parametrize("spec", K.KERNELS, ids=lambda s: s.name)
def test_translation_unit_suits_clang(spec):
    """clang, Apple's included, rejects attribute lists in an explicit instantiation, which
    MLX's text ends with (`template [[host_name(..)]] [[kernel]] ...;`): the harness drops
    them there and compiles the rest verbatim (checked with clang 16 and libc++)."""
    inputs, config = _spec_inputs(spec, mx.float32)
    gen = compiled_text(spec, inputs, config.template, config.output_dtypes)
    tail = gen.text[gen.source_span[1]:]
    assert "[[host_name(" in tail
    unit = harness._translation_unit(gen, spec)
    body_end = unit.index(spec.source) + len(spec.source)
    assert "[[" not in unit[body_end:]
    assert re.sub(r"\[\[[^\]]*\]\]\s*", "", tail) in unit[body_end:]


def test_kernel_objects_get_the_metal_files_verbatim(monkeypatch):
    """ufb_mlx.metal_kernels hands mx.fast.metal_kernel the unmodified files; construction
    works off-Mac (only calling needs Metal)."""
    seen = {}
    real = mx.fast.metal_kernel

    def recording(**kw):
        seen[kw["name"]] = kw
        return real(**kw)

    monkeypatch.setattr(mx.fast, "metal_kernel", recording)
    K.kernel.cache_clear()
    try:
        for spec in K.KERNELS:
            assert K.kernel(spec) is not None
            kw = seen[spec.name]
            assert kw["source"] == (K.METAL_DIR / spec.file).read_text() == spec.source
            header = (K.METAL_DIR / spec.header_file).read_text() if spec.header_file else ""
            assert kw["header"] == header == spec.header
            assert kw["compile_options"] == {"math_mode": "safe"}
            assert kw["input_names"] == list(spec.input_names)
            assert kw["output_names"] == list(spec.output_names)
            assert kw["atomic_outputs"] is False
    finally:
        K.kernel.cache_clear()


def test_not_available_off_mac_raises_clearly():
    assert K.available() == mx.metal.is_available()
    if K.available():
        pytest.skip("this machine has Metal")
    layer = Layer(1, 1, 40, 2, mx.float32)
    with pytest.raises(RuntimeError, match="Metal"):
        K.fff_forward(*layer.forward_inputs(), 1, 1)


# ---- exact-erf GELU in fff_gelu.h ---------------------------------------------------------

GELU_PROBE = Kernel(
    name="gelu_probe",
    input_names=("v",),
    output_names=("erf_out", "erfc_out", "gelu_out", "grad_out"),
    source="""
const uint i = thread_position_in_grid.x;
const float a = v[i];
erf_out[i] = fff_erf(a);
erfc_out[i] = fff_erfc(a);
gelu_out[i] = fff_gelu(a);
grad_out[i] = fff_gelu_grad(a);
""",
    header=K.FORWARD.header,
)


def test_erf_and_gelu_accuracy(metal):
    """Against math.erf / math.erfc in float64 on a dense grid plus the branch points.
    Measured here: erf 7.5e-8 relative (1.1 float32 ulp), erfc 3.2e-7 relative, gelu
    4.1e-7 relative, gelu' 1.3e-7 absolute. Bounds, about twice that: erf 1.5e-7
    relative; erfc 6e-7 relative while it is a normal float32 (its exp(-x^2) is split so
    a large x^2 costs no accuracy); gelu 8e-7 relative for z >= -13 while normal (no
    1 - erf cancellation for negative z); gelu' 2.5e-7 absolute (it is O(1)).
    Below the smallest normal float32, 2**-126 (erfc for x > ~9.19), a relative bound
    means nothing: Apple GPUs flush subnormal results to zero (the "ftz" run does too),
    and IEEE subnormals carry fewer significant bits. There the error may be anything up
    to 2**-126 in absolute terms, which is what flushing costs. The model never sees such
    values (gelu of z < -13 is below 1e-37)."""
    pts = np.concatenate([
        np.linspace(-12, 12, 48001),
        [0.0, 1e-30, -1e-30, 1e-10, 1.0, -1.0, np.nextafter(1.0, 0), -np.nextafter(1.0, 0),
         math.sqrt(2), -math.sqrt(2), 15.0, -15.0, 30.0, -30.0],
    ]).astype(np.float32)
    # through K.launch: on a Mac the GPU runs the probe, built as the FFF kernels are
    probe = K.Launch(template=[], grid=(pts.size, 1, 1), threadgroup=(256, 1, 1),
                     output_shapes=[pts.shape] * 4, output_dtypes=[mx.float32] * 4)
    erf_k, erfc_k, gelu_k, grad_k = (
        np.array(o, dtype=np.float64) for o in K.launch(GELU_PROBE, [mx.array(pts)], probe))
    x = pts.astype(np.float64)
    erf_r = np.array([math.erf(t) for t in x])
    erfc_r = np.array([math.erfc(t) for t in x])
    # Phi through erfc: ufb_ref.gelu's 1 + erf(z/sqrt(2)) cancels in float64 below z ~ -6
    cdf = np.array([0.5 * math.erfc(-t / math.sqrt(2)) for t in x])
    gelu_r = x * cdf
    grad_r = cdf + x * np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)

    nz = erf_r != 0
    assert erf_k[~nz].tolist() == erf_r[~nz].tolist()
    assert np.max(np.abs(erf_k - erf_r)[nz] / np.abs(erf_r[nz])) <= 1.5e-7
    tiny = 2.0**-126  # the smallest normal float32
    normal = erfc_r >= tiny
    assert np.max(np.abs(erfc_k - erfc_r)[normal] / erfc_r[normal]) <= 6e-7
    assert np.all(np.abs(erfc_k[~normal] - erfc_r[~normal]) <= tiny)
    assert (~normal).sum() >= 20 and normal[x < 9.19].all()  # the grid reaches below 2**-126
    sel = (x >= -13) & (np.abs(gelu_r) >= tiny)
    assert np.max(np.abs(gelu_k - gelu_r)[sel] / np.abs(gelu_r[sel])) <= 8e-7
    assert np.all(np.abs(gelu_k - gelu_r)[x < -13] <= 1e-37)
    assert np.max(np.abs(grad_k - grad_r)) <= 2.5e-7


# ---- the harness fails loudly ------------------------------------------------------------

PROBE_HEAD = "const uint i = thread_position_in_grid.x;\n"


@needs_compiler
@pytest.mark.parametrize(
    "body, atomic, message",
    [
        ("out[i] = simd_prefix_exclusive_sum(inp[i]);", False, "simd_prefix_exclusive_sum"),
        ("out[i] = metal::precise::erf(inp[i]);", False, "precise::erf"),
        ("const device float* p = inp;\nout[i] = p[i];", False, "`device`"),
        ("#include <metal_atomic>\nout[i] = inp[i];", False, "preprocessor"),
        ("#pragma unroll\nfor (uint j = 0; j < 2u; ++j) {\n  out[i] = inp[i];\n}", False, "preprocessor"),
        ("#pragma clang loop unroll(full)\nout[i] = inp[i];", False, "must precede a for loop"),
        ("out[i] = inp[i] + float(thread_index_in_quadgroup);", False, "quadgroup"),
        ("atomic_fetch_add_explicit(&out[0], inp[i], memory_order_relaxed);", True, "atomic"),
    ],
    ids=["simd_prefix", "precise_erf", "device_pointer", "include", "other_pragma", "stray_unroll",
         "quadgroup", "atomics"],
)
def test_harness_rejects_unmodelled_constructs(body, atomic, message):
    kern = Kernel("reject_probe", ("inp",), ("out",), PROBE_HEAD + body, atomic_outputs=atomic)
    with pytest.raises(HarnessError, match=re.escape(message)):
        run_kernel(kern, [np.zeros(64, np.float32)], grid=(64, 1, 1), threadgroup=(32, 1, 1),
                   output_shapes=[(64,)], output_dtypes=[mx.float32])


@needs_compiler
@pytest.mark.parametrize(
    "body, message",
    [
        ("float s = inp[i];\nif (thread_index_in_simdgroup < 16) {\n  s = simd_sum(s);\n}\nout[i] = s;",
         "inactive lanes"),
        ("out[i + 1] = inp[i];", "wrote outside output"),
    ],
    ids=["divergent_simd_sum", "out_of_bounds_write"],
)
def test_harness_reports_runtime_faults(body, message):
    kern = Kernel("fault_probe", ("inp",), ("out",), PROBE_HEAD + body)
    with pytest.raises(HarnessError, match=message):
        run_kernel(kern, [np.zeros(64, np.float32)], grid=(64, 1, 1), threadgroup=(64, 1, 1),
                   output_shapes=[(64,)], output_dtypes=[mx.float32])


SIMD_PROBE = Kernel(
    name="simd_probe",
    input_names=("inp",),
    output_names=("out",),
    source="""
const uint i = thread_position_in_grid.x;
const uint lane = thread_index_in_simdgroup;
const uint t = thread_index_in_threadgroup;
const float v = inp[i];
threadgroup float shared[64];
shared[t] = v;
threadgroup_barrier(mem_flags::mem_threadgroup);
out[i * 7 + 0] = simd_sum(v);
out[i * 7 + 1] = simd_max(v);
out[i * 7 + 2] = simd_broadcast(v, 3);
out[i * 7 + 3] = simd_shuffle(v, 31 - lane);
out[i * 7 + 4] = simd_shuffle_down(v, 1);
out[i * 7 + 5] = simd_shuffle_xor(v, 5);
out[i * 7 + 6] = shared[(t + 1) % threads_per_threadgroup.x];
""",
)


@needs_compiler
def test_harness_simdgroup_and_threadgroup_semantics():
    """The modelled simdgroup ops and threadgroup memory, on two threadgroups of 64."""
    v = np.arange(128, dtype=np.float32) * 0.5 - 7.0
    (out,) = run_kernel(SIMD_PROBE, [v], grid=(128, 1, 1), threadgroup=(64, 1, 1),
                        output_shapes=[(128 * 7,)], output_dtypes=[mx.float32])
    out = np.array(out).reshape(128, 7)
    lane = np.arange(128) % 32
    sg = v.reshape(4, 32)
    np.testing.assert_array_equal(out[:, 0], np.repeat(sg.sum(1), 32))
    np.testing.assert_array_equal(out[:, 1], np.repeat(sg.max(1), 32))
    np.testing.assert_array_equal(out[:, 2], np.repeat(sg[:, 3], 32))
    base = np.arange(128) - lane
    np.testing.assert_array_equal(out[:, 3], v[base + 31 - lane])
    np.testing.assert_array_equal(out[:, 4], v[np.where(lane < 31, np.arange(128) + 1, np.arange(128))])
    np.testing.assert_array_equal(out[:, 5], v[base + (lane ^ 5)])
    t = np.arange(128) % 64
    np.testing.assert_array_equal(out[:, 6], v[np.arange(128) - t + (t + 1) % 64])


FTZ_PROBE = Kernel(
    name="ftz_probe",
    input_names=("inp",),
    output_names=("out",),
    source="""
const uint i = thread_position_in_grid.x;
out[2 * i] = inp[i] * 0.5f;
out[2 * i + 1] = simd_sum(inp[i]);
""",
)


@needs_compiler
def test_harness_flushes_subnormals_when_asked():
    """ftz=True: a product that would be subnormal is 0, and subnormal operands count as 0
    (also in simd_sum), as on Apple GPUs; ftz=False keeps IEEE subnormals. The calling
    thread's own arithmetic is IEEE again afterwards."""
    v = np.full(32, 2.0**-140, np.float32)
    v[0] = 2.0**-126
    results = {}
    for ftz in (False, True):
        (out,) = run_kernel(FTZ_PROBE, [v], grid=(32, 1, 1), threadgroup=(32, 1, 1),
                            output_shapes=[(64,)], output_dtypes=[mx.float32], ftz=ftz)
        results[ftz] = np.array(out).reshape(32, 2)
    ieee, ftz = results[False], results[True]
    np.testing.assert_array_equal(ieee[:, 0], v * np.float32(0.5))
    assert ieee[0, 0] == np.float32(2.0**-127) and ieee[0, 1] == np.float32(2.0**-126 + 31 * 2.0**-140)
    assert (ftz[:, 0] == 0).all() and (ftz[:, 1] == np.float32(2.0**-126)).all()
    assert np.float32(2.0**-126) * np.float32(0.5) == np.float32(2.0**-127)


def test_per_lane_loops_are_compile_time_bounded_and_unrolled():
    """Every per-lane register array of metal/ has a compile-time size computed from the
    template arguments, and every loop over that size is fully unrolled, so each element
    has a constant index and can stay in a register (the header comments say which
    arrays and why)."""
    template_names = {"H", "P", "D", "G", "TGS", "C", "YT"}
    arrays_seen = 0
    for path in sorted(K.METAL_DIR.glob("*.metal")):
        lines = path.read_text().splitlines()
        code = "\n".join(ln.split("//")[0] for ln in lines)
        constexprs = dict(re.findall(r"constexpr\s+\w+\s+(\w+)\s*=\s*([^;]+);", code))
        sizes = set(re.findall(r"^\s*float\s+\w+\[(\w+)\];", code, re.M))
        arrays_seen += len(re.findall(r"^\s*float\s+\w+\[(\w+)\];", code, re.M))
        for size in sizes:
            assert size in constexprs, f"{path.name}: array size {size} is not a constexpr"
            names = set(re.findall(r"[A-Za-z_]\w*", constexprs[size])) - {"uint", "u"}
            assert names <= template_names | set(constexprs), (path.name, size, names)
        if sizes:  # the header comment says what stays in registers
            assert "// Registers" in path.read_text(), path.name
        for i, line in enumerate(lines):
            m = re.match(r"\s*for \(uint \w+ = 0; \w+ < (\w+);", line)
            if m and m.group(1) in sizes:
                assert lines[i - 1].strip() == "#pragma clang loop unroll(full)", (
                    f"{path.name} line {i + 1}: loop over {m.group(1)} without full unrolling")
    assert arrays_seen == 4  # xv, acc (forward); g, acc (backward_tokens)
