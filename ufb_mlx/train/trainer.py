"""The step (value and gradient, averaging across processes, clipping, update, the
finiteness check), compiled on one process, and the loop around it: logging, Ctrl-C."""

from __future__ import annotations

import math
import signal
import threading
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

from ufb_ref.checkpoint import WEIGHTS_FILE
from ufb_ref.errors import UFBError

from .checkpoints import list_checkpoints, prune_checkpoints
from .runlog import Logger, peak_memory_gb
from .world import World


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run that can be continued; the message says how."""


def step_seed(seed: int, step: int, rank: int) -> int:
    """Seed of the dropout masks of one step on one process."""
    return (int(seed) * 1_000_003 + int(step) * 1_009 + int(rank)) % (2**63)


def all_finite(*trees):
    """One boolean array: every leaf of every tree is finite (no NaN, no inf)."""
    ok = mx.array(True)
    for tree in trees:
        for _, v in tree_flatten(tree):
            ok = ok & mx.all(mx.isfinite(v))
    return ok


class Trainer:
    """One optimisation step of the task's loss (``ufb_mlx.losses.mlm_loss_at`` or
    ``classification_loss``), called as ``loss(model, **batch, reduction="sum")``: this
    process's loss sum, times ``scale`` (= processes / global count), so that averaging the
    gradients over the processes gives the gradient of the global mean.

    On one process the whole step (value and gradient, clipping, update, the finiteness
    check) is one ``mx.compile``d function of the model's and optimizer's state, traced
    once per batch shape: no host sync inside it and no per-step graph building in
    Python. ``compile=False`` runs the same step eagerly (data-parallel runs do, since the
    gradient all-reduce runs between the gradient and the update)."""

    def __init__(self, model, optimizer, loss, world: World, seed: int, grad_clip: float = 0.0,
                 compile: bool = True):
        self.model, self.optimizer, self.world = model, optimizer, world
        self.seed, self.grad_clip = seed, grad_clip
        self.compile = compile and world.size == 1
        self._value_and_grad = nn.value_and_grad(
            model, lambda model, batch, scale: loss(model, **batch, reduction="sum") * scale)
        self._compiled = None
        self._compiled_for = None

    def _update(self, batch, scale):
        """Loss, gradients, clipping and update; returns (loss, every value finite). The
        finiteness covers the loss, the gradients and the updated parameters, so that a
        step that overflows in the update itself (an extreme learning rate or epsilon)
        is caught too."""
        loss, grads = self._value_and_grad(self.model, batch, scale)
        if self.world.size > 1:
            grads = nn.average_gradients(grads, group=self.world.group)
        finite = all_finite(loss, grads)
        if self.grad_clip > 0:
            grads, _ = optim.clip_grad_norm(grads, self.grad_clip)
        self.optimizer.update(self.model, grads)
        return loss, finite & all_finite(self.model.trainable_parameters())

    def _state_identity(self) -> tuple:
        """The optimizer's state dicts (a MultiOptimizer has one per part): a resume
        replaces them, and a compiled step must then be rebuilt to read the new ones."""
        state = self.optimizer.state
        return tuple(map(id, state["states"])) if "states" in state else (id(state),)

    def _compiled_update(self):
        if self._compiled is None or self._compiled_for != self._state_identity():
            # The state's structure must be complete before it is traced (init keeps the
            # moments a resume restored).
            self.optimizer.init(self.model.trainable_parameters())
            state = [self.model.state, self.optimizer.state, mx.random.state]
            self._compiled = mx.compile(self._update, inputs=state, outputs=state)
            self._compiled_for = self._state_identity()
        return self._compiled

    def step(self, step: int, batch: dict, scale: float) -> float:
        """One update; a NonFiniteLoss when the loss, a gradient or an updated weight is
        NaN or infinite (the run stops: nothing after that update is saved)."""
        mx.random.seed(step_seed(self.seed, step, self.world.rank))
        self.model.train()
        if self.compile and not all(isinstance(v, mx.array) for v in batch.values()):
            self.compile = False  # host data (e.g. mlm_loss's NumPy labels) cannot be traced
        update = self._compiled_update() if self.compile else self._update
        loss, finite = update(batch, mx.array(scale, dtype=mx.float32))
        mx.eval(loss, finite, self.model.parameters(), self.optimizer.state)
        if not finite.item():
            raise NonFiniteLoss(step, loss.item())
        return loss.item()


class NonFiniteLoss(UFBError):
    """Training stopped: the loss, a gradient or an updated weight is NaN or infinite."""

    def __init__(self, step: int, loss: float):
        self.step = step
        what = (f"the loss is {loss:.4g}" if not math.isfinite(loss)
                else f"the loss is {loss:.4g} but a gradient or an updated weight is NaN or infinite")
        super().__init__(f"step {step}: {what}; training stopped and nothing of this step is saved. Lower --lr, "
                         "raise --eps, set --grad-clip, or look for extreme labels or inputs")


def kept_after_stop(out: Path) -> str:
    """What a run stopped by a non-finite step leaves, as the end of its error line."""
    ckpts = list_checkpoints(out)
    has_model = (Path(out) / WEIGHTS_FILE).is_file()
    if ckpts:
        return (f"; the last checkpoint (step {ckpts[-1][0]})" + (" and the saved model are" if has_model else " is")
                + " kept")
    return "; the saved model is kept" if has_model else "; no checkpoint or model had been written yet"


class StopRequest:
    """Ctrl-C (SIGINT) as a request to stop after the current step, so that the loop can
    save a checkpoint where it stands; a second Ctrl-C raises KeyboardInterrupt at once.
    Only Python's own SIGINT handler is replaced, and only in the main thread: an ignored
    SIGINT (a background job) or a program's own handler stays as it was."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> "StopRequest":
        if (threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def agreed(self, world: World) -> bool:
        """Whether any process was asked to stop (all processes stop at the same step)."""
        if world.size == 1:
            return self.requested
        return bool(world.sum(np.array([int(self.requested)], dtype=np.int64))[0])


def train_loop(trainer: Trainer, logger: Logger, *, start_step: int, total_steps: int, get_batch,
               after_step, log_every: int, describe=lambda step: "", checkpoint=None, keep: int = 0) -> None:
    """Steps start_step+1 .. total_steps. ``get_batch(step)`` -> (batch, scale, global
    tokens); ``after_step(step)`` evaluates / checkpoints; ``checkpoint(step)`` saves one
    (every process calls it; rank 0 writes). Logs every ``log_every`` steps: step, mean loss
    over the interval (all processes), learning rate, tokens/s, peak memory; on a terminal
    the bar shows them instead of a line. Ctrl-C finishes the step under way, saves a
    checkpoint there and ends with a message that says how to continue (``Interrupted``);
    a finished run keeps its newest ``keep`` checkpoints."""
    world = trainer.world
    out = logger.path.parent
    progress = logger.start_progress(total_steps, start_step)
    loss_sum, tokens, steps, t0 = 0.0, 0, 0, time.perf_counter()
    step = start_step
    try:
        with StopRequest() as stop:
            for step in range(start_step + 1, total_steps + 1):
                batch, scale, n_tokens = get_batch(step)
                loss_sum += trainer.step(step, batch, scale)
                tokens += n_tokens
                steps += 1
                progress.update(1)
                if step % log_every == 0 or step == total_steps:
                    loss = float(world.sum(np.array([loss_sum]))[0]) / (world.size * steps)
                    dt = time.perf_counter() - t0
                    lr = float(trainer.optimizer.learning_rate.item())
                    rec = dict(step=step, loss=loss, lr=lr, tokens_per_s=tokens / max(dt, 1e-9),
                               peak_memory_gb=peak_memory_gb())
                    progress.update(0, loss=f"{loss:.4f}", lr=f"{lr:.2e}", **{"tok/s": _si(rec["tokens_per_s"])})
                    if not progress.tty:
                        logger.print(f"step {step}/{total_steps}{describe(step)} | loss {loss:.4f} | lr {lr:.3e} | "
                                     f"{rec['tokens_per_s']:.0f} tok/s | peak mem {rec['peak_memory_gb']:.3f} GB | "
                                     f"{progress.meter()}")
                    logger.record("train", **rec)
                    loss_sum, tokens, steps, t0 = 0.0, 0, 0, time.perf_counter()
                after_step(step)
                if step < total_steps and stop.agreed(world):
                    if checkpoint is not None and not _saved_at(out, step, world):
                        logger.print(f"Ctrl-C: saving a checkpoint at step {step} (Ctrl-C again to stop at once)")
                        checkpoint(step)
                    raise KeyboardInterrupt
    except KeyboardInterrupt:
        raise Interrupted(resume_hint(out, step)) from None
    except NonFiniteLoss as e:
        raise UFBError(str(e) + kept_after_stop(out)) from e
    finally:
        progress.close()
        logger.progress = None
    if world.main:
        prune_checkpoints(out, keep)


def _saved_at(out: Path, step: int, world: World) -> bool:
    """Whether rank 0 (the one that writes them) has a checkpoint of ``step``; the same
    answer on every process, which need not see rank 0's folder."""
    newest = list_checkpoints(out)[-1][0] if world.main and list_checkpoints(out) else None
    return bool(world.sum(np.array([int(newest == step)], dtype=np.int64))[0])


def _si(v: float) -> str:
    """12345.6 -> '12.3k': figures that keep the bar short."""
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if abs(v) >= scale:
            return f"{v / scale:.3g}{unit}"
    return f"{v:.3g}"


def resume_hint(out: Path, step: int) -> str:
    """What to do after an interrupted run."""
    ckpts = list_checkpoints(out)
    if not ckpts:
        return (f"at step {step}, before the first checkpoint; run the same command with --force to start "
                "again (or checkpoint sooner with --save-every)")
    if ckpts[-1][0] == step:
        return (f"at step {step}, saved in {ckpts[-1][1]}: run the same command with --resume to continue "
                "from there")
    return (f"at step {step}; the last checkpoint is step {ckpts[-1][0]}: run the same command with --resume "
            "to continue from it")

