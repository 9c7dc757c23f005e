"""Is there a usable C++ compiler here, and what to do without one: for the install
(setup.py builds the fused CPU extension with it) and for the Metal kernel emulator.

Standard library only: setup.py loads this file by path, before anything is installed.

On macOS `/usr/bin/c++`, `g++` and `clang++` exist even without Apple's Command Line
Tools: they are stubs that offer to install them and fail, so finding a file named g++
proves nothing there. `xcode-select -p` (the active developer directory) answers without
running a stub.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

BUILD_NOTE = "_ext_build_failed.txt"  # written next to ufb_mlx/_ext*.so when its build failed


def default_cxx(environ=os.environ, which=shutil.which) -> str:
    """$CXX, else the first C++ compiler on PATH (on macOS `g++` and `c++` are Apple clang)."""
    return environ.get("CXX") or next((c for c in ("g++", "c++", "clang++") if which(c)), "g++")


def _is_apple_shim(path: str) -> bool:
    return os.path.dirname(os.path.realpath(path)) == "/usr/bin"


def cxx_problem(cxx: str, platform: str = sys.platform, which=shutil.which,
                run=subprocess.run) -> str | None:
    """Why ``cxx`` cannot compile here (one sentence), or None."""
    found = which(cxx)
    if found is None:
        return f"no C++ compiler: {cxx!r} was not found ({install_hint(platform)}, or set CXX)"
    if platform == "darwin" and _is_apple_shim(found):
        try:
            proc = run(["xcode-select", "-p"], capture_output=True, text=True, timeout=60)
            ok = proc.returncode == 0 and bool(proc.stdout.strip())
        except (OSError, subprocess.SubprocessError):
            ok = False
        if not ok:
            return (f"no C++ compiler: {found} is only Apple's stub, the Command Line Tools are "
                    f"not installed (`xcode-select -p` failed; {install_hint(platform)})")
    return None


def install_hint(platform: str = sys.platform) -> str:
    if platform == "darwin":
        return "install Apple's Command Line Tools with `xcode-select --install`"
    return "install g++ or clang (e.g. `apt-get install g++`)"


def fast_path_hint(platform: str = sys.platform) -> str:
    """How to get the fused CPU extension after an install without it."""
    return (f"for the fused CPU kernels, {install_hint(platform)} and cmake (`pip install cmake`), "
            "then reinstall: `pip install --force-reinstall --no-deps ultrafastbert-mlx` "
            "(in a clone: `pip install -e .`)")
