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
            "ufb_mlx.pretrain", "ufb_mlx.benchmark"} <= modules


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
