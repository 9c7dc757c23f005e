"""Compile MLX-generated Metal kernel text with g++ and run a launch grid on the CPU.

`run_kernel` takes the same arguments as calling a `mx.fast.metal_kernel` object and
returns the outputs as MLX arrays. See README.md for what is and is not modelled.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import re
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from .. import toolchain
from .source import ArrayMeta, Generated, HarnessError, check_supported, generate

PRELUDE = Path(__file__).with_name("metal_prelude.hpp")
RUNTIME = Path(__file__).with_name("runtime.cpp")
CXX = toolchain.default_cxx()
# IEEE float without contraction, so results do not depend on the build machine's FMA.
# Metal's [[attributes]] are unknown to a C++ compiler: warnings, silenced.
CXXFLAGS = [
    "-std=c++20", "-O2", "-fPIC", "-shared", "-pthread",
    "-fno-fast-math", "-ffp-contract=off", "-Wno-attributes", "-Wno-unknown-attributes",
    "-Wno-unknown-pragmas",  # g++ ignores `#pragma clang loop unroll(full)`, clang honours it
]
if sys.platform == "darwin":
    # A kernel library calls the runtime library's sync functions, which are resolved at
    # load time (the runtime is loaded first, RTLD_GLOBAL); Apple's linker refuses a
    # shared library with undefined symbols unless told so. The ucontext routines the
    # runtime uses are marked deprecated there.
    CXXFLAGS += ["-undefined", "dynamic_lookup", "-Wno-deprecated-declarations"]
PAD = 256  # bytes of 0xFF around every buffer: NaN for float reads past the end,
# and a canary that out-of-bounds writes to outputs disturb.
MAX_THREADS_PER_THREADGROUP = 1024
STACK_BYTES = 256 * 1024

_NP_TO_MX = {
    np.dtype(np.bool_): mx.bool_,
    np.dtype(np.uint8): mx.uint8,
    np.dtype(np.uint16): mx.uint16,
    np.dtype(np.uint32): mx.uint32,
    np.dtype(np.uint64): mx.uint64,
    np.dtype(np.int8): mx.int8,
    np.dtype(np.int16): mx.int16,
    np.dtype(np.int32): mx.int32,
    np.dtype(np.int64): mx.int64,
    np.dtype(np.float16): mx.float16,
    np.dtype(np.float32): mx.float32,
}
# Data travels as unsigned ints of the same width (numpy has no bfloat16).
_BITS = {
    1: (mx.uint8, np.uint8),
    2: (mx.uint16, np.uint16),
    4: (mx.uint32, np.uint32),
    8: (mx.uint64, np.uint64),
}


@dataclass(frozen=True)
class Kernel:
    """A kernel described the way `mx.fast.metal_kernel` takes it (for test-only kernels;
    any object with these attributes works, e.g. ufb_mlx.metal_kernels.KernelSpec)."""

    name: str
    input_names: tuple
    output_names: tuple
    source: str
    header: str = ""
    atomic_outputs: bool = False
    ensure_row_contiguous: bool = True


def _as_bits(a) -> tuple[object, np.ndarray]:
    """(mlx dtype, C-contiguous unsigned-int view of the data)."""
    if isinstance(a, mx.array):
        dtype = a.dtype
        bits = np.array(mx.view(a, _BITS[dtype.size][0]), copy=True)
    else:
        arr = np.asarray(a)
        if arr.dtype not in _NP_TO_MX:
            raise HarnessError(f"numpy dtype {arr.dtype} is not a Metal type (pass an mx.array "
                               "for bfloat16; float64 does not exist on the GPU)")
        dtype = _NP_TO_MX[arr.dtype]
        bits = np.ascontiguousarray(arr).view(_BITS[arr.dtype.itemsize][1])
    return dtype, np.ascontiguousarray(bits)


def compiled_text(spec, inputs, template, output_dtypes) -> Generated:
    """The kernel text MLX would generate for this call; exactly what run_kernel compiles
    (after metal_prelude.hpp, in place of MLX's Metal utilities)."""
    metas = []
    for a in inputs:
        dtype, bits = _as_bits(a)
        metas.append(ArrayMeta(dtype, bits.ndim, bits.size))
    return _generate(spec, metas, template, output_dtypes)


def _generate(spec, metas, template, output_dtypes) -> Generated:
    if not getattr(spec, "ensure_row_contiguous", True):
        raise HarnessError("ensure_row_contiguous=False is not modelled (inputs are always "
                           "passed row-contiguous)")
    gen = generate(spec.name, spec.input_names, spec.output_names, spec.source, spec.header,
                   spec.atomic_outputs, metas, output_dtypes, template)
    check_supported(
        spec.source, spec.header, spec.input_names, spec.output_names, template,
        spec.atomic_outputs,
        shape_names=[p.name for p in gen.params if p.role in ("shape", "strides", "ndim")],
        attributes=[p.name for p in gen.params if p.role == "attribute"],
    )
    return gen


def _translation_unit(gen: Generated, spec) -> str:
    """metal_prelude.hpp + the generated text verbatim (with #line markers where a part starts on a
    fresh line, so compiler errors point into the .metal files) + the launcher."""
    h0, h1 = gen.header_span
    s0, s1 = gen.source_span
    text = gen.text
    pieces = [f'#include "{PRELUDE.name}"\n']

    def mark(pos: int, name: str):
        if pos == 0 or text[pos - 1] == "\n":
            pieces.append(f'#line 1 "{name}"\n')

    mark(h0, getattr(spec, "header_file", None) or f"{spec.name}:header")
    pieces.append(text[h0:h1])
    mark(h1, f"{spec.name}:signature")
    pieces.append(text[h1:s0])
    mark(s0, getattr(spec, "file", None) or f"{spec.name}:source")
    pieces.append(text[s0:s1])
    mark(s1, f"{spec.name}:tail")
    # The tail is the explicit instantiation, `template [[host_name(..)]] [[kernel]] ...;`:
    # clang rejects attribute lists there (g++ ignores them), and they mean nothing here.
    pieces.append(re.sub(r"\[\[[^\]]*\]\]\s*", "", text[s1:]))

    args = []
    buf = 0
    for p in gen.params:
        if p.role == "attribute":
            args.append(f"L->{p.name}")
            continue
        const = "" if p.role == "output" else "const "
        ref = "*" if p.scalar else ""
        args.append(f"{ref}({const}{p.ctype}*)b[{buf}]")
        buf += 1
    pieces.append(
        "\n#undef device\n#undef constant\n#undef thread\n#undef threadgroup\n"
        'extern "C" void ufb_emu_invoke(const ufb_emu::Attrs* L, void** b) {\n'
        "  (void)L;\n"
        f"  {gen.call}(\n    " + ",\n    ".join(args) + ");\n}\n"
    )
    return "".join(pieces)


_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL] = {}


