"""The fused CPU implementation of the conditional FFF: the MLX extension ``ufb_mlx._ext``
built from csrc/ at install time (a custom ``Primitive`` with ``eval_cpu`` and ``vjp``).

The extension must have been built against exactly the mlx that runs it (MLX's C++ ABI and
nanobind's type registry are not stable across versions): ``available()`` is False, and
``unavailable_reason()`` says why in one line, when it is missing or was built for another
mlx. ``ufb_mlx.backend`` then falls back to MLX operations.
"""

from __future__ import annotations

import functools

import mlx.core as mx


@functools.cache
def _load():
    """(module, None) or (None, reason)."""
    try:
        from . import _ext
    except ImportError as e:
        return None, (f"the C++ extension ufb_mlx._ext is not built ({e}); "
                      "reinstall with `pip install -e .` (needs a C++ compiler and cmake)")
    built = getattr(_ext, "MLX_VERSION", "?")
    if built != mx.__version__:
        return None, (f"ufb_mlx._ext was built against mlx {built} but mlx {mx.__version__} is "
                      "installed; rebuild it with `pip install -e .`")
    return _ext, None


def available() -> bool:
    return _load()[0] is not None


def unavailable_reason() -> str:
    return _load()[1] or ""


def ext():
    module, reason = _load()
    if module is None:
        raise RuntimeError(reason)
    return module
