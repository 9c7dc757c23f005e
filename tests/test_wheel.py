"""A regular (non-editable) install, as a user without the repository gets it: the wheel
is built from a copy of the source (``pip wheel``, offline: no build isolation, so the
[test] extra carries the build requirements), installed into a fresh virtual environment
(``--system-site-packages``, so mlx and the other dependencies are not downloaded again),
and used from a directory outside the repository with no PYTHONPATH: the package must
come from the wheel, and the kernel sources, the emulator, the demo model, the CPU
extension and every command-line tool must be there.

Building the wheel compiles the C++ extension (csrc/): about a minute on two cores.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from ufb_mlx import metal_kernels

from conftest import REPO

pytestmark = pytest.mark.slow

CLIS = ["ufb_mlx.generate", "ufb_mlx.finetune", "ufb_mlx.classify", "ufb_mlx.pretrain", "ufb_mlx.benchmark",
        "ufb_mlx.check", "ufb_corpus.build", "convert"]
# What a clone has besides tests/ (which the wheel does not carry) and local artefacts.
NOT_SOURCE = shutil.ignore_patterns(".git", "tests", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                                    ".hypothesis", "*.so", ".venv", "venv", "data", "runs", "mlx_model*")


def _run(cmd, cwd, env=None, timeout=900) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(python of the fresh environment, a working directory outside the repository,
    the environment variables to run it with)."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    shutil.copytree(REPO, src, ignore=NOT_SOURCE)
    offline = dict(os.environ, PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    offline.pop("PYTHONPATH", None)
    _run([sys.executable, "-m", "pip", "wheel", src, "--no-deps", "--no-build-isolation", "-w", root / "dist"],
         cwd=root, env=offline)
    (wheel,) = (root / "dist").glob("ultrafastbert_mlx-*.whl")
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv], cwd=root)
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    # --force-reinstall: an editable install of the project in the base environment
    # must not count as "already satisfied"
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--force-reinstall", wheel],
         cwd=root, env=offline)
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    env = dict(offline, HF_HUB_OFFLINE="1")
    return python, elsewhere, env


def probe(installed, code: str) -> dict:
    python, cwd, env = installed
    return json.loads(_run([python, "-c", code], cwd=cwd, env=env).stdout)


def test_the_package_comes_from_the_wheel(installed):
    python, _, _ = installed
    where = probe(installed, "import json, sysconfig, ufb_mlx, ufb_ref, convert; print(json.dumps("
                             "[sysconfig.get_paths()['purelib'], sysconfig.get_paths()['platlib'], "
                             "ufb_mlx.__file__, ufb_ref.__file__, convert.__file__]))")
    purelib, platlib = Path(where[0]), Path(where[1])
    assert purelib.is_relative_to(python.parent.parent)
    for module in map(Path, where[2:]):
        assert module.is_relative_to(purelib) or module.is_relative_to(platlib), module
        assert not module.is_relative_to(REPO)


def test_kernel_sources_and_emulator_ship_in_the_wheel(installed):
    got = probe(installed, "import json; from ufb_mlx import metal_kernels, metal_emu; from ufb_mlx.metal_emu import harness; "
                           "print(json.dumps({'dir': str(metal_kernels.METAL_DIR), 'missing': metal_kernels.missing_sources(), "
                           "'sources': {s.name: [s.source, s.header] for s in metal_kernels.KERNELS}, "
                           "'emu': [str(harness.PRELUDE), str(harness.RUNTIME), harness.PRELUDE.is_file(), "
                           "harness.RUNTIME.is_file()]}))")
    metal_dir = Path(got["dir"])
    assert metal_dir.name == "metal" and metal_dir.parent.name == "ufb_mlx" and not metal_dir.is_relative_to(REPO)
    assert got["missing"] == []
    assert set(got["sources"]) == {s.name for s in metal_kernels.KERNELS}
    for spec in metal_kernels.KERNELS:  # the very text of the repository's metal/
        source, header = got["sources"][spec.name]
        assert source == (REPO / "metal" / spec.file).read_text()
        assert header == ((REPO / "metal" / spec.header_file).read_text() if spec.header_file else "")
    prelude, runtime, *present = got["emu"]
    assert all(present) and Path(prelude).parent == metal_dir.parent / "metal_emu"


def test_demo_model_ships_and_generate_runs(installed):
    python, cwd, env = installed
    got = probe(installed, "import json; from ufb_mlx import DEMO_MODEL as m; "
                           "print(json.dumps([str(m), sorted(p.name for p in m.iterdir())]))")
    model = Path(got[0])
    assert model.parent.name == "ufb_mlx" and not model.is_relative_to(REPO)
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= set(got[1])
    out = _run([python, "-m", "ufb_mlx.generate", "--prompt", "The President shall deliver a message to the [MASK].",
                "--json"], cwd=cwd, env=env).stdout
    doc = json.loads(out)
    assert doc["model"] == "demo" and len(doc["results"][0]["masks"]) == 1  # the shipped model by its name


@pytest.mark.parametrize("module", CLIS)
def test_every_cli_is_reachable(installed, module):
    python, cwd, env = installed
    proc = _run([python, "-m", module, "--help"], cwd=cwd, env=env)
    assert proc.stdout.startswith("usage:") and "--help" in proc.stdout


@pytest.mark.parametrize("script", sorted(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]))
def test_every_console_command_is_installed(installed, script):
    python, cwd, env = installed
    proc = _run([python.parent / script, "--help"], cwd=cwd, env=env)
    assert proc.stdout.startswith("usage:") and "--help" in proc.stdout


def test_the_cpu_extension_ships_and_the_check_passes_from_the_wheel(installed):
    """The CPU extension is built into the wheel, and ``python -m ufb_mlx.check`` runs from
    the installed package alone: its emulator (off a Mac) compiles from the package data."""
    python, cwd, env = installed
    avail = probe(installed, "import json; from ufb_mlx import backend; print(json.dumps("
                             "[backend.cpu_available(), backend.cpu_unavailable_reason()]))")
    assert avail[0], avail[1]
    doc = json.loads(_run([python, "-m", "ufb_mlx.check", "--configs", "0", "--json"], cwd=cwd, env=env).stdout)
    assert doc["ok"] and {b["backend"] for b in doc["backends"]} == {"ops", "cpu", "metal"}
