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
    assert e.value.code == 0 and "usage:" in capsys.readouterr().out
    proc = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, env=env(), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr


def test_top_level_convert_is_the_package_converter():
    proc = subprocess.run([sys.executable, "convert.py", "--help"], cwd=REPO, env=env(), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and "--hf-path" in proc.stdout, proc.stderr


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
