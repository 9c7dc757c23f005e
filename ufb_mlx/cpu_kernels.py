"""The fused CPU implementation of the conditional FFF: the MLX extension ``ufb_mlx._ext``
built from csrc/ at install time (a custom ``Primitive`` with ``eval_cpu`` and ``vjp``).

The extension must have been built against exactly the mlx that runs it (MLX's C++ ABI and
nanobind's type registry are not stable across versions): ``available()`` is False, and
``unavailable_reason()`` says why in one line, when it is missing or was built for another
mlx. ``ufb_mlx.backend`` then falls back to MLX operations.

The primitives run on MLX's CPU stream whatever the default device is (the C++ ops take
the CPU's default stream when given none), so callers need no ``mx.stream`` of their own.
"""

from __future__ import annotations

import functools
import os

import mlx.core as mx

from ufb_ref.errors import UFBError

# The instruction-set builds of csrc/kernels_*.cpp (x86-64 builds have all three).
ISAS = ("avx512", "avx2", "generic")


@functools.cache
def _load():
    """(module, None) or (None, reason)."""
    try:
        from . import _ext
    except ImportError as e:
        return None, (f"the C++ extension ufb_mlx._ext is not built ({e}); "
                      "reinstall with `pip install -e .` (needs a C++ compiler and cmake)")
    reason = version_mismatch(getattr(_ext, "MLX_VERSION", "?"), mx.__version__)
    if reason is None:
        reason = _probe(_ext)
    if reason is None:
        check_isa(os.environ.get("UFB_CPU_ISA", ""), list(_ext.isas()))
    return (None, reason) if reason else (_ext, None)


def check_isa(wanted: str, usable: list[str]) -> None:
    """``UFB_CPU_ISA`` (empty: the best ``usable`` one) must name a build this CPU runs;
    the C++ side would silently fall back to the generic kernels."""
    if not wanted or wanted in usable:
        return
    if wanted in ISAS:
        why = f"this CPU does not support {wanted}"
    else:
        why = "not an instruction set of the CPU kernels" + (f" (names are lower case: {wanted.lower()})"
                                                             if wanted.lower() in ISAS else "")
    raise UFBError(f"UFB_CPU_ISA={wanted!r}: {why}; choose one of {', '.join(usable)} (usable here) or unset it")


def version_mismatch(built: str, running: str) -> str | None:
    """Why a module built against mlx ``built`` cannot run under mlx ``running`` (None: it can)."""
    if built == running.split(".dev")[0].split("+")[0]:
        return None
    return (f"ufb_mlx._ext was built against mlx {built} but mlx {running} is installed; "
            "rebuild it with `pip install -e .`")


def _probe(module) -> str | None:
    """One tiny call: a module whose nanobind ABI differs from mlx's rejects mlx arrays
    with a TypeError instead of computing anything."""
    try:
        y = module.gelu(mx.zeros((1,), dtype=mx.float32))
        mx.eval(y)
    except TypeError as e:
        first = (str(e).splitlines() or [type(e).__name__])[0].split(". ")[0]
        return (f"ufb_mlx._ext does not accept this mlx's arrays ({first}): it was built with "
                "another nanobind ABI; rebuild it with `pip install -e .`")
    return None


def available() -> bool:
    return _load()[0] is not None


def unavailable_reason() -> str:
    return _load()[1] or ""


def ext():
    module, reason = _load()
    if module is None:
        raise RuntimeError(reason)
    return module


def fff_conditional(x, w_in, b_in, w_out, trees: int, depth: int):
    """y (T, H) in x's dtype for x (T, H); weights in one float dtype (b_in and w_out are
    cast to w_in's); w_out (H, P*n) in either layout (column-major reads in place)."""
    return ext().fff_forward(x, w_in, b_in, w_out, trees, depth)[0]


def gelu(x):
    """Exact-erf GELU computed in float32 (a few ulp), returned in x's dtype."""
    return ext().gelu(x)


def attention(qkv, key_mask, heads: int, scale: float):
    """softmax(q k^T * scale + key_mask) v per head, float32, from the fused projection's
    (B, S, 3H) output in the checkpoint's per-head [q|k|v] layout; returns (B, S, H)."""
    return ext().attention(qkv, key_mask, heads, scale)[0]


def layer_norm(x, weight, bias, eps: float):
    """LayerNorm over the last axis in float32 (y, as mx.fast.layer_norm with weight and bias)."""
    return ext().layer_norm(x, weight, bias, eps)[0]
