"""Losses of the reference: the definitions the MLX losses (``ufb_mlx.losses``) are checked
against."""

from __future__ import annotations

import numpy as np

from .errors import UFBError

IGNORE_INDEX = -100  # the label of a position that is not predicted (torch's convention)


def mlm_loss(logits, labels):
    """Mean cross-entropy over the labelled positions (label != IGNORE_INDEX). The original
    keeps only round(0.25 * B * S) positions; we predict every labelled one (identical
    whenever no more than that many are labelled)."""
    sel = labels != IGNORE_INDEX
    if not sel.any():
        raise UFBError("mlm_loss: no labelled positions")
    lg = logits[sel].astype(np.float64)
    logp = lg - lg.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    return -logp[np.arange(len(lg)), labels[sel]].mean()
