"""Off-Mac harness for the kernels in metal/: runs the exact text that
`mx.fast.metal_kernel` would compile, on the CPU. See README.md."""

from .harness import Kernel, build, cache_dir, compiled_text, emulated_launch, run_kernel
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
    "run_kernel",
]
