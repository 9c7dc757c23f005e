"""Which implementation runs the conditional FFF.

Three implementations compute the same function:
- "metal": the fused kernels of metal/ through ``mx.fast.metal_kernel`` (Apple GPU);
- "cpu": the fused C++ primitive of csrc/ (MLX extension ``ufb_mlx._ext``), on the CPU;
- "ops": plain MLX operations, on any device (the portable fallback).

"auto" decides by the default device, ``mx.default_device()`` (``with mx.stream(mx.cpu):``
and ``mx.set_default_device`` both change it), at the moment it is resolved: a GPU with
Metal takes "metal", the CPU takes "cpu" when the extension is built, anything else "ops".
A model (``ufb_mlx.Model``, ``load()``) resolves its backend once, when it is built, and
each layer then runs that implementation on that implementation's own device, whatever
the default device of a later call; ``Model.set_backend(name)`` resolves again (e.g.
``set_backend("auto")`` inside ``mx.stream(mx.cpu)``). The function ``fff_conditional``
resolves at each call. An explicit backend wins over the default device (the op is then
placed on that backend's device), and asking for one that is not present is a one-line
error. The model, ``fff_conditional`` and the benchmark all use ``resolve``.
"""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import mlx.core as mx

from ufb_ref.errors import UFBError

from .toolchain import BUILD_NOTE

BACKENDS = ("auto", "ops", "cpu", "metal")
# Left by setup.py when the install could not build the extension (ufb_mlx/toolchain.py).
BUILD_NOTE_PATH = Path(__file__).with_name(BUILD_NOTE)
# What the Metal path (and MLX's macOS wheels) need.
METAL_PLATFORM = "Apple Silicon, macOS >= 14 and a native arm64 Python 3.10+"


