"""The fused CPU extension is optional at install, never silently: setup.py goes on without
it when it cannot be built, says why and how to get it, and leaves that sentence where
the reports find it (ufb_mlx.backend.cpu_unavailable_reason). A usable C++ compiler is
detected properly, also on macOS where /usr/bin/g++ exists without any compiler behind it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest

from ufb_mlx import toolchain
from ufb_mlx.metal_emu import harness

from conftest import REPO


def fake_run(returncode: int, stdout: str = ""):
    calls = []

    def run(cmd, **kw):
        calls.append(cmd)
        return SimpleNamespace(returncode=returncode, stdout=stdout, stderr="")

    run.calls = calls
    return run


def test_macos_stub_without_command_line_tools_is_no_compiler(tmp_path):
    """On macOS /usr/bin/g++ is a stub that offers to install the Command Line Tools:
    `xcode-select -p` failing means there is no compiler, whatever PATH holds."""
    which = lambda c: "/usr/bin/" + c  # noqa: E731
    run = fake_run(2)
    reason = toolchain.cxx_problem("g++", platform="darwin", which=which, run=run)
    assert reason and "xcode-select --install" in reason and "/usr/bin/g++" in reason
    assert run.calls == [["xcode-select", "-p"]]
    assert toolchain.cxx_problem("g++", platform="darwin", which=which,
                                 run=fake_run(0, "/Library/Developer/CommandLineTools\n")) is None
    # a compiler of one's own (Homebrew's, $CXX) needs no Command Line Tools
    own = tmp_path / "clang++"
    own.touch()
    assert toolchain.cxx_problem(str(own), platform="darwin", which=lambda c: c, run=fake_run(2)) is None


def test_missing_compiler_is_named_with_the_remedy():
    reason = toolchain.cxx_problem("no-such-c++", platform="linux", which=lambda c: None)
    assert "'no-such-c++' was not found" in reason and "apt-get install g++" in reason
    assert "xcode-select --install" in toolchain.cxx_problem("c++", platform="darwin", which=lambda c: None)


def test_emulator_reports_no_compiler(monkeypatch):
    """The Metal emulator's tests skip (and ufb-check says so) with the same sentence."""
    monkeypatch.setattr(harness, "CXX", "no-such-c++")
    harness.unavailable_reason.cache_clear()
    try:
        assert "the Metal kernel emulator needs a C++20 compiler: no C++ compiler" in harness.unavailable_reason()
    finally:
        monkeypatch.undo()
        harness.unavailable_reason.cache_clear()
    assert harness.unavailable_reason() is None or "compiler" in harness.unavailable_reason()


@pytest.fixture
def source_copy(tmp_path):
    """setup.py, pyproject.toml, csrc/ and the package's toolchain.py: what the build reads."""
    src = tmp_path / "src"
    (src / "ufb_mlx").mkdir(parents=True)
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "csrc", src / "csrc")
    shutil.copy(REPO / "ufb_mlx" / "toolchain.py", src / "ufb_mlx" / "toolchain.py")
    return src


@pytest.mark.skipif(shutil.which("cmake") is None, reason="needs cmake (the [test] extra installs it)")
def test_failed_build_still_installs_and_says_why(source_copy):
    """CXX=/bin/false: CMake cannot compile anything. The build command still succeeds,
    prints why and how to get the extension, and leaves the sentence in the package."""
    env = dict(os.environ, CXX="/bin/false")
    env.pop("UFB_NO_EXTENSION", None)
    proc = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=source_copy,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    note = source_copy / "ufb_mlx" / toolchain.BUILD_NOTE
    sentence = note.read_text().strip()
    assert sentence.startswith("the fused CPU extension ufb_mlx._ext was not built (the CMake build failed")
    assert "the MLX-operations path runs instead" in sentence and "pip install" in sentence
    assert sentence in " ".join(proc.stderr.split())
    assert not list((source_copy / "ufb_mlx").glob("_ext*.so"))


def test_no_compiler_skips_the_build_with_the_reason(source_copy, tmp_path):
    """No compiler at all (CXX names none): CMake is not even started."""
    env = dict(os.environ, CXX=str(tmp_path / "no-such-c++"))
    env.pop("UFB_NO_EXTENSION", None)
    proc = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=source_copy,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sentence = (source_copy / "ufb_mlx" / toolchain.BUILD_NOTE).read_text()
    assert "no C++ compiler" in sentence and "no-such-c++" in sentence
    assert "Configuring" not in proc.stdout + proc.stderr  # cmake never ran


def test_no_extension_on_request(source_copy):
    env = dict(os.environ, UFB_NO_EXTENSION="1", CXX="/bin/false")
    proc = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=source_copy,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (source_copy / "ufb_mlx" / toolchain.BUILD_NOTE).exists()
    assert "not built" not in proc.stderr
