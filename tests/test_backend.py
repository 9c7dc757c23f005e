"""The rule that picks the conditional FFF's implementation (ufb_mlx.backend): by the
default device; an explicit backend wins and runs on its own device; an explicit backend
that is not present is a one-line error. A model resolves it once, when built, and again
on ``set_backend``.

A Linux machine has no GPU, so the table is exercised by monkeypatching what is present
(Metal, the CPU extension) and the default device; which implementation fff_conditional
then calls, and on which stream, is recorded by stand-ins. Where Metal is real (a Mac),
the last tests run the same decisions with MLX's own streams and devices.
"""

from __future__ import annotations

import contextlib

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import ufb_mlx
from ufb_mlx import backend, cpu_kernels, metal_kernels
from ufb_mlx import fff as mlx_fff
from ufb_mlx.check import ATOL, fff_forward_tolerance
from ufb_ref.errors import UFBError

from conftest import MLM

on_mac = pytest.mark.skipif(not mx.metal.is_available(), reason="needs a Metal GPU (real streams)")


@pytest.fixture
def machine(monkeypatch):
    """machine(metal=, cpu=, default=): what this machine has, and its default device."""

    def set_(metal: bool, cpu: bool, default):
        monkeypatch.setattr(backend, "metal_unavailable_reason", lambda: None if metal else "no Metal GPU here")
        monkeypatch.setattr(backend, "cpu_available", lambda: cpu)
        monkeypatch.setattr(backend, "cpu_unavailable_reason", lambda: "" if cpu else "ufb_mlx._ext is not built")
        monkeypatch.setattr(mx.metal, "is_available", lambda: metal)
        monkeypatch.setattr(mx, "default_device", lambda: default)

    return set_


GPU, CPU = mx.Device(mx.DeviceType.gpu), mx.Device(mx.DeviceType.cpu)

# (metal present, CPU extension present, default device) -> what "auto" picks
AUTO_TABLE = [
    (True, True, GPU, "metal"),     # a Mac, GPU default
    (True, True, CPU, "cpu"),       # a Mac with mx.set_default_device(mx.cpu) or mx.stream(mx.cpu)
    (True, False, CPU, "ops"),      # ... without the extension
    (False, True, CPU, "cpu"),      # Linux
    (False, False, CPU, "ops"),     # Linux without the extension
    (False, True, GPU, "ops"),      # a GPU without Metal (e.g. a CUDA build of MLX)
]


@pytest.mark.parametrize("metal, cpu, default, expected", AUTO_TABLE)
def test_auto_follows_the_default_device(machine, metal, cpu, default, expected):
    machine(metal, cpu, default)
    assert backend.resolve("auto") == expected
    assert backend.resolve() == expected
    assert backend.resolve("auto", device=default) == expected
    assert backend.resolve("auto", device=default.type) == expected  # mx.cpu / mx.gpu


@pytest.mark.parametrize("metal, cpu, default, expected", AUTO_TABLE)
def test_device_argument_overrides_the_default(machine, metal, cpu, default, expected):
    """``resolve(device=...)`` decides by the device given (the stream an op will run
    on), not by the default device."""
    other = CPU if default.type == mx.DeviceType.gpu else GPU
    machine(metal, cpu, other)
    assert backend.resolve("auto", device=default) == expected


@pytest.mark.parametrize("metal", [True, False])
@pytest.mark.parametrize("cpu", [True, False])
@pytest.mark.parametrize("default", [GPU, CPU], ids=["gpu-default", "cpu-default"])
def test_explicit_backend_wins_or_fails_in_one_line(machine, metal, cpu, default):
    machine(metal, cpu, default)
    assert backend.resolve("ops") == "ops"
    for name, present in (("metal", metal), ("cpu", cpu)):
        if present:
            assert backend.resolve(name) == name
        else:
            with pytest.raises(UFBError) as e:
                backend.resolve(name)
            msg = str(e.value)
            assert "\n" not in msg and f"backend {name!r} is not available" in msg


def test_unknown_backend_is_refused():
    with pytest.raises(UFBError, match="backend must be one of auto, ops, cpu, metal, got 'gpu'"):
        backend.resolve("gpu")


