"""GLUE metrics in NumPy: accuracy, F1, Matthews correlation (classification), Pearson and
Spearman correlation and MSE (regression). Same definitions as scikit-learn / scipy, which
the GLUE scripts use; no dependency on them.

A correlation of constant predictions or targets is undefined: it is returned as NaN
(never as a number that could win a best-model comparison).
"""

from __future__ import annotations

import math

import numpy as np

# Which way is better, per metric (for best-model selection).
HIGHER_IS_BETTER = {"accuracy": True, "f1": True, "mcc": True, "pearson": True, "spearman": True,
                    "mse": False, "loss": False}
CLASSIFICATION_METRICS = ("accuracy", "f1", "mcc")
REGRESSION_METRICS = ("pearson", "spearman", "mse")


def confusion_matrix(y_true, y_pred, num_labels: int) -> np.ndarray:
    """C[i, j] = number of examples of true class i predicted as j."""
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    c = np.zeros((num_labels, num_labels), dtype=np.int64)
    np.add.at(c, (y_true, y_pred), 1)
    return c


def accuracy(y_true, y_pred) -> float:
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    return float((y_true == y_pred).mean()) if len(y_true) else math.nan


def f1(y_true, y_pred, num_labels: int) -> float:
    """Binary: F1 of class 1 (GLUE's MRPC/QQP convention). More classes: macro F1 (the
    unweighted mean of the per-class F1; a class never true nor predicted scores 0)."""
    c = confusion_matrix(y_true, y_pred, num_labels).astype(np.float64)
    tp = np.diag(c)
    fp, fn = c.sum(0) - tp, c.sum(1) - tp
    denom = 2 * tp + fp + fn
    per_class = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    return float(per_class[1]) if num_labels == 2 else float(per_class.mean())


def matthews_corrcoef(y_true, y_pred, num_labels: int) -> float:
    """Multi-class MCC (Gorodkin 2004, as scikit-learn); 0 when undefined (as scikit-learn)."""
    c = confusion_matrix(y_true, y_pred, num_labels).astype(np.float64)
    t, p = c.sum(1), c.sum(0)
    s, correct = c.sum(), np.trace(c)
    cov_ytyp = correct * s - t @ p
    cov_ypyp = s * s - p @ p
    cov_ytyt = s * s - t @ t
    if cov_ypyp * cov_ytyt == 0:
        return 0.0
    return float(cov_ytyp / math.sqrt(cov_ytyt * cov_ypyp))


def pearson(x, y) -> float:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) < 2:
        return math.nan
    xc, yc = x - x.mean(), y - y.mean()
    denom = math.sqrt(float(xc @ xc) * float(yc @ yc))
    return float(xc @ yc / denom) if denom > 0 else math.nan


def rankdata(a) -> np.ndarray:
    """Ranks 1..n, ties given their average rank (scipy.stats.rankdata 'average')."""
    a = np.asarray(a, dtype=np.float64)
    order = np.argsort(a, kind="mergesort")
    sorted_a = a[order]
    # Start of each run of equal values; the average rank of a run is (first + last) / 2.
    starts = np.r_[True, sorted_a[1:] != sorted_a[:-1]]
    run_id = np.cumsum(starts) - 1
    first = np.flatnonzero(starts)
    last = np.r_[first[1:], len(a)] - 1
    avg = (first + last) / 2.0 + 1.0
    ranks = np.empty(len(a), dtype=np.float64)
    ranks[order] = avg[run_id]
    return ranks


def spearman(x, y) -> float:
    return pearson(rankdata(x), rankdata(y))


def mse(x, y) -> float:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    return float(((x - y) ** 2).mean()) if len(x) else math.nan


def classification_metrics(y_true, y_pred, num_labels: int) -> dict[str, float]:
    return {"accuracy": accuracy(y_true, y_pred), "f1": f1(y_true, y_pred, num_labels),
            "mcc": matthews_corrcoef(y_true, y_pred, num_labels)}


def regression_metrics(y_true, y_pred) -> dict[str, float]:
    return {"pearson": pearson(y_pred, y_true), "spearman": spearman(y_pred, y_true), "mse": mse(y_pred, y_true)}


def is_better(metric: str, value: float, best: float | None, loss: float | None = None,
              best_loss: float | None = None) -> bool:
    """Strictly better than ``best`` (None: nothing yet); an equal value wins when its
    ``loss`` is lower (e.g. two epochs with accuracy 1.0). NaN never wins."""
    if value is None or math.isnan(value):
        return False
    if best is None or math.isnan(best):
        return True
    if value == best and loss is not None and best_loss is not None:
        return loss < best_loss
    return value > best if HIGHER_IS_BETTER[metric] else value < best
