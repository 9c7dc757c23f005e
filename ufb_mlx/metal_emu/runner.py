"""Where the kernels of metal/ run on this machine, decided in one place for everything
that exercises the Metal path (the tests, ``python -m ufb_mlx.check``): the real kernels
on the GPU wherever MLX has Metal, else the same kernel text through this emulator."""

from __future__ import annotations

import contextlib
import functools

import mlx.core as mx

from .. import metal_kernels as kernel_launch
from .harness import emulated_launch, unavailable_reason
from .source import HarnessError


def metal_runner() -> str:
    """"gpu" where ``mx.metal.is_available()`` (the kernels run as they are), else
    "emulator"."""
    return "gpu" if mx.metal.is_available() else "emulator"


@contextlib.contextmanager
def metal_kernels(lane_order: str = "forward", ftz: bool = False):
    """Within the block ``ufb_mlx.metal_kernels``, and so ``fff_conditional(backend="metal")``,
    runs the kernels of metal/ the way this machine can (``metal_runner()``, which it
    yields): unchanged on the GPU, else every launch goes to the emulator, run with
    ``lane_order`` and ``ftz`` (flush float32 subnormals to zero, as Apple GPUs do; on a
    GPU both are the hardware's). HarnessError (one line) when the emulator cannot build
    here."""
    runner = metal_runner()
    if runner == "gpu":
        yield runner
        return
    reason = unavailable_reason()
    if reason:
        raise HarnessError(reason)
    with kernel_launch.use_launcher(functools.partial(emulated_launch, lane_order=lane_order, ftz=ftz)):
        yield runner