def cache_dir() -> Path:
    d = Path(tempfile.gettempdir()) / f"ufb_metal_emu_{os.getuid()}"
    d.mkdir(parents=True, exist_ok=True)
    return d


@functools.cache
def unavailable_reason() -> str | None:
    """Why kernels cannot be emulated here (no usable C++ compiler: on macOS a stub
    without the Command Line Tools does not count), or None."""
    problem = toolchain.cxx_problem(CXX)
    return f"the Metal kernel emulator needs a C++20 compiler: {problem}" if problem else None


def _compile(source: Path, out: Path, what: str) -> None:
    reason = unavailable_reason()
    if reason:
        raise HarnessError(reason)
    tmp = out.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
    proc = subprocess.run([CXX, *CXXFLAGS, f"-I{PRELUDE.parent}", str(source), "-o", str(tmp)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise HarnessError(f"{CXX} failed on {what} ({source}):\n{proc.stderr[-6000:]}")
    os.replace(tmp, out)  # atomic: concurrent test runs may build the same key


def _key(*parts: str) -> str:
    return hashlib.sha256("\0".join([*parts, CXX, *CXXFLAGS]).encode()).hexdigest()[:32]


def runtime() -> ctypes.CDLL:
    """The scheduler library, built once per (runtime.cpp, prelude, flags) and loaded
    RTLD_GLOBAL so that kernel libraries resolve their sync calls against it."""
    key = "runtime-" + _key(RUNTIME.read_text(), PRELUDE.read_text())
    with _lock:
        if key in _loaded:
            return _loaded[key]
        so = cache_dir() / f"{key}.so"
        if not so.exists():
            _compile(RUNTIME, so, "the metal_emu runtime")
        lib = ctypes.CDLL(str(so), mode=ctypes.RTLD_GLOBAL)
        lib.ufb_emu_launch.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p),
                                       ctypes.POINTER(ctypes.c_int64), ctypes.c_char_p, ctypes.c_int]
        lib.ufb_emu_launch.restype = ctypes.c_int
        _loaded[key] = lib
        return lib


def build(gen: Generated, spec) -> ctypes.CDLL:
    """Compile (or reuse from the cache under the temp dir, keyed by a hash of the
    translation unit, the prelude and the flags) and load the kernel library."""
    runtime()
    tu = _translation_unit(gen, spec)
    key = _key(tu, PRELUDE.read_text())
    with _lock:
        if key in _loaded:
            return _loaded[key]
    so = cache_dir() / f"{key}.so"
    if not so.exists():
        src = cache_dir() / f"{key}.cpp"
        src.write_text(tu)
        _compile(src, so, f"kernel {spec.name!r}")
    lib = ctypes.CDLL(str(so))
    with _lock:
        _loaded[key] = lib
    return lib


def _padded(raw: np.ndarray) -> np.ndarray:
    out = np.full(raw.nbytes + 2 * PAD, 0xFF, dtype=np.uint8)
    out[PAD:PAD + raw.nbytes] = raw.reshape(-1).view(np.uint8)
    return out