def _rosetta() -> bool:
    """An x86_64 process translated by Rosetta on an Apple Silicon Mac."""
    try:
        out = subprocess.run(["sysctl", "-n", "sysctl.proc_translated"], capture_output=True,
                             text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return out.strip() == "1"


def platform_problem(system: str | None = None, machine: str | None = None,
                     mac_version: str | None = None, python: tuple = sys.version_info[:2],
                     rosetta=_rosetta) -> str | None:
    """Why this machine is not one the Metal path supports (one line), or None."""
    system = system or platform.system()
    machine = machine or platform.machine()
    if system != "Darwin":
        return f"this is {system} {machine}, not a Mac (the Metal path needs {METAL_PLATFORM})"
    mac_version = mac_version if mac_version is not None else platform.mac_ver()[0]
    if machine != "arm64":
        if rosetta():
            return (f"this Python is an x86_64 build running under Rosetta; the Metal path "
                    f"needs {METAL_PLATFORM}: install an arm64 Python")
        return f"this Mac has an Intel CPU ({machine}); the Metal path needs {METAL_PLATFORM}"
    major = int((mac_version or "0").split(".")[0] or 0)
    if major < 14:
        return f"this Mac runs macOS {mac_version or '?'}; the Metal path needs {METAL_PLATFORM}"
    if tuple(python) < (3, 10):
        return f"this is Python {'.'.join(map(str, python))}; the Metal path needs {METAL_PLATFORM}"
    return None


def metal_unavailable_reason() -> str | None:
    """Why "metal" cannot run here (one line), or None."""
    from . import metal_kernels

    if not metal_kernels.available():
        problem = platform_problem()
        if problem:
            return f"it needs a Metal GPU: {problem}"
        return ("it needs a Metal GPU, and on this Mac mx.metal.is_available() is False (a "
                "virtual machine without GPU access?)")
    missing = metal_kernels.missing_sources()
    if missing:
        # A Mac whose installation lost metal/: say so instead of silently running "ops".
        return (f"the kernel sources {', '.join(missing)} are missing from {metal_kernels.METAL_DIR} "
                "(an incomplete installation: reinstall ultrafastbert-mlx, or pass backend='ops')")
    return None


def metal_available() -> bool:
    return metal_unavailable_reason() is None


def cpu_available() -> bool:
    from . import cpu_kernels

    return cpu_kernels.available()


def cpu_unavailable_reason() -> str:
    """Why "cpu" cannot run here (one line; empty when it can). When the install could not
    build the extension, setup.py left the reason and the remedy in BUILD_NOTE."""
    from . import cpu_kernels

    reason = cpu_kernels.unavailable_reason()
    if reason and BUILD_NOTE_PATH.is_file():
        return " ".join(BUILD_NOTE_PATH.read_text().split())
    return reason


def check(backend: str) -> str:
    if backend not in BACKENDS:
        raise UFBError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    return backend


def resolve(backend: str = "auto", device: mx.Device | mx.DeviceType | None = None) -> str:
    """The implementation ("ops", "cpu" or "metal") that runs on ``device`` (a Device or
    a DeviceType such as ``mx.cpu``; default: the current default device)."""
    check(backend)
    if backend == "metal":
        if not metal_available():
            raise UFBError(f"backend 'metal' is not available: {metal_unavailable_reason()}")
        return "metal"
    if backend == "cpu":
        if not cpu_available():
            raise UFBError(f"backend 'cpu' is not available: {cpu_unavailable_reason()}")
        return "cpu"
    if backend == "ops":
        return "ops"
    device = device if device is not None else mx.default_device()
    if getattr(device, "type", device) == mx.DeviceType.gpu:
        reason = metal_unavailable_reason()
        if reason is None:
            return "metal"
        if mx.metal.is_available():  # a Mac, with its kernel sources missing
            raise UFBError(f"backend 'metal' (the GPU's) is not available: {reason}")
        return "ops"  # a GPU without Metal
    return "cpu" if cpu_available() else "ops"


def stream_for(resolved: str) -> mx.Device | None:
    """The device an explicitly chosen implementation must run on (None: leave the default;
    also for "metal" when no real GPU is present, i.e. kernels run by the test emulator)."""
    if resolved == "metal":
        return mx.gpu if mx.metal.is_available() else None
    return mx.cpu if resolved == "cpu" else None


def describe() -> dict:
    """What is present here, for tools that report it (check, benchmark): each
    implementation, and for an absent one why; ``present`` lists those that can run."""
    metal, cpu = metal_available(), cpu_available()
    return {
        "default_device": str(mx.default_device()),
        "auto": resolve("auto"),
        "present": ["ops"] + (["cpu"] if cpu else []) + (["metal"] if metal else []),
        "metal": metal,
        "metal_reason": metal_unavailable_reason(),
        "cpu": cpu,
        "cpu_reason": None if cpu else cpu_unavailable_reason(),
        "platform": f"{platform.system()} {platform.machine()}, Python {platform.python_version()}",
        "platform_problem": platform_problem(),
    }


def present_line(d: dict | None = None) -> str:
    """One line naming the implementations present here and why the others are not."""
    d = d or describe()
    present = ["ops"] + [name for name in ("cpu", "metal") if d[name]]
    absent = [f"{name} absent: {d[name + '_reason']}" for name in ("cpu", "metal") if not d[name]]
    return "; ".join([f"FFF implementations present: {', '.join(present)}"] + absent)


# MLX's CPU allocator keeps at most 32 MB of freed buffers; a larger buffer goes back to
# the system and returns as fresh pages, each 4 KB page a fault on first touch (~1.6 us
# measured on a 2-core Linux Xeon VM, 2026-11: the 25 MB of FFF weight gradients of the
# released layer cost 10 ms a backward pass, the 134 MB of MLM logits at batch 8 about 50 ms).
CPU_CACHE_LIMIT = 2 << 30


def configure_cpu_runtime() -> None:
    """What the project's tools do before their work when MLX runs on the CPU: a buffer
    cache large enough for a model's working set (up to 2 GiB, at most an eighth of MLX's
    memory limit). Library users may call it too; it changes MLX's process-wide cache."""
    if not metal_available():
        mx.set_cache_limit(min(CPU_CACHE_LIMIT, mx.get_memory_limit() // 8))