def test_explicit_backend_runs_on_its_own_device(machine, monkeypatch):
    """fff_conditional places an explicit backend on its device: "metal" on the GPU even
    when the default device is the CPU, "cpu" on the CPU even under a GPU default; "auto"
    and "ops" stay on the current stream."""
    calls, streams = [], []

    def stand_in(name):
        def impl(x, *rest):
            calls.append(name)
            return x
        return impl

    monkeypatch.setattr(mlx_fff, "_IMPLEMENTATIONS", {n: stand_in(n) for n in ("metal", "cpu", "ops")})

    @contextlib.contextmanager
    def stream(device):
        streams.append(getattr(device, "type", device))
        yield

    monkeypatch.setattr(mx, "stream", stream)
    x, w_in, b_in, w_out = mx.ones((2, 4)), mx.ones((7, 4)), mx.ones((7,)), mx.ones((4, 7))
    cases = [  # (default device, backend) -> (implementation, stream entered or None)
        (CPU, "metal", "metal", mx.DeviceType.gpu),
        (GPU, "cpu", "cpu", mx.DeviceType.cpu),
        (GPU, "auto", "metal", None),
        (CPU, "auto", "cpu", None),
        (GPU, "ops", "ops", None),
    ]
    for default, name, impl, entered in cases:
        machine(True, True, default)
        calls.clear(), streams.clear()
        mlx_fff.fff_conditional(x, w_in, b_in, w_out, 1, 2, backend=name)
        assert calls == [impl], (default, name)
        assert streams == ([] if entered is None else [entered]), (default, name)


def test_load_refuses_an_absent_backend_before_reading(machine, tmp_path):
    machine(False, False, CPU)
    with pytest.raises(UFBError, match="backend 'metal' is not available: no Metal GPU here"):
        ufb_mlx.load(tmp_path / "does-not-exist", backend="metal")
    with pytest.raises(UFBError, match="backend 'cpu' is not available: ufb_mlx._ext is not built"):
        ufb_mlx.load(tmp_path / "does-not-exist", backend="cpu")


def test_missing_kernel_sources_are_named(monkeypatch, tmp_path):
    """A Mac whose installation lost metal/: "metal" (explicit, or auto on the GPU) is
    refused in one line that names the missing files, instead of a traceback at the
    first forward or a silent fall-back."""
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    monkeypatch.setattr(metal_kernels, "METAL_DIR", tmp_path)
    metal_kernels.missing_sources.cache_clear()
    try:
        assert backend.resolve("auto", device=CPU) in ("cpu", "ops")
        for call in (lambda: backend.resolve("metal"), lambda: backend.resolve("auto", device=GPU)):
            with pytest.raises(UFBError) as e:
                call()
            msg = str(e.value)
            assert "\n" not in msg and "fff_forward.metal" in msg and str(tmp_path) in msg
    finally:
        monkeypatch.undo()
        metal_kernels.missing_sources.cache_clear()
    assert metal_kernels.missing_sources() == ()


def test_describe_reports_what_is_present():
    d = backend.describe()
    assert d["auto"] == backend.resolve("auto")
    assert d["metal"] == (d["metal_reason"] is None) == backend.metal_available()
    assert d["cpu"] == backend.cpu_available() and (d["cpu_reason"] is None) == d["cpu"]
    assert d["present"] == ["ops"] + ["cpu"] * d["cpu"] + ["metal"] * d["metal"]
    line = backend.present_line(d)
    assert line.startswith(f"FFF implementations present: {', '.join(d['present'])}")
    for name in ("cpu", "metal"):
        assert (f"{name} absent: {d[name + '_reason']}" in line) is (not d[name])
    assert (d["platform_problem"] is None) is (mx.metal.is_available() and d["metal"])


