"""Off-Mac harness for the kernels in metal/: runs the exact text that
`mx.fast.metal_kernel` would compile, on the CPU. See README.md. ``metal_kernels()``
decides where the Metal path runs: the GPU where there is one, else this emulator."""

from .harness import (Kernel, build, cache_dir, compiled_text, emulated_launch, run_kernel,
                      unavailable_reason)
from .runner import metal_kernels, metal_runner
from .source import ALLOWED_BUILTINS, HarnessError, generate

__all__ = [
    "ALLOWED_BUILTINS",
    "HarnessError",
    "Kernel",
    "build",
    "cache_dir",
    "compiled_text",
    "emulated_launch",
    "generate",
    "metal_kernels",
    "metal_runner",
    "run_kernel",
    "unavailable_reason",
]
