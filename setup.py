"""Build of the fused CPU kernels (csrc/ -> ufb_mlx._ext) with MLX's own extension
helpers; everything else about the package is in pyproject.toml.

The extension is compiled against the mlx of the build environment, which pyproject.toml
pins to the same version as the runtime dependency (MLX has no stable C++ ABI).
UFB_NO_EXTENSION=1 skips it: ufb_mlx then runs the conditional FFF with MLX operations.
"""

import os

from setuptools import setup

ext_modules, cmdclass = [], {}
if os.environ.get("UFB_NO_EXTENSION", "") in ("", "0"):
    from mlx import extension

    ext_modules = [extension.CMakeExtension("ufb_mlx._ext", sourcedir="csrc")]
    cmdclass = {"build_ext": extension.CMakeBuild}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