def run_kernel(
    spec,
    inputs,
    template=None,
    grid=(1, 1, 1),
    threadgroup=(1, 1, 1),
    output_shapes=(),
    output_dtypes=(),
    init_value=None,
    *,
    lane_order: str = "forward",
    ftz: bool = False,
    workers: int | None = None,
) -> list[mx.array]:
    """Run `spec` the way `mx.fast.metal_kernel(...)(inputs=..., ...)` would on a Mac.

    inputs: mx.arrays (any modelled dtype, bfloat16 included) or numpy arrays.
    lane_order: "forward" or "reverse", the order in which the scheduler runs lanes
    between sync points; a kernel whose result depends on it has a race.
    ftz: flush float32 subnormals to zero (results and operands, simd_sum included), as
    Apple GPUs do; False: IEEE subnormals, as the CPU computes by default.
    Outputs that init_value does not initialise start as 0xFF bytes (NaN / -1), so
    elements a kernel fails to write show up.
    """
    converted = [_as_bits(a) for a in inputs]
    metas = [ArrayMeta(d, b.ndim, b.size) for d, b in converted]
    gen = _generate(spec, metas, template, list(output_dtypes))
    if len(output_shapes) != len(spec.output_names):
        raise HarnessError(f"expected {len(spec.output_names)} output shapes")
    grid = tuple(int(g) for g in grid)
    tg = tuple(min(int(t), g) for t, g in zip(threadgroup, grid))  # as MLX does
    if len(grid) != 3 or len(tg) != 3 or min(grid) < 0:
        raise HarnessError(f"bad grid {grid} / threadgroup {threadgroup}")
    if min(grid) > 0 and min(tg) < 1:
        raise HarnessError(f"threadgroup {threadgroup} has an empty dimension")
    if tg[0] * tg[1] * tg[2] > MAX_THREADS_PER_THREADGROUP:
        raise HarnessError(f"threadgroup {tg} exceeds {MAX_THREADS_PER_THREADGROUP} threads")
    if lane_order not in ("forward", "reverse"):
        raise HarnessError(f"lane_order must be 'forward' or 'reverse', not {lane_order!r}")
    lib = build(gen, spec)

    buffers: list[np.ndarray] = []
    params = iter(gen.params)
    for (dtype, bits) in converted:
        p = next(params)
        assert p.role == "input"
        buffers.append(_padded(bits))
        if bits.ndim == 0:
            continue
        for kind in ("shape", "strides", "ndim"):
            if any(q.name == f"{p.name}_{kind}" for q in gen.params):
                next(params)
                if kind == "shape":
                    extra = np.asarray(bits.shape, dtype=np.int32)
                elif kind == "strides":
                    extra = np.asarray([s // bits.itemsize for s in bits.strides], dtype=np.int64)
                else:
                    extra = np.asarray(bits.ndim, dtype=np.int32)
                buffers.append(_padded(extra))
    outputs = []
    for shape, dtype in zip(output_shapes, output_dtypes):
        uint_mx, uint_np = _BITS[dtype.size]
        size = int(np.prod(shape, dtype=np.int64))
        if init_value is None:
            raw = np.full(size, np.iinfo(uint_np).max, dtype=uint_np)
        else:
            raw = np.array(mx.view(mx.full((size,), init_value, dtype), uint_mx))
        buf = _padded(raw)
        buffers.append(buf)
        outputs.append((buf, tuple(shape), dtype, uint_np, raw.nbytes))

    ptrs = (ctypes.c_void_p * len(buffers))(*[b.ctypes.data + PAD for b in buffers])
    n_workers = workers if workers is not None else min(4, os.cpu_count() or 1)
    cfg = (ctypes.c_int64 * 10)(*grid, *tg, int(lane_order == "reverse"), n_workers, STACK_BYTES,
                                int(bool(ftz)))
    err = ctypes.create_string_buffer(4096)
    invoke = ctypes.cast(lib.ufb_emu_invoke, ctypes.c_void_p)
    if runtime().ufb_emu_launch(invoke, ptrs, cfg, err, len(err)) != 0:
        raise HarnessError(f"kernel {spec.name!r}: {err.value.decode()}")

    results = []
    for (buf, shape, dtype, uint_np, nbytes), name in zip(outputs, spec.output_names):
        if (buf[:PAD] != 0xFF).any() or (buf[PAD + nbytes:] != 0xFF).any():
            raise HarnessError(f"kernel {spec.name!r} wrote outside output {name!r}")
        raw = buf[PAD:PAD + nbytes].view(uint_np).reshape(shape)
        results.append(mx.view(mx.array(raw), dtype))
    return results


def emulated_launch(spec, inputs, config, **kw) -> list[mx.array]:
    """A drop-in for ``ufb_mlx.metal_kernels.launch`` that runs the kernel here instead of on
    Metal: monkeypatch it in (with ``metal_kernels.available`` -> True) to take the Metal path."""
    return run_kernel(spec, inputs, **config.kwargs(), **kw)
