"""Smoke tests of ``python -m ufb_mlx.benchmark`` at tiny sizes: the JSON schema, every arm
timed, the arms that compute the same function agreeing on its values (the benchmark's own
cross-check, asserted here), the reference-BLAS guard, the plot. Nothing here asserts
anything about speed."""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ufb_mlx import backend as backend_lib
from ufb_mlx import benchmark

REPO = Path(__file__).resolve().parents[1]
from conftest import GOLDEN  # noqa: E402
from train_utils import read_terminal  # noqa: E402


def bench(*args: str, env: dict | None = None, rc: int = 0) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if k != "UFB_NO_OPENBLAS"}
    e.update(env or {})
    p = subprocess.run([sys.executable, "-m", "ufb_mlx.benchmark", *args], cwd=REPO, env=e,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == rc, p.stderr[-3000:]
    return p


def bench_json(*args: str, env: dict | None = None) -> dict:
    p = bench(*args, "--tiny", "--json", env=env)
    doc = json.loads(p.stdout)  # stdout is the JSON document and nothing else
    check_schema(doc)
    return doc


def positive(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


def check_schema(doc: dict) -> None:
    assert doc["schema"] == benchmark.SCHEMA_VERSION
    assert set(doc) >= {"benchmark", "env", "config", "results", "notes", "warnings"}
    env = doc["env"]
    for key in ("date", "mlx_version", "device", "backend", "cpu_count", "blas", "matmul_gflops",
                "dense_fair", "dense_fair_reason", "openblas_mapped", "fff_backends"):
        assert key in env, key
    assert isinstance(env["dense_fair"], bool) and positive(env["matmul_gflops"])
    assert doc["results"]
    for g in doc["results"]:
        assert set(g) >= {"label", "params", "tokens_per_batch", "reps", "arms", "ratios"}
        assert positive(g["tokens_per_batch"]) and g["reps"] >= 1
        assert g["arms"] and g["ratios"]
        for name, a in g["arms"].items():
            for key in ("median_ms", "min_ms", "max_ms", "q1_ms", "q3_ms", "us_per_token"):
                assert positive(a[key]), (name, key, a[key])
            assert len(a["times_ms"]) == a["reps"] == g["reps"]
            assert isinstance(a["dense_blas"], bool)
        for r in g["ratios"]:
            assert r["arm"] in g["arms"] and r["baseline"] in g["arms"]
            assert positive(r["ratio"]) and isinstance(r["fair"], bool)


def assert_agree(g: dict, pairs: set) -> None:
    """The benchmark checked every pair in `pairs` (arm, baseline) on its values, and each
    agreed: at most 1 % of rows (gradient elements for train) outside 1e-3 relative."""
    checks = {(c["arm"], c["baseline"]): c for c in g["checks"]}
    assert pairs <= set(checks), (pairs, set(checks))
    for pair in pairs:
        assert checks[pair]["agree"] and checks[pair]["differ"] <= 0.01, checks[pair]


def test_layer(tmp_path):
    png = tmp_path / "speedup.png"
    doc = bench_json("layer", "--tokens", "1,8", "--plot", str(png))  # matplotlib: in the [test] extra
    assert doc["benchmark"] == "layer"
    assert [g["params"]["tokens"] for g in doc["results"]] == [1, 8]
    # Every implementation present here is its own arm, named by it (this machine: ops
    # and the C++ extension; fff_metal only where Metal runs).
    impls = ["fff_ops", "fff_cpu"] + (["fff_metal"] if doc["env"]["fff_backends"]["metal"] else [])
    assert doc["config"]["fff_arms"] == [i[4:] for i in impls]
    for g in doc["results"]:
        assert set(impls) | {"masked_dense", "dense_15", "sgemm2_15", "dense_256", "numpy_ref"} == set(g["arms"])
        for impl in impls:
            assert {(r["arm"], r["baseline"]) for r in g["ratios"]} >= {
                (impl, "masked_dense"), (impl, "dense_15"), (impl, "sgemm2_15"), (impl, "numpy_ref")}
        assert_agree(g, {(impl, "masked_dense") for impl in impls + ["numpy_ref"]})
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_layer_backward():
    doc = bench_json("layer", "--tokens", "4", "--backward")
    assert doc["config"]["backward"] is True
    (g,) = doc["results"]
    assert {"fff_ops", "fff_cpu", "masked_dense", "numpy_ref"} <= set(g["arms"])
    assert "forward + backward" in g["label"]
    # the input gradients of every implementation and of the NumPy reference's VJP
    assert_agree(g, {(impl, "masked_dense") for impl in ("fff_ops", "fff_cpu", "numpy_ref")})


MODEL_ARMS = {"conditional_forward_{b}", "dense_forward_{b}", "conditional_fillmask_{b}", "dense_fillmask_{b}"}


@pytest.mark.parametrize("backend", ["cpu", "ops"])
def test_model(backend):
    doc = bench_json("model", "--batch", "1,2", "--backend", backend, "--hf-python", "none")
    assert [g["params"]["batch"] for g in doc["results"]] == [1, 2] and doc["config"]["backend"] == backend
    for g in doc["results"]:
        assert set(g["arms"]) == {a.format(b=backend) for a in MODEL_ARMS}
        assert g["tokens_per_batch"] == g["params"]["batch"] * g["params"]["seq"]
        assert_agree(g, {(f"conditional_{what}_{backend}", f"dense_{what}_{backend}") for what in ("forward", "fillmask")})
    mem = doc["memory"]
    assert positive(mem["weights_bytes"]) and positive(mem["peak_bytes"]) and positive(mem["ratio"])


FAKE_HF = """#!{python}
import json, sys
for line in sys.stdin:
    msg = json.loads(line)
    if msg["cmd"] == "setup":
        print(json.dumps({{"ok": True, "threads": 1, "probe_ms": {{"1": 5.0, "2": 9.0}}, "torch": "fake"}}), flush=True)
    elif msg["cmd"] == "run":
        print(json.dumps({{"seconds": 0.25}}), flush=True)
    else:
        break
"""


def test_model_hf_arm_is_timed_in_another_process(tmp_path):
    """The bert-base arm speaks a line protocol with a worker process; a fake worker that
    reports 250 ms per forward stands in for torch here (torch is not a test dependency)."""
    fake = tmp_path / "fake-python"
    fake.write_text(FAKE_HF.format(python=sys.executable))
    fake.chmod(0o755)
    doc = bench_json("model", "--batch", "1", "--hf-python", str(fake))
    (g,) = doc["results"]
    assert g["arms"]["hf_bert_forward"]["median_ms"] == 250.0
    assert {(r["arm"], r["baseline"]) for r in g["ratios"]} >= {
        ("conditional_forward_cpu", "hf_bert_forward"), ("conditional_fillmask_cpu", "hf_bert_forward")}
    assert any("fake with 1 thread" in n for n in doc["notes"])


def test_model_hf_arm_absent_is_stated(tmp_path):
    no_torch = tmp_path / "python-without-torch"
    no_torch.write_text("#!/bin/sh\necho 'ModuleNotFoundError: No module named torch' >&2\nexit 1\n")
    no_torch.chmod(0o755)
    doc = bench_json("model", "--batch", "1", "--hf-python", str(no_torch))
    assert any(n.startswith("hf_bert_forward arm absent:") and "torch" in n for n in doc["notes"])
    assert "hf_bert_forward" not in doc["results"][0]["arms"]


def test_model_from_checkpoint():
    doc = bench_json("model", "--model", str(GOLDEN / "ufb-tiny-1x3"), "--batch", "2", "--seq", "8")
    assert doc["config"]["model"].endswith("ufb-tiny-1x3") and doc["config"]["vocab"] != 512
    assert doc["results"][0]["params"] == {"batch": 2, "seq": 8}


@pytest.mark.parametrize("task", ["classification", "mlm"])
def test_train(task):
    doc = bench_json("train", "--task", task)
    (g,) = doc["results"]
    assert set(g["arms"]) == {"conditional_step_cpu", "dense_step_cpu"}
    assert doc["config"]["task"] == task
    # one dropout-free loss and gradient of each arm, from the same weights
    assert_agree(g, {("conditional_step_cpu", "dense_step_cpu")})


def test_reference_blas_is_marked_not_fair():
    p = bench("layer", "--tiny", "--json", "--tokens", "4", env={"UFB_NO_OPENBLAS": "1"})
    doc = json.loads(p.stdout)
    check_schema(doc)
    env = doc["env"]
    assert "reference BLAS" in env["blas"] and env["dense_fair"] is False
    assert not env["openblas_mapped"]
    assert doc["warnings"] and "NOT FAIR" in p.stderr
    assert backend_lib.present_line(env["fff_backends"]) in p.stderr  # the header's FFF line
    for r in doc["results"][0]["ratios"]:
        dense = doc["results"][0]["arms"][r["baseline"]]["dense_blas"]
        assert r["fair"] is (not dense)
    assert any(r["baseline"] == "masked_dense" and not r["fair"] for r in doc["results"][0]["ratios"])


def test_plot_without_matplotlib_is_one_line_error(tmp_path):
    fake = tmp_path / "fake" / "matplotlib"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('matplotlib is not installed')\n")
    p = bench("layer", "--tiny", "--plot", str(tmp_path / "x.png"),
              env={"PYTHONPATH": os.pathsep.join([str(fake.parent), str(REPO)])}, rc=2)
    assert p.stderr.strip().splitlines() == [p.stderr.strip()] and "matplotlib" in p.stderr
    assert "Traceback" not in p.stderr and not (tmp_path / "x.png").exists()


def test_bad_option_is_one_line_error():
    p = bench("layer", "--tiny", "--reps", "0", rc=2)
    assert p.stderr.startswith("error: --reps") and "Traceback" not in p.stderr


def test_harness_interleaves_arms_and_takes_medians():
    calls = []
    ticks = {"a": 1.0, "b": 2.0, "c": 4.0}
    arms = [benchmark.Arm(n, lambda: None) for n in ticks]

    def timer(arm):
        calls.append(arm.name)
        return ticks[arm.name]

    times, reps = benchmark.measure(arms, reps=3, warmup=2, timer=timer)
    assert reps == 3 and calls[:6] == ["a", "a", "b", "b", "c", "c"]       # warm-up per arm
    assert calls[6:] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]        # interleaved, rotating
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}
    assert benchmark.arm_stats(times["b"])["median_ms"] == 2000.0
    # reps=None: as many rounds as fit the budget (7 s per round here), within [min, max]
    _, reps = benchmark.measure(arms, reps=None, warmup=0, budget_s=30, timer=timer)
    assert reps == 5


