"""Losses: the one definition per task, used by training, evaluation and the golden tests
(which check them against ``ufb_ref.losses``)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ufb_ref.errors import UFBError
from ufb_ref.losses import IGNORE_INDEX

from .model import Model

__all__ = ["IGNORE_INDEX", "REDUCTIONS", "classification_loss", "example_losses", "masked_lm_logits",
           "mlm_logits_at", "mlm_loss", "mlm_loss_at", "reduce_losses"]

REDUCTIONS = ("mean", "sum", "none")


def example_losses(logits, targets, regression: bool = False):
    """The loss of each row, in float32: cross-entropy of (N, C) logits against class ids,
    or, for a one-output regressor, the squared error against the targets."""
    logits = logits.astype(mx.float32)
    if regression:
        return mx.square(logits[:, 0] - targets)
    return nn.losses.cross_entropy(logits, targets, reduction="none")


def reduce_losses(per, reduction: str, weights=None):
    """"none": the per-row losses (times ``weights``); "sum": their sum; "mean": their
    mean (weighted by ``weights``)."""
    if reduction not in REDUCTIONS:
        raise UFBError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if weights is not None:
        per = per * weights
    if reduction == "none":
        return per
    if reduction == "sum":
        return per.sum()
    return per.sum() / weights.sum() if weights is not None else per.mean()


def masked_lm_logits(model: Model, input_ids, attention_mask, labels):
    """(float32 MLM logits at every labelled position (label != IGNORE_INDEX), in
    row-major order, and those labels). The decoder runs on those positions only."""
    labels_np = np.asarray(labels).reshape(-1)
    positions = np.flatnonzero(labels_np != IGNORE_INDEX)
    return mlm_logits_at(model, input_ids, attention_mask, mx.array(positions)), mx.array(labels_np[positions])


def mlm_logits_at(model: Model, input_ids, attention_mask, positions):
    """float32 MLM logits at ``positions``, flat indices into the (B, S) tokens."""
    hidden = model.encode(input_ids, attention_mask)
    h = hidden.reshape(-1, hidden.shape[-1])[positions]
    return model.mlm_logits(h).astype(mx.float32)


def mlm_loss(model: Model, input_ids, attention_mask, labels, reduction: str = "mean"):
    """Cross-entropy of the MLM head over every labelled position (label != -100).
    "mean" is the original's loss (it keeps round(0.25 * B * S) positions; the two agree
    whenever at most that many are labelled). A sum over no labelled position is 0.
    ``ufb_ref.losses.mlm_loss`` is its reference."""
    if reduction == "mean" and not (np.asarray(labels) != IGNORE_INDEX).any():
        raise UFBError("mlm_loss: no labelled positions")
    return reduce_losses(example_losses(*masked_lm_logits(model, input_ids, attention_mask, labels)), reduction)


def mlm_loss_at(model: Model, input_ids, attention_mask, positions, targets, weights, reduction: str = "sum"):
    """``mlm_loss`` with the labelled positions given (``ufb_mlx.data.label_positions``):
    flat ``positions``, their ``targets`` and ``weights`` (0 for padding). A batch's
    positions are padded to a fixed count, so a compiled training step sees one shape;
    training sums over a process's slice and divides by the global count."""
    per = example_losses(mlm_logits_at(model, input_ids, attention_mask, positions), targets)
    return reduce_losses(per, reduction, weights)


def classification_loss(model: Model, input_ids, attention_mask, labels, reduction: str = "mean", weights=None):
    """Cross-entropy of the classifier, or the squared error of a regressor
    (``problem_type`` "regression"), per example; ``weights`` scale each example's loss
    (0 drops a padding row)."""
    logits = model(input_ids, attention_mask)
    targets = labels if isinstance(labels, mx.array) else mx.array(np.asarray(labels))
    per = example_losses(logits, targets, regression=model.args.problem_type == "regression")
    return reduce_losses(per, reduction, weights)
