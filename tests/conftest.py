"""Shared fixtures: the golden checkpoints of tests/data/golden (ground truth produced by
the original PyTorch implementation; see tests/data/golden/README.md)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import ufb_mlx  # noqa: F401  (loads OpenBLAS before anything imports mlx)

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(os.environ.get("UFB_GOLDEN") or REPO / "tests" / "data" / "golden")
MLM = GOLDEN / "ufb-tiny-1x3"
CLS = GOLDEN / "ufb-tiny-cls-2x4"

if not (MLM / "cases.npz").is_file() or not (CLS / "cases.npz").is_file():
    # Missing ground truth must fail the run, never silently skip the golden tests.
    raise RuntimeError(f"golden data not found under {GOLDEN} (set UFB_GOLDEN)")


def require_extension() -> None:
    """For tests of the fused CPU extension (ufb_mlx._ext): without it they are skipped with
    the reason (an install without a C++ compiler still works, on the MLX-operations path),
    unless UFB_REQUIRE_EXTENSION=1 (CI, which builds it) makes its absence a failure."""
    from ufb_mlx import backend

    if backend.cpu_available():
        return
    reason = (f"needs the CPU extension: {backend.cpu_unavailable_reason()} "
              "(in a second checkout: `python setup.py build_ext --inplace`)")
    if os.environ.get("UFB_REQUIRE_EXTENSION") == "1":
        pytest.fail(f"UFB_REQUIRE_EXTENSION=1 but the test {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


@pytest.fixture
def extension():
    """Skip (or with UFB_REQUIRE_EXTENSION=1 fail) the test when ufb_mlx._ext is absent."""
    require_extension()


@pytest.fixture(scope="session")
def mlm_cases():
    return dict(np.load(MLM / "cases.npz"))


@pytest.fixture(scope="session")
def cls_cases():
    return dict(np.load(CLS / "cases.npz"))


@pytest.fixture(scope="session")
def converted_mlm(tmp_path_factory):
    from ufb_mlx.convert import convert

    return convert(str(MLM), tmp_path_factory.mktemp("conv") / "mlm")


@pytest.fixture(scope="session")
def converted_cls(tmp_path_factory):
    from ufb_mlx.convert import convert

    return convert(str(CLS), tmp_path_factory.mktemp("conv") / "cls")
