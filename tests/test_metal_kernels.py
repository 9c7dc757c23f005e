"""The Metal kernels in metal/, run off-Mac through the emulator in tests/metal_emu and
compared with the NumPy reference (ufb_ref.fff) evaluated in float64.

ufb_mlx.kernels.launch is the one place that calls Metal; the `emu` fixture puts
the emulator there, so fff_forward / fff_backward run end to end (validation, launch
configuration, the MLX glue between the backward kernels) exactly as on a Mac.

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
  over 20 seeds x 3 token counts per case the worst float32 error was 2e-7 * m.
- y in float16 / bfloat16: plus the final rounding of y to the dtype, half an ulp:
  2**-11 (float16) and 2**-8 (bfloat16) of |r|.
"""

from __future__ import annotations

import math
import re
import zlib

import mlx.core as mx
import numpy as np
import pytest

try:  # tests/ is on sys.path (pytest rootdir insertion) unless it became a package
    from metal_emu import HarnessError, Kernel, compiled_text, emulated_launch, run_kernel
except ModuleNotFoundError:
    from tests.metal_emu import HarnessError, Kernel, compiled_text, emulated_launch, run_kernel

from ufb_mlx import kernels as K
from ufb_ref import fff as ref

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


def magnitudes(layer: Layer) -> dict:
    """For each output, the magnitude m of its float32 computation (see the module
    docstring), from the reference descent."""
    P, D = layer.trees, layer.depth
    T, H = layer.x64.shape
    paths, z = ref.descend(layer.x64, layer.w_in64, layer.b_in64, P, D)
    rows = (paths + (np.arange(P) * ref.n_nodes(D))[:, None]).reshape(T, -1)  # (T, V)
    z = z.reshape(T, -1)
    x, dy = np.abs(layer.x64), np.abs(layer.dy64)
    w_in, b_in, w_out_t = np.abs(layer.w_in64), np.abs(layer.b_in64), np.abs(layer.w_out64.T)
    m_z = np.einsum("tvh,th->tv", w_in[rows], x) + b_in[rows]
    slope = np.abs(ref.gelu_grad(z))
    m_act = np.abs(ref.gelu(z)) + slope * m_z
    # |gelu''| < 1, so an error e in z moves gelu'(z) by less than e
    m_dz = np.einsum("tvh,th->tv", w_out_t[rows], dy) * (slope + m_z)
    flat = rows.reshape(-1)
    m_dwin = np.zeros_like(w_in)
    np.add.at(m_dwin, flat, (m_dz[:, :, None] * x[:, None, :]).reshape(-1, H))
    m_db = np.zeros_like(b_in)
    np.add.at(m_db, flat, m_dz.reshape(-1))
    m_dwout = np.zeros_like(w_out_t)
    np.add.at(m_dwout, flat, (m_act[:, :, None] * dy[:, None, :]).reshape(-1, H))
    return {
        "z": m_z.reshape(paths.shape),
        "y": np.einsum("tv,tvh->th", m_act, w_out_t[rows]),
        "dx": np.einsum("tv,tvh->th", m_dz, w_in[rows]),
        "d_w_in": m_dwin,
        "d_b_in": m_db,
        "d_w_out_t": m_dwout,
    }


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


class Launched(list):
    """Names of the kernels launched, in order; `lane_order` is passed to the emulator."""

    lane_order = "forward"


@pytest.fixture
def emu(monkeypatch):
    """ufb_mlx.kernels.launch routed to the emulator."""
    launched = Launched()

    def recorded_launch(spec, inputs, config):
        launched.append(spec.name)
        return emulated_launch(spec, inputs, config, lane_order=launched.lane_order)

    monkeypatch.setattr(K, "launch", recorded_launch)
    return launched


def reference_forward(layer: Layer):
    paths, z = ref.descend(layer.x64, layer.w_in64, layer.b_in64, layer.trees, layer.depth)
    rows = paths + (np.arange(layer.trees) * ref.n_nodes(layer.depth))[:, None]
    y = ref.fff_descent(layer.x64, layer.w_in64, layer.b_in64, layer.w_out64, layer.trees, layer.depth)
    return y, rows, z


# ---- forward and backward against the reference -------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_forward_and_backward_match_reference(case, emu):
    P, D, H, T, dtype = case
    layer = Layer(P, D, H, T, dtype, seed=zlib.crc32(case_id(case).encode()))
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
    assert emu == ["fff_forward", "fff_backward_tokens", "fff_backward_rows"]


def test_zero_logit_goes_left(emu):
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


def test_results_do_not_depend_on_lane_scheduling(emu):
    """Same outputs, bit for bit, when the emulator runs lanes in reverse order between
    sync points: no lane reads what another lane writes without a sync."""
    P, D, H, T, dtype = CASES[3]
    layer = Layer(P, D, H, T, dtype, seed=zlib.crc32(case_id(CASES[3]).encode()))
    args = layer.forward_inputs()
    outs = {}
    for order in ("forward", "reverse"):
        emu.lane_order = order
        y, rows, z = K.fff_forward(*args, P, D)
        grads = K.fff_backward(args[0], args[1], args[3], rows, z, layer.mx(layer.dy64))
        outs[order] = [np.array(a) for a in (y, rows, z, *grads)]
    for a, b in zip(outs["forward"], outs["reverse"]):
        np.testing.assert_array_equal(a, b)


