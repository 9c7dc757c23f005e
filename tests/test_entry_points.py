"""Every console command of pyproject.toml names a function that exists, and the tool
behind it answers --help both as that function and as ``python -m``."""

from __future__ import annotations

import importlib
import subprocess
import sys
import tomllib

import pytest

from conftest import REPO
from train_utils import env

SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


def test_every_tool_has_a_console_command():
    modules = {target.split(":")[0] for target in SCRIPTS.values()}
    assert {"ufb_mlx.generate", "ufb_mlx.convert", "ufb_mlx.finetune", "ufb_mlx.classify",
            "ufb_mlx.pretrain", "ufb_mlx.benchmark", "ufb_mlx.check"} <= modules


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_console_command_runs(name, monkeypatch, capsys):
    module, func = SCRIPTS[name].split(":")
    entry = getattr(importlib.import_module(module), func)
    monkeypatch.setattr(sys, "argv", [name, "--help"])
    with pytest.raises(SystemExit) as e:
        entry()
    # the usage line names the command as it was typed
    assert e.value.code == 0 and capsys.readouterr().out.startswith(f"usage: {name} ")
    proc = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, env=env(), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith(f"usage: python -m {module} "), proc.stderr


def test_top_level_convert_is_the_package_converter():
    proc = subprocess.run([sys.executable, "convert.py", "--help"], cwd=REPO, env=env(), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and "--hf-path" in proc.stdout, proc.stderr
    assert proc.stdout.startswith("usage: python convert.py ")


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_a_bad_option_is_one_line(name):
    """argparse's complaint is a UFBError (ufb_ref.errors.ArgumentParser): one "error:"
    line naming the option, exit status 2, not argparse's usage block."""
    module = SCRIPTS[name].split(":")[0]
    proc = subprocess.run([sys.executable, "-m", module, "--no-such-option"], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ")
    # argparse names the first problem it meets: the unknown option, or a missing one
    assert ("--no-such-option" in proc.stderr or "required" in proc.stderr) and "--help" in proc.stderr


def test_tools_size_the_cpu_buffer_cache():
    """MLX's CPU allocator caches only 32 MB of freed buffers; the tools keep up to 2 GiB so
    that large buffers (gradients, logits) are not faulted in afresh every step."""
    import mlx.core as mx

    from ufb_mlx import backend

    before = mx.set_cache_limit(32 << 20)
    try:
        backend.configure_cpu_runtime()
        expected = 32 << 20 if backend.metal_available() else min(backend.CPU_CACHE_LIMIT, mx.get_memory_limit() // 8)
        assert mx.set_cache_limit(before) == expected
    finally:
        mx.set_cache_limit(before)


def test_reference_blas_is_said_at_start_up():
    """Every tool says in one line when MLX's CPU matmuls run on the slow reference BLAS
    (here forced with UFB_NO_OPENBLAS; with OpenBLAS bound they say nothing, which
    test_a_bad_option_is_one_line checks)."""
    proc = subprocess.run([sys.executable, "-m", "ufb_mlx.classify", "--no-such-option"], cwd=REPO,
                          env={**env(), "UFB_NO_OPENBLAS": "1"}, capture_output=True, text=True, timeout=60)
    note, error = proc.stderr.splitlines()
    assert note == ("note: MLX's CPU matmuls run on the mlx wheel's reference BLAS (UFB_NO_OPENBLAS set); "
                    "dense products are ~30x slower than with OpenBLAS")
    assert error.startswith("error: ") and proc.returncode == 2


@pytest.mark.parametrize("status,says", [
    ("reference BLAS of the mlx wheel (no system OpenBLAS: apt-get install libopenblas0-pthread)",
     "(no system OpenBLAS: apt-get install libopenblas0-pthread)"),
    ("OpenBLAS (/usr/lib/x86_64-linux-gnu/libopenblas.so.0, Haswell kernels)", None),
    ("platform BLAS (Accelerate on macOS)", None),
])
def test_start_up_note_by_blas(monkeypatch, status, says):
    from ufb_mlx import blas

    monkeypatch.setattr(blas, "status", status)
    note = blas.startup_note()
    assert (note is None) if says is None else (says in note and note.startswith("note: "))