def test_harness_blocks_time_consecutive_calls_in_three_rounds():
    calls = []
    arms = [benchmark.Arm(n, lambda: None) for n in "abc"]

    def timer(arm):
        calls.append(arm.name)
        return 1.0

    times, reps = benchmark.measure(arms, reps=6, warmup=0, timer=timer, blocks=True)
    assert reps == 6 and {k: len(v) for k, v in times.items()} == {"a": 6, "b": 6, "c": 6}
    # three rounds of two consecutive calls per arm, the order rotating each round
    assert "".join(calls) == "aabbcc" + "bbccaa" + "ccaabb"


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("reps", [3, None])
def test_harness_counts_every_call_in_its_progress(reps):
    """The bar of a size counts the warm-up and timed calls and knows their total as soon
    as measure() does (with reps=None: after the warm-up that sizes the rounds)."""
    from ufb_mlx.progress import Progress

    arms = [benchmark.Arm(n, lambda: None) for n in "abc"]
    totals = []
    out = Terminal()
    with Progress(0, "[layer] tokens=1", "call", file=out) as progress:
        def timer(arm):
            totals.append(progress.total)
            return 2.0

        _, used = benchmark.measure(arms, reps=reps, warmup=1, budget_s=30, timer=timer, progress=progress)
        assert progress.n == progress.total == 3 * (1 + used)
    assert totals[-1] == 3 * (1 + used) and (reps is not None or totals[0] == 3)
    text = out.getvalue()
    assert f"/{3 * (1 + used)} [" in text and "call/s" in text and "<" in text  # the total, rate, time left


def test_layer_shows_progress_on_a_terminal():
    """`benchmark layer` on a terminal: a bar per size, with the rate and the time left."""
    import fcntl
    import pty
    import struct
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    e = {k: v for k, v in os.environ.items() if k != "UFB_NO_OPENBLAS"}
    proc = subprocess.Popen([sys.executable, "-m", "ufb_mlx.benchmark", "layer", "--tiny", "--tokens", "4",
                             "--reps", "2"], cwd=REPO, env=e, stdout=subprocess.DEVNULL, stderr=follower)
    os.close(follower)
    text = read_terminal(leader)
    assert proc.wait(timeout=120) == 0
    assert "[layer] tokens=4:" in text and "call/s" in text and "\r" in text


def test_help_lists_every_command_with_its_options():
    p = bench("--help")
    for cmd, desc in benchmark.COMMANDS.items():
        assert f"{cmd} options" in p.stdout and " ".join(desc.split()[:4]) in " ".join(p.stdout.split())
    for option in ("--tokens", "--backward", "--hf-python", "--task", "--budget", "--json"):
        assert option in p.stdout, option
    assert p.stdout.startswith("usage: python -m ufb_mlx.benchmark ")