@pytest.mark.parametrize("system, machine, version, python, rosetta, expected", [
    ("Darwin", "arm64", "14.5", (3, 11), False, None),
    ("Darwin", "arm64", "15.0", (3, 10), False, None),
    ("Linux", "x86_64", "", (3, 11), False, "this is Linux x86_64, not a Mac"),
    ("Linux", "aarch64", "", (3, 11), False, "this is Linux aarch64, not a Mac"),
    ("Darwin", "x86_64", "14.5", (3, 11), False, "Intel CPU (x86_64)"),
    ("Darwin", "x86_64", "14.5", (3, 11), True, "running under Rosetta"),
    ("Darwin", "arm64", "13.6", (3, 11), False, "macOS 13.6"),
    ("Darwin", "arm64", "14.1", (3, 9), False, "Python 3.9"),
], ids=["sonoma", "sequoia-py310", "linux", "linux-arm", "intel-mac", "rosetta", "ventura", "py39"])
def test_platform_requirements(system, machine, version, python, rosetta, expected):
    """Apple Silicon, macOS >= 14, a native arm64 Python 3.10+ (MLX's own wheels need the
    same); anything else is named in one line with what the Metal path needs."""
    got = backend.platform_problem(system, machine, version, python, rosetta=lambda: rosetta)
    if expected is None:
        assert got is None
    else:
        assert expected in got and backend.METAL_PLATFORM in got


def test_a_failed_extension_build_is_reported_with_its_remedy(monkeypatch, tmp_path):
    """setup.py leaves its reason and remedy in BUILD_NOTE when it could not build the
    extension: the reason every report gives is then that sentence."""
    from ufb_mlx import cpu_kernels

    note = tmp_path / "note.txt"
    monkeypatch.setattr(backend, "BUILD_NOTE_PATH", note)
    monkeypatch.setattr(cpu_kernels, "unavailable_reason", lambda: "the C++ extension ufb_mlx._ext is not built")
    assert backend.cpu_unavailable_reason() == "the C++ extension ufb_mlx._ext is not built"
    note.write_text("the fused CPU extension ufb_mlx._ext was not built (no C++ compiler);\n"
                    "the MLX-operations path runs instead; for the fused CPU kernels, install g++\n")
    assert backend.cpu_unavailable_reason() == (
        "the fused CPU extension ufb_mlx._ext was not built (no C++ compiler); the MLX-operations "
        "path runs instead; for the fused CPU kernels, install g++")
    monkeypatch.setattr(cpu_kernels, "unavailable_reason", lambda: "")  # built after all
    assert backend.cpu_unavailable_reason() == ""


def test_cpu_stream_here_picks_a_cpu_implementation():
    """The real stream context: inside ``mx.stream(mx.cpu)`` auto never picks "metal"."""
    with mx.stream(mx.cpu):
        assert mx.default_device() == mx.cpu
        assert backend.resolve() == ("cpu" if backend.cpu_available() else "ops")


# ---- on a Mac: MLX's own devices and streams ----------------------------------------------


@on_mac
@pytest.mark.parametrize("how", ["stream", "default-device"])
def test_mac_cpu_stream_runs_the_cpu_implementation(how):
    """On a Mac the GPU is the default; under ``mx.stream(mx.cpu)`` or
    ``mx.set_default_device(mx.cpu)`` a conditional forward must run on the CPU (Metal
    kernels there raise "Only supports the GPU") and agree with the GPU's."""
    model, tok = ufb_mlx.load(MLM)
    batch = tok(["The capital of France is [MASK]."])
    assert backend.resolve() == "metal" and model.impl == "metal"
    on_gpu = np.array(model(batch["input_ids"], attention_mask=batch["attention_mask"]))
    if how == "stream":
        ctx = mx.stream(mx.cpu)
    else:
        ctx = contextlib.ExitStack()
        saved = mx.default_device()
        mx.set_default_device(mx.cpu)
        ctx.callback(mx.set_default_device, saved)
    with ctx:
        assert backend.resolve() in ("cpu", "ops")
        # Resolved when built: the FFF stays "metal", placed on the GPU (no error).
        kept = np.array(model(batch["input_ids"], attention_mask=batch["attention_mask"]))
        model.set_backend("auto")  # resolved again, now by the CPU default
        assert model.impl in ("cpu", "ops")
        on_cpu = np.array(model(batch["input_ids"], attention_mask=batch["attention_mask"]))
    # each device is within the golden tests' ATOL of the stored logits
    np.testing.assert_allclose(on_cpu, on_gpu, atol=2 * ATOL, rtol=0)
    np.testing.assert_allclose(kept, on_gpu, atol=2 * ATOL, rtol=0)


