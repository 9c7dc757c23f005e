"""Applying and evaluating models: classifier logits for many texts, the GLUE metrics and
loss of a classifier or regressor on labelled data, a classifier's labels and scores per
text, and the held-out MLM loss and masked-token accuracy of a masked-language model.

The losses are the model's own (``ufb_mlx.losses.example_losses``, the function training
minimises), so a validation loss and a training loss mean the same thing.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from ufb_ref.tokenizer import pad_batch

from . import metrics
from .losses import example_losses, masked_lm_logits
from .model import Model


def predict(model: Model, seqs: list[list[int]], pad_id: int, batch_size: int = 64, on_batch=None) -> np.ndarray:
    """Logits (N, num_labels) in float32, in the order of ``seqs``. Sequences are batched
    by length, so that little padding is computed; ``on_batch(n)`` is told of every ``n``
    sequences done (progress)."""
    model.eval()
    order = np.argsort([len(s) for s in seqs], kind="stable")
    out = np.zeros((len(seqs), model.args.num_labels), dtype=np.float32)
    for i in range(0, len(seqs), batch_size):
        rows = order[i:i + batch_size]
        batch = pad_batch([seqs[r] for r in rows], pad_id)
        logits = model(mx.array(batch["input_ids"]), mx.array(batch["attention_mask"])).astype(mx.float32)
        out[rows] = np.array(logits)
        if on_batch is not None:
            on_batch(len(rows))
    return out


def is_regressor(model: Model) -> bool:
    return model.args.problem_type == "regression"


def evaluate_classifier(model: Model, seqs, targets, pad_id: int, batch_size: int = 64,
                        on_batch=None) -> dict[str, float]:
    """Accuracy, F1 and Matthews correlation (regression: Pearson, Spearman and MSE) and
    the mean loss on labelled sequences; ``on_batch`` as for ``predict``."""
    logits = predict(model, seqs, pad_id, batch_size, on_batch=on_batch)
    targets = np.asarray(targets)
    loss = float(example_losses(mx.array(logits), mx.array(targets), is_regressor(model)).mean().item())
    return {**task_metrics(model, logits, targets), "loss": loss}


def task_metrics(model: Model, logits: np.ndarray, targets) -> dict[str, float]:
    """The GLUE metrics of a classifier's (or regressor's) logits against the targets."""
    if is_regressor(model):
        return metrics.regression_metrics(targets, logits[:, 0])
    return metrics.classification_metrics(targets, logits.argmax(1), model.args.num_labels)


def label_names(model: Model) -> list[str]:
    """The class names of a classifier (``id2label``, else LABEL_i)."""
    args = model.args
    return [(args.id2label or {}).get(str(i), f"LABEL_{i}") for i in range(args.num_labels)]


def label_scores(model: Model, logits: np.ndarray, top_k: int = 1) -> list[dict]:
    """Per row: a regressor's ``{"value"}``, or a classifier's most probable ``label`` with
    its ``score`` (softmax probability) and the ``top`` k labels, most probable first."""
    if is_regressor(model):
        return [{"value": float(z)} for z in logits[:, 0]]
    names = label_names(model)
    z = logits - logits.max(1, keepdims=True)
    probs = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    k = min(top_k, len(names))
    out = []
    for pr in probs:
        top = np.argsort(-pr, kind="stable")[:k]
        out.append({"label": names[top[0]], "score": float(pr[top[0]]),
                    "top": [{"label": names[i], "score": float(pr[i])} for i in top]})
    return out


def evaluate_mlm(model: Model, inputs: np.ndarray, labels: np.ndarray, batch_size: int = 64,
                 on_batch=None) -> dict[str, float]:
    """Held-out MLM loss (mean over the labelled tokens) and masked-token accuracy of
    masked blocks (``labels`` -100 where nothing is predicted); ``on_batch(n)`` is told of
    every ``n`` blocks done (progress)."""
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for i in range(0, len(inputs), batch_size):
        x, y = inputs[i:i + batch_size], labels[i:i + batch_size]
        n = int((y != -100).sum())
        if on_batch is not None:
            on_batch(len(x))
        if not n:
            continue
        logits, targets = masked_lm_logits(model, mx.array(x), mx.ones(x.shape, dtype=mx.int32), y)
        loss = example_losses(logits, targets).sum()
        hits = (logits.argmax(-1) == targets).sum()
        mx.eval(loss, hits)
        loss_sum += loss.item()
        correct += hits.item()
        count += n
    return {"mlm_loss": loss_sum / max(count, 1), "mlm_accuracy": correct / max(count, 1), "masked_tokens": count}
