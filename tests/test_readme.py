"""The README works as written: its Python example runs (offline, on the demo model), the
names, modules and commands it mentions exist, and its shell examples (and those of
docs/tools.md) write only into folders that .gitignore covers."""

from __future__ import annotations

import importlib
import re
import shlex
import subprocess
import sys
import tomllib

import pytest

from conftest import REPO
from train_utils import env

README = (REPO / "README.md").read_text()
DOCS = {"README.md": README, "docs/tools.md": (REPO / "docs" / "tools.md").read_text()}


def blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def test_readme_is_short():
    assert len(README.splitlines()) <= 250


def test_python_example_runs(tmp_path):
    (code,) = blocks(README, "python")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={**env(), "HF_HUB_OFFLINE": "1"},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "[MASK]" not in proc.stdout and proc.stdout.strip()


def test_named_modules_functions_and_commands_exist():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    commands = set(re.findall(r"`(ufb-[a-z]+)[` ]", README))
    assert len(commands) >= 6
    for name in commands:
        assert name in scripts, name
    for module in set(re.findall(r"python -m (ufb_mlx\.\w+)", README)):
        importlib.import_module(module)
    for dotted in set(re.findall(r"`(ufb_(?:mlx|ref)(?:\.\w+)+)", README)):
        parts = dotted.split(".")
        for i in range(len(parts), 0, -1):  # the longest importable prefix, then attributes
            try:
                obj = importlib.import_module(".".join(parts[:i]))
                break
            except ImportError:
                continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)


def written_paths(command: str) -> list[str]:
    """Files and folders a shell example writes: --out/--mlx-path values, > redirections,
    open(..., 'w') in python -c one-liners."""
    found = re.findall(r"open\('([^']+)','w'\)", command)
    try:
        words = shlex.split(command.replace(">", " > "))
    except ValueError:
        words = command.split()
    for flag, value in zip(words, words[1:]):
        if flag in ("--out", "--mlx-path", ">"):
            found.append(value)
    return found


@pytest.mark.parametrize("doc", sorted(DOCS))
def test_examples_write_only_into_ignored_folders(doc):
    ignored = {line.strip().strip("/") for line in (REPO / ".gitignore").read_text().splitlines()}
    assert "scratch" in ignored
    paths = [p for block in blocks(DOCS[doc], "bash") for line in block.splitlines()
             for p in written_paths(line)]
    assert paths, "no example writes anything: the check would be empty"
    for p in paths:
        assert p.split("/")[0] in ignored and "/" in p, f"{doc}: an example writes {p!r}, which git would see"