# ---- coverage of metal/ and fidelity to what MLX compiles -----------------------------------


def test_every_metal_file_is_a_kernel_and_every_kernel_runs(emu):
    files = {p.name for p in K.METAL_DIR.iterdir() if p.is_file()}
    covered = {s.file for s in K.KERNELS} | {s.header_file for s in K.KERNELS if s.header_file}
    assert files == covered, f"metal/ files without a KernelSpec: {sorted(files - covered)}"
    assert len({s.name for s in K.KERNELS}) == len(K.KERNELS)
    P, D, H, T, dtype = CASES[0]
    layer = Layer(P, D, H, T, dtype, seed=zlib.crc32(case_id(CASES[0]).encode()))
    args = layer.forward_inputs()
    y, rows, z = K.fff_forward(*args, P, D)
    K.fff_backward(args[0], args[1], args[3], rows, z, layer.mx(layer.dy64))
    assert set(emu) == {s.name for s in K.KERNELS}, "a KernelSpec is not exercised by these tests"


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
        "fff_backward_rows": [f(T, H), f(T, H), g(T, P, L), g(T, P, L), i(T * P * L), i(R + 1)],
    }[spec.name]
    return inputs, spec.configure(inputs, P, D)


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


def test_kernel_objects_get_the_metal_files_verbatim(monkeypatch):
    """ufb_mlx.kernels hands mx.fast.metal_kernel the unmodified files; construction
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
            assert kw["header"] == (K.METAL_DIR / spec.header_file).read_text() == spec.header
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


def test_erf_and_gelu_accuracy():
    """Against math.erf / math.erfc in float64 on a dense grid plus the branch points.
    Measured here: erf 7.5e-8 relative (1.1 float32 ulp), erfc 3.2e-7 relative, gelu
    4.1e-7 relative, gelu' 1.3e-7 absolute. Bounds, about twice that: erf 1.5e-7
    relative; erfc 6e-7 relative while it is a normal float (x < 9.2: its exp(-x^2) is
    split so a large x^2 costs no accuracy); gelu 8e-7 relative for z >= -13 (no
    1 - erf cancellation for negative z); gelu' 2.5e-7 absolute (it is O(1))."""
    pts = np.concatenate([
        np.linspace(-12, 12, 48001),
        [0.0, 1e-30, -1e-30, 1e-10, 1.0, -1.0, np.nextafter(1.0, 0), -np.nextafter(1.0, 0),
         math.sqrt(2), -math.sqrt(2), 15.0, -15.0, 30.0, -30.0],
    ]).astype(np.float32)
    erf_k, erfc_k, gelu_k, grad_k = (
        np.array(o, dtype=np.float64)
        for o in run_kernel(GELU_PROBE, [pts], grid=(pts.size, 1, 1), threadgroup=(256, 1, 1),
                            output_shapes=[pts.shape] * 4, output_dtypes=[mx.float32] * 4)
    )
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
    normal = x < 9.2
    assert np.max(np.abs(erfc_k - erfc_r)[normal] / erfc_r[normal]) <= 6e-7
    assert np.all(np.abs(erfc_k[~normal] - erfc_r[~normal]) <= 1e-38)
    sel = (x >= -13) & (gelu_r != 0)
    assert np.max(np.abs(gelu_k - gelu_r)[sel] / np.abs(gelu_r[sel])) <= 8e-7
    assert np.all(np.abs(gelu_k - gelu_r)[x < -13] <= 1e-37)
    assert np.max(np.abs(grad_k - grad_r)) <= 2.5e-7


# ---- the harness fails loudly ------------------------------------------------------------

PROBE_HEAD = "const uint i = thread_position_in_grid.x;\n"


@pytest.mark.parametrize(
    "body, atomic, message",
    [
        ("out[i] = simd_prefix_exclusive_sum(inp[i]);", False, "simd_prefix_exclusive_sum"),
        ("out[i] = metal::precise::erf(inp[i]);", False, "precise::erf"),
        ("const device float* p = inp;\nout[i] = p[i];", False, "`device`"),
        ("#include <metal_atomic>\nout[i] = inp[i];", False, "preprocessor"),
        ("out[i] = inp[i] + float(thread_index_in_quadgroup);", False, "quadgroup"),
        ("atomic_fetch_add_explicit(&out[0], inp[i], memory_order_relaxed);", True, "atomic"),
    ],
    ids=["simd_prefix", "precise_erf", "device_pointer", "include", "quadgroup", "atomics"],
)
def test_harness_rejects_unmodelled_constructs(body, atomic, message):
    kern = Kernel("reject_probe", ("inp",), ("out",), PROBE_HEAD + body, atomic_outputs=atomic)
    with pytest.raises(HarnessError, match=re.escape(message)):
        run_kernel(kern, [np.zeros(64, np.float32)], grid=(64, 1, 1), threadgroup=(32, 1, 1),
                   output_shapes=[(64,)], output_dtypes=[mx.float32])


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
