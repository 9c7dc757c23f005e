"""Build of the fused CPU kernels (csrc/ -> ufb_mlx._ext) with MLX's own extension
helpers; everything else about the package is in pyproject.toml.

The extension is compiled against the mlx of the build environment, which pyproject.toml
pins to the same version as the runtime dependency (MLX has no stable C++ ABI).

It is optional, never silently: without a usable C++ compiler, or when the CMake build
fails, the package still installs (ufb_mlx then runs the conditional FFF with MLX
operations), the build prints why and how to get the fast path, and writes that sentence
to ufb_mlx/_ext_build_failed.txt, which `python -m ufb_mlx.check`, `ufb-benchmark` and
`ufb_mlx.backend.describe()` report (pip shows a successful build's output only with -v).
UFB_NO_EXTENSION=1 skips the extension on purpose.
"""

import importlib.util
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent


def _toolchain():
    # by path: importing the ufb_mlx package would need mlx and the rest installed
    spec = importlib.util.spec_from_file_location("ufb_toolchain", HERE / "ufb_mlx" / "toolchain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_problem(toolchain, environ=os.environ, which=shutil.which) -> str | None:
    """Why the extension cannot be built here (checked before CMake runs), or None."""
    if which("cmake") is None:
        return "cmake was not found"
    return toolchain.cxx_problem(environ.get("CXX") or "c++", which=which)


def _report(note: Path, reason: str, toolchain) -> str:
    """Print why the extension was not built and how to get it; leave it in ``note``."""
    sentence = (f"the fused CPU extension ufb_mlx._ext was not built ({reason}); the MLX-operations "
                f"path runs instead; {toolchain.fast_path_hint()}")
    bar = "=" * 78
    print(f"\n{bar}\nultrafastbert-mlx: {sentence}\n{bar}\n", file=sys.stderr, flush=True)
    note.parent.mkdir(parents=True, exist_ok=True)
    note.write_text(sentence + "\n")
    return sentence


ext_modules, cmdclass = [], {}
if os.environ.get("UFB_NO_EXTENSION", "") in ("", "0"):
    from mlx import extension

    toolchain = _toolchain()

    class OptionalCMakeBuild(extension.CMakeBuild):
        """MLX's CMake build of the extension; a failure leaves the install to go on
        without it, saying so (module docstring)."""

        def run(self):
            self.failed = {}  # extension name -> the sentence saying why and what to do
            for ext in self.extensions:
                ext.optional = True  # setuptools then does not copy a module that was not built
            in_source = self.inplace or getattr(self, "editable_mode", False)
            super().run()
            build_py = self.get_finalized_command("build_py")
            for ext in self.extensions:
                note = Path(build_py.get_package_dir(ext.name.rpartition(".")[0])) / toolchain.BUILD_NOTE
                if ext.name not in self.failed:
                    note.unlink(missing_ok=True)  # a previous failure's, in the source tree
                elif in_source:
                    note.write_text(self.failed[ext.name] + "\n")

        def build_extension(self, ext):
            # where the module would go: inside the wheel, or the build of an editable install
            note = Path(self.get_ext_fullpath(ext.name)).parent / toolchain.BUILD_NOTE
            note.unlink(missing_ok=True)
            reason = build_problem(toolchain)
            if reason is None:
                try:
                    super().build_extension(ext)
                    return
                except Exception as e:  # CalledProcessError from cmake, OSError, ...
                    code = getattr(e, "returncode", None)
                    reason = ("the CMake build failed" + (f" with exit status {code}" if code is not None else
                                                          f": {type(e).__name__}: {e}")
                              + "; its messages are above (`pip install -v` shows them)")
            self.failed[ext.name] = _report(note, reason, toolchain)

    ext_modules = [extension.CMakeExtension("ufb_mlx._ext", sourcedir="csrc")]
    cmdclass = {"build_ext": OptionalCMakeBuild}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
