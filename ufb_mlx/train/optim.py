"""Optimizer, learning-rate schedule and the original initialisation."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim

from ufb_ref.errors import UFBError


SCHEDULES = ("cosine", "triangle", "constant")


def make_schedule(kind: str, lr: float, total_steps: int, warmup: float):
    """Learning rate as a function of the number of updates already done (0 for the first).
    ``cosine``: linear warm-up over the first ``warmup`` fraction, then cosine decay to 0
    (the paper's fine-tuning schedule). ``triangle``: the one-cycle "triangle" of the paper's
    pretraining, linear up to the peak at the ``warmup`` fraction, then linear down to 0.
    ``constant``: after the linear warm-up."""
    if kind not in SCHEDULES:
        raise UFBError(f"schedule must be one of {', '.join(SCHEDULES)}, got {kind!r}")
    if not 0 <= warmup < 1:
        raise UFBError(f"warm-up must be a fraction in [0, 1), got {warmup}")
    total = max(int(total_steps), 1)
    warm = int(round(warmup * total))

    def schedule(step):
        s = mx.array(step).astype(mx.float32)
        up = lr * mx.minimum((s + 1) / max(warm, 1), 1.0)
        if kind == "constant":
            return up if warm else mx.full(s.shape, lr, mx.float32)
        progress = mx.clip((s - warm) / max(total - warm, 1), 0.0, 1.0)
        down = lr * 0.5 * (1 + mx.cos(math.pi * progress)) if kind == "cosine" else lr * (1 - progress)
        return mx.where(s < warm, up, down)

    return schedule


def no_weight_decay(name: str, *_) -> bool:
    """Biases and normalisation parameters are not decayed (the original's limited decay)."""
    return "bias" in name or "norm" in name


def make_optimizer(schedule, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01):
    """torch-style AdamW (bias-corrected), weight decay on every parameter except biases and
    norms."""
    def adamw(wd):
        return optim.AdamW(learning_rate=schedule, betas=list(betas), eps=eps, weight_decay=wd,
                           bias_correction=True)

    return optim.MultiOptimizer([adamw(0.0), adamw(weight_decay)], [no_weight_decay])


def init_normal(module, std: float = 0.02) -> None:
    """The original initialisation for the given module tree: every Linear and Embedding
    weight N(0, std^2), biases 0, LayerNorm weight 1 and bias 0."""
    for _, m in module.named_modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            m.weight = mx.random.normal(m.weight.shape) * std
            if "bias" in m:
                m.bias = mx.zeros_like(m.bias)
        elif isinstance(m, nn.LayerNorm):
            m.weight = mx.ones_like(m.weight)
            m.bias = mx.zeros_like(m.bias)


def init_model(model) -> None:
    """A new model's weights as the original initialises them: ``init_normal`` everywhere,
    and the embedding's padding row 0."""
    init_normal(model)
    emb = model.encoder.embedding.word_embedding
    emb.weight = emb.weight * (mx.arange(emb.weight.shape[0]) != model.args.pad_token_id)[:, None]
    mx.eval(model.parameters())