@on_mac
def test_mac_explicit_metal_under_a_cpu_default():
    x = mx.random.normal((5, 40), key=mx.random.key(0))
    w_in, b_in = mx.random.normal((7, 40), key=mx.random.key(1)), mx.zeros((7,))
    w_out = mx.random.normal((40, 7), key=mx.random.key(2))
    want = np.array(mlx_fff.fff_conditional(x, w_in, b_in, w_out, 1, 2, backend="ops"))
    with mx.stream(mx.cpu):
        got = np.array(mlx_fff.fff_conditional(x, w_in, b_in, w_out, 1, 2, backend="metal"))
    np.testing.assert_allclose(got, want, atol=fff_forward_tolerance(want), rtol=0)


def _impls(model) -> set[str]:
    """The implementations the model's dispatching layers (norms, attention, FFF) hold."""
    return {m.impl for _, m in model.named_modules() if m is not model and hasattr(m, "impl")}


def test_the_rule_is_used_by_load_and_fff_layers():
    """load() resolves the backend once, when it builds the model: "auto" by the default
    device then, an explicit name as itself; every layer keeps the implementation."""
    model, _ = ufb_mlx.load(MLM)
    assert model.backend == "auto" and model.impl == backend.resolve("auto")
    assert _impls(model) == {backend.resolve("auto")}
    model, _ = ufb_mlx.load(MLM, backend="ops")
    assert model.backend == "ops" and _impls(model) == {"ops"}


def test_a_forward_resolves_nothing(monkeypatch):
    """The backend is not decided again at each call: a forward and a backward pass of a
    built model never call backend.resolve (which the five layer sites did per call)."""
    model, tok = ufb_mlx.load(MLM)
    batch = tok(["The capital of France is [MASK]."])
    calls = []
    monkeypatch.setattr(backend, "resolve", lambda *a, **k: calls.append(a) or "ops")
    loss = lambda m: m(batch["input_ids"], attention_mask=batch["attention_mask"]).astype(mx.float32).sum()
    value, grads = nn.value_and_grad(model, loss)(model)
    mx.eval(value, grads)
    assert calls == []


def test_set_backend_switches_the_implementation(machine, monkeypatch):
    """set_backend resolves again and every layer runs the new implementation from the
    next call on (which implementation ran is recorded by spies around the real ones);
    an absent one is refused in one line and the model keeps its own."""
    model, tok = ufb_mlx.load(MLM)
    batch = tok(["The capital of France is [MASK].", "Paris is a [MASK]."])
    forward = lambda: np.array(model(batch["input_ids"], attention_mask=batch["attention_mask"]))
    ran = []
    real = dict(mlx_fff._IMPLEMENTATIONS)
    monkeypatch.setattr(mlx_fff, "_IMPLEMENTATIONS", {
        name: (lambda *a, _n=name: ran.append(_n) or real[_n](*a)) for name in real})
    for op in ("layer_norm", "attention"):
        real_op = getattr(cpu_kernels, op)
        monkeypatch.setattr(cpu_kernels, op, lambda *a, _f=real_op, _n=op: ran.append(_n) or _f(*a))
    auto = backend.resolve("auto")
    first = forward()
    assert set(ran) == ({"cpu", "layer_norm", "attention"} if auto == "cpu" else {auto})
    ran.clear()
    model.set_backend("ops")
    assert model.backend == "ops" and _impls(model) == {"ops"}
    switched = forward()
    assert ran == ["ops"] * model.args.num_layers
    # Each implementation is within the golden tests' ATOL of the stored logits.
    np.testing.assert_allclose(switched, first, atol=2 * ATOL, rtol=0)
    ran.clear()
    model.set_backend("auto")
    assert _impls(model) == {auto}
    np.testing.assert_array_equal(forward(), first)  # the same implementation: the same bits
    machine(False, False, CPU)
    for name in ("metal", "cpu"):
        with pytest.raises(UFBError, match=f"backend '{name}' is not available") as e:
            model.set_backend(name)
        assert "\n" not in str(e.value)
    assert model.backend == "auto" and _impls(model) == {auto}
