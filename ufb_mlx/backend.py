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

import mlx.core as mx

from ufb_ref.errors import UFBError

BACKENDS = ("auto", "ops", "cpu", "metal")


def metal_unavailable_reason() -> str | None:
    """Why "metal" cannot run here (one line), or None."""
    from . import kernels

    if not kernels.available():
        return "it needs a Metal GPU, and mx.metal.is_available() is False here"
    missing = kernels.missing_sources()
    if missing:
        # A Mac whose installation lost metal/: say so instead of silently running "ops".
        return (f"the kernel sources {', '.join(missing)} are missing from {kernels.METAL_DIR} "
                "(an incomplete installation: reinstall ultrafastbert-mlx, or pass backend='ops')")
    return None


def metal_available() -> bool:
    return metal_unavailable_reason() is None


def cpu_available() -> bool:
    from . import cpu_kernels

    return cpu_kernels.available()


def cpu_unavailable_reason() -> str:
    from . import cpu_kernels

    return cpu_kernels.unavailable_reason()


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
    """What is present here, for tools that report it (check, benchmark)."""
    return {
        "default_device": str(mx.default_device()),
        "auto": resolve("auto"),
        "metal": metal_available(),
        "metal_reason": metal_unavailable_reason(),
        "cpu": cpu_available(),
        "cpu_reason": None if cpu_available() else cpu_unavailable_reason(),
    }


# MLX's CPU allocator keeps at most 32 MB of freed buffers; a larger buffer goes back to
# the system and returns as fresh pages, each 4 KB page a fault on first touch (~1.6 us on
# the 2-core Linux VM: the 25 MB of FFF weight gradients of the released layer cost 10 ms
# a backward pass, the 134 MB of MLM logits at batch 8 about 50 ms).
CPU_CACHE_LIMIT = 2 << 30


def configure_cpu_runtime() -> None:
    """What the project's tools do before their work when MLX runs on the CPU: a buffer
    cache large enough for a model's working set (up to 2 GiB, at most an eighth of MLX's
    memory limit). Library users may call it too; it changes MLX's process-wide cache."""
    if not metal_available():
        mx.set_cache_limit(min(CPU_CACHE_LIMIT, mx.get_memory_limit() // 8))

