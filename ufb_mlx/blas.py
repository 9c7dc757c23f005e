"""Give MLX's CPU backend an optimised BLAS on Linux.

The Linux ``mlx[cpu]`` wheel links a reference BLAS (~6 GFLOP/s for a 1024^3 matmul).
Loading a system OpenBLAS with RTLD_GLOBAL *before* ``mlx`` is first imported makes the
dynamic linker bind MLX's ``cblas_*``/``sgemm_`` symbols to it (~30x faster). Dense
baselines measured without it are not fair. Set ``UFB_NO_OPENBLAS=1`` to keep the
reference BLAS. Must run before anything imports mlx; ``ufb_mlx/__init__`` does it first.

OpenBLAS picks its kernels by CPU model. Debian's 0.3.21 does not know recent Xeons
(Sapphire Rapids, for one) and falls back to its generic "Prescott" kernels, with which the
``x @ W.T`` products of every linear layer run ~4x slower (15 against 60 GFLOP/s for the
768 x 2304 projection, one core of a Sapphire Rapids Xeon, 2026-11). Unless the user set ``OPENBLAS_CORETYPE``, it is set
from the CPU's instruction sets before loading: SkylakeX kernels where AVX-512 is
complete, Haswell kernels where AVX2 and FMA are; the core OpenBLAS reports is recorded.

OpenBLAS's worker threads spin for 2^28 cycles (~0.1 s) after every call before they sleep,
on the cores that the fused CPU kernels (csrc/: FFF, attention) run on next: measured on
one FFF layer of 128 tokens right after a dense matmul, 1.14 ms against 0.67 ms with the
spin cut short (2-core Xeon VM, 2026-11). Unless the user set ``OPENBLAS_THREAD_TIMEOUT``,
it is set to 4 (2^4 cycles); whole-model forwards measured the same either way.
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

# OPENBLAS_CORETYPE for a CPU's instruction sets, best first (flags as /proc/cpuinfo names them).
CORETYPES = (
    ("SkylakeX", {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}),
    ("Haswell", {"avx2", "fma"}),
)


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def coretype_for(flags: set[str]) -> str | None:
    return next((name for name, need in CORETYPES if need <= flags), None)


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
        if "OPENBLAS_CORETYPE" not in os.environ:
            core = coretype_for(_cpu_flags())
            if core:
                os.environ["OPENBLAS_CORETYPE"] = core
        os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
        for path in CANDIDATES:
            if os.path.exists(path):
                try:
                    lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
                except OSError:
                    continue
                status = f"OpenBLAS ({path}, {_corename(lib)} kernels)"
                break
        else:
            status = "reference BLAS of the mlx wheel (no system OpenBLAS: apt-get install libopenblas0-pthread)"
    return status


def _corename(lib) -> str:
    try:
        fn = lib.openblas_get_corename
    except AttributeError:
        return "unknown"
    fn.restype = ctypes.c_char_p
    return (fn() or b"unknown").decode()


def startup_note() -> str | None:
    """The line every tool prints at start-up when MLX's CPU matmuls run on the wheel's
    reference BLAS (dense products ~30x slower); None otherwise."""
    if not status.startswith("reference BLAS"):
        return None
    why = status[status.index("(") + 1:-1] if "(" in status else "no OpenBLAS"
    return (f"note: MLX's CPU matmuls run on the mlx wheel's reference BLAS ({why}); dense products are "
            "~30x slower than with OpenBLAS")
