"""Give MLX's CPU backend an optimised BLAS on Linux.

The Linux ``mlx[cpu]`` wheel links a reference BLAS (~6 GFLOP/s for a 1024^3 matmul).
Loading a system OpenBLAS with RTLD_GLOBAL *before* ``mlx`` is first imported makes the
dynamic linker bind MLX's ``cblas_*``/``sgemm_`` symbols to it (~30x faster). Dense
baselines measured without it are not fair. Set ``UFB_NO_OPENBLAS=1`` to keep the
reference BLAS. Must run before anything imports mlx; ``ufb_mlx/__init__`` does it first.
"""

from __future__ import annotations

import ctypes
import os
import sys

CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)

status = "not attempted"


def load_openblas() -> str:
    """Preload OpenBLAS if possible; returns (and records) a one-line status."""
    global status
    if sys.platform != "linux":
        status = "platform BLAS (Accelerate on macOS)"
    elif os.environ.get("UFB_NO_OPENBLAS", "") not in ("", "0"):
        status = "reference BLAS of the mlx wheel (UFB_NO_OPENBLAS set)"
    elif "mlx.core" in sys.modules and status == "not attempted":
        status = "reference BLAS of the mlx wheel (mlx was imported before ufb_mlx)"
    else:
        for path in CANDIDATES:
            if os.path.exists(path):
                try:
                    ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
                except OSError:
                    continue
                status = f"OpenBLAS ({path})"
                break
        else:
            status = "reference BLAS of the mlx wheel (no system OpenBLAS: apt-get install libopenblas0-pthread)"
    return status
