"""Values made JSON-ready where output is made (printed results, log records, result
files): NaN and infinities become null, NumPy scalars Python numbers."""

from __future__ import annotations

import math

import numpy as np


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (np.floating, np.integer)):
        return _clean(v.item())
    return v


def clean_tree(tree):
    """JSON-ready: NaN/inf become null, NumPy scalars Python numbers."""
    if isinstance(tree, dict):
        return {k: clean_tree(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [clean_tree(v) for v in tree]
    return _clean(tree)

