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
