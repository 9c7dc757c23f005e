"""python -m ufb_mlx.check: what a Mac user runs first. It must pass here on the demo
model and random configurations with every backend present (Metal through the
emulator, said so), fail (exit 1) when a backend computes something else, and refuse bad
input in one line (exit 2)."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import pytest

from ufb_mlx import backend
from ufb_mlx import check as check_lib
from ufb_mlx import fff as mlx_fff
from ufb_mlx import model as model_lib
from ufb_ref.errors import UFBError

from conftest import MLM
from train_utils import run_module

CHECKS = ["model: logits", "model: routing paths", "model FFF layers: output", "model FFF layers: gradients",
          "random FFF configurations: output", "random FFF configurations: gradients"]


@pytest.mark.slow
def test_passes_here_on_the_demo_model_with_every_backend():
    proc = run_module("ufb_mlx.check", "--json", timeout=600)
    doc = json.loads(proc.stdout)
    assert doc["ok"] is True and doc["model"]["path"].endswith("demo_model")
    assert len(doc["configs"]) == 4 and doc["configs"][:2] == ["1x11 H=768 T=64", "2x4 H=2048 T=300"]
    present = [b["backend"] for b in doc["backends"]]
    assert present[0] == "ops" and set(present) | set(doc["skipped"]) == {"ops", "cpu", "metal"}
    assert ("cpu" in present) == backend.cpu_available()
    for b in doc["backends"]:
        assert b["ok"] and b["error"] is None and b["seconds"] > 0
        assert [r["check"] for r in b["results"]] == CHECKS
        for r in b["results"]:
            assert r["ok"] and (r["error"] <= r["tolerance"] or r["check"] == "model: routing paths")
    metal = next((b for b in doc["backends"] if b["backend"] == "metal"), None)
    if not mx.metal.is_available():  # off a Mac: through the emulator, and the report says so
        assert metal is not None and metal["emulated"] and "emulator" in metal["runs_on"]


def only_ops(monkeypatch):
    monkeypatch.setattr(check_lib, "available_backends", lambda: (["ops"], {}))


def test_report_names_what_is_present_and_the_platform(monkeypatch, capsys):
    """The report's head says which implementations are present, why the others are not,
    and, on a machine that is not a supported Mac, the Metal path's requirements."""
    only_ops(monkeypatch)
    assert check_lib.main(["--model", str(MLM), "--configs", "0"]) == 0
    head = capsys.readouterr().out.splitlines()[:3]
    d = backend.describe()
    assert head[1] == backend.present_line(d)
    assert head[1].startswith("FFF implementations present: ops")
    if d["platform_problem"]:
        assert head[2].startswith(f"platform: {d['platform_problem']}")
        assert "Apple Silicon, macOS >= 14 and a native arm64 Python 3.10+" in head[2]
    else:
        assert not head[2].startswith("platform:")


def test_a_wrong_output_fails(monkeypatch, capsys):
    """An "ops" backend whose output's first feature is off by 1e-3 (a shift of every
    feature alike would vanish in the next LayerNorm): the model, layer and configuration
    checks fail, and main() exits 1."""
    only_ops(monkeypatch)
    real = mlx_fff._IMPLEMENTATIONS["ops"]

    def off(*a):
        y = real(*a)
        return y + 1e-3 * (mx.arange(y.shape[-1]) == 0)

    monkeypatch.setitem(mlx_fff._IMPLEMENTATIONS, "ops", off)
    assert check_lib.main(["--model", str(MLM), "--configs", "1"]) == 1
    out = capsys.readouterr().out
    assert "SOME CHECKS FAILED" in out
    doc = check_lib.check(MLM, configs=1)
    failed = {r["check"] for r in doc["backends"][0]["results"] if not r["ok"]}
    assert {"model: logits", "model FFF layers: output", "random FFF configurations: output"} <= failed
    assert "model: routing paths" not in failed


def test_a_wrong_gradient_fails(monkeypatch):
    only_ops(monkeypatch)
    real = mlx_fff._IMPLEMENTATIONS["ops"]

    @mx.custom_function
    def scaled_grad(y):
        return y

    @scaled_grad.vjp
    def _(primals, cotangent, output):
        return (cotangent * 1.01,)

    monkeypatch.setitem(mlx_fff._IMPLEMENTATIONS, "ops", lambda *a: scaled_grad(real(*a)))
    doc = check_lib.check(MLM, configs=1)
    failed = {r["check"] for r in doc["backends"][0]["results"] if not r["ok"]}
    assert failed == {"model FFF layers: gradients", "random FFF configurations: gradients"}


def test_a_wrong_routing_fails(monkeypatch):
    """Paths that differ from float64 at a decision away from 0 are a routing failure."""
    only_ops(monkeypatch)
    real = model_lib.FFF.routing
    monkeypatch.setattr(model_lib.FFF, "routing", lambda self, x: real(self, x) ^ 1)  # a sibling
    doc = check_lib.check(MLM, configs=0)
    routing = next(r for r in doc["backends"][0]["results"] if r["check"] == "model: routing paths")
    assert not routing["ok"] and "away from 0" in routing["detail"] and not doc["ok"]


def test_a_backend_that_raises_fails(monkeypatch):
    only_ops(monkeypatch)

    def broken(*a):
        raise RuntimeError("kernel launch failed\nsecond line")

    monkeypatch.setitem(mlx_fff._IMPLEMENTATIONS, "ops", broken)
    doc = check_lib.check(MLM, configs=0)
    assert not doc["ok"] and doc["backends"][0]["error"] == "RuntimeError: kernel launch failed"
    assert "raised RuntimeError: kernel launch failed" in check_lib.format_report(doc)


@pytest.mark.parametrize("args, message", [
    (["--model", "/no/such/folder"], "neither a local folder nor a Hub repo id"),
    (["--configs", "-1"], "--configs must be 0 or more, got -1"),
])
def test_bad_input_is_one_line_and_exit_2(args, message):
    proc = run_module("ufb_mlx.check", *args, check=False)
    assert proc.returncode == 2 and proc.stdout == ""
    err = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(err) == 1 and message in err[0] and "Traceback" not in proc.stderr, proc.stderr


def test_dense_ffn_model_is_refused(converted_mlm, tmp_path):
    """A dense-FFN twin has no conditional FFF: a one-line error, not an empty report."""
    folder = tmp_path / "ffn"
    shutil.copytree(converted_mlm, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(intermed_type="ffn", ffn_width=cfg["fff_trees"] * (2 ** (cfg["fff_depth"] + 1) - 1))
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UFBError, match="dense feedforward layers .* no conditional FFF to check"):
        check_lib.check(folder, configs=0)


def test_an_absent_backend_is_reported_not_checked(monkeypatch):
    """Off a Mac without a C++ compiler "metal" cannot be emulated: listed with the reason,
    not counted as passing."""
    from ufb_mlx import metal_emu

    monkeypatch.setattr(mx.metal, "is_available", lambda: False)
    monkeypatch.setattr(metal_emu, "unavailable_reason", lambda: "no C++ compiler found")
    names, skipped = check_lib.available_backends()
    assert "metal" not in names and skipped["metal"] == "no C++ compiler found"
    doc = check_lib.check(MLM, configs=0)
    assert [b["backend"] for b in doc["backends"]] == names
    assert "metal  not checked: no C++ compiler found" in check_lib.format_report(doc)
