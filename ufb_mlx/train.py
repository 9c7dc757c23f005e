"""The training loop that fine-tuning (``ufb_mlx.finetune``) and pretraining
(``ufb_mlx.pretrain``) share: optimizer and learning-rate schedule, the step (value and
gradient, gradient averaging across processes, clipping, update), progress logging,
atomic checkpoints and resuming.

Data parallelism uses MLX's own distributed layer: started with ``mlx.launch -n N python -m
ufb_mlx.finetune ...``, every process builds the same model from the same seed, draws the
same *global* batch (a pure function of the seed and the step) and trains on its own
contiguous slice of it; the losses are sums over the slice divided by the global count, and
``nn.average_gradients`` times N sums the slices' gradients, so N processes with batch b
compute the gradient that one process computes with batch N*b. Only rank 0 writes files
and prints.

Determinism: the data order is a function of (seed, epoch), the masks and the dropout of a
step are drawn from generators seeded by (seed, step[, rank]), and a checkpoint holds the
weights, the optimizer state (moments and step count) and the step. A run resumed from a
checkpoint therefore ends with exactly (bit for bit) the weights of an uninterrupted run.

Checkpoints: ``OUT/checkpoints/step-00000040/`` with ``model.safetensors``,
``optimizer.safetensors`` and ``trainer_state.json``; written into a temporary folder that is
renamed into place, so a killed run leaves only complete checkpoints. While the run goes on
the newest ``max(keep, 1)`` are kept (resuming needs one); once it has finished, the newest
``keep`` (none for 0). Ctrl-C lets the current step finish and saves a checkpoint there
(a second Ctrl-C stops at once).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import math
import os
import re
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from ufb_ref import fsio
from ufb_ref.checkpoint import CONFIG_FILE, TOKENIZER_FILES, WEIGHTS_FILE, SafetensorsFile, expected_shapes
from ufb_ref.config import ModelArgs
from ufb_ref.fsio import atomic_write_text
from ufb_ref.errors import UFBError

from .entry import Interrupted
from .loading import save_safetensors
from .progress import Progress

CHECKPOINTS = "checkpoints"
LOG_FILE = "log.jsonl"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
SCHEDULES = ("cosine", "triangle", "constant")
_CKPT = re.compile(r"step-(\d{8,})$")
_CKPT_TEMP = re.compile(r"\.(step-\d{8,})\.(?:tmp|old)-")  # ufb_ref.fsio's temporary names
# Files a run writes into its output folder (what --force may remove).
RUN_FILES = (CONFIG_FILE, WEIGHTS_FILE, LOG_FILE, "train_results.json", *TOKENIZER_FILES)
# What a run's marker (ufb_ref.fsio.MARKER) lists: --force replaces a folder holding only these.
RUN_ENTRIES = (*RUN_FILES, CHECKPOINTS)


# ---------------------------------------------------------------------------------------
# Processes


class World:
    """This process's place among the data-parallel processes (size 1 without mlx.launch)."""

    def __init__(self):
        self.group = mx.distributed.init()
        self.rank, self.size = self.group.rank(), self.group.size()

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, values) -> np.ndarray:
        """Element-wise sum over the processes of a small array: integers exactly (as
        int64), floats in float64."""
        values = np.asarray(values)
        if self.size == 1:
            return values
        wide = np.int64 if np.issubdtype(values.dtype, np.integer) else np.float64
        out = mx.distributed.all_sum(mx.array(values.astype(wide)), group=self.group, stream=mx.cpu)
        return np.array(out).astype(values.dtype)

    def barrier(self) -> None:
        if self.size > 1:
            mx.eval(mx.distributed.all_sum(mx.array(1), group=self.group, stream=mx.cpu))

    def broadcast_text(self, text: str | None) -> str:
        """Rank 0's ``text`` on every process (an all-sum of its UTF-8 bytes in which the
        others add zeros, exact in uint8); needs no shared file system."""
        if self.size == 1:
            return text
        data = np.frombuffer(text.encode(), dtype=np.uint8) if self.main else np.zeros(0, np.uint8)
        n = int(self.sum(np.array([len(data)], dtype=np.int64))[0])
        buf = np.zeros(n, dtype=np.uint8)
        if self.main:
            buf[:] = data
        every = np.array(mx.distributed.all_sum(mx.array(buf), group=self.group, stream=mx.cpu))
        return every.tobytes().decode()

    def check_same(self, what: str, text: str) -> None:
        """All processes must hold the same ``text`` (e.g. a tokenizer or a label map)."""
        if self.size == 1:
            return
        h = np.frombuffer(hashlib.sha256(text.encode()).digest()[:8], dtype=np.uint16).astype(np.float32)
        every = np.array(mx.distributed.all_gather(mx.array(h[None]), group=self.group))
        if not (every == h[None]).all():
            raise UFBError(f"the {self.size} processes disagree on the {what}; give every process the same files")


# ---------------------------------------------------------------------------------------
# Optimizer and schedule


def add_run_arguments(parser, save_every: int, save_help: str):
    """The "run" options that fine-tuning and pretraining share; returns the group."""
    r = parser.add_argument_group("run")
    r.add_argument("--eval-batch-size", type=int, default=64)
    r.add_argument("--log-every", type=int, default=10)
    r.add_argument("--save-every", type=int, default=save_every, help=save_help)
    r.add_argument("--keep", type=int, default=0,
                   help="checkpoints kept once the run has finished, newest first (default 0: none, the model "
                        "stays); while it runs, the newest max(KEEP, 1), which --resume needs")
    r.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    r.add_argument("--force", action="store_true", help="replace a run or model already in --out")
    r.add_argument("--quiet", action="store_true", help="no progress lines (log.jsonl is still written)")
    return r


F32_MAX = float(np.finfo(np.float32).max)
F32_TINY = float(np.finfo(np.float32).tiny)  # the smallest normal float32


def check_optimisation_args(a) -> None:
    """The options fine-tuning and pretraining share, each in the precision it is used in
    (float32: --lr 1e39 would be inf, --eps 1e-46 zero, a beta of 0.999999999 one), and
    the run options; called before anything is written."""
    for name, v in (("--eval-batch-size", a.eval_batch_size), ("--log-every", a.log_every)):
        if v < 1:
            raise UFBError(f"{name} must be at least 1, got {v}")
    if a.keep < 0:
        raise UFBError(f"--keep must be >= 0, got {a.keep}")
    if a.lr is not None and not F32_TINY <= a.lr <= F32_MAX:
        raise UFBError(f"--lr must be positive and a normal float32 number (from {F32_TINY:.3g} to {F32_MAX:.3g}), "
                       f"got {a.lr:g}")
    for b in a.betas:
        if not (0 <= b < 1 and np.float32(b) < 1):
            raise UFBError(f"--betas must be in [0, 1) in float32, got {b!r}" + (" (float32 rounds it to 1)" if 0 <= b < 1 else ""))
    if not F32_TINY <= a.eps <= F32_MAX:
        raise UFBError(f"--eps must be positive and a normal float32 number (from {F32_TINY:.3g} to {F32_MAX:.3g}), "
                       f"got {a.eps:g}")
    for name, v in (("--weight-decay", a.weight_decay), ("--grad-clip", a.grad_clip)):
        if not 0 <= v <= F32_MAX:
            raise UFBError(f"{name} must be a finite float32 number >= 0, got {v:g}")
    if not 0 <= a.warmup < 1:
        raise UFBError(f"--warmup must be a fraction in [0, 1), got {a.warmup:g}")
    if not 0 <= a.dropout < 1:
        raise UFBError(f"--dropout must be in [0, 1), got {a.dropout:g}")
    if not 0 <= a.seed < 2**64:
        raise UFBError(f"--seed must be an integer in [0, 2^64), got {a.seed}")
    if a.resume and a.force:
        raise UFBError("--resume and --force exclude each other")


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


# ---------------------------------------------------------------------------------------
# The step


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


# ---------------------------------------------------------------------------------------
# Logging


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


class Logger:
    """Rank 0 prints progress to stdout (a bar with rate and time left on a terminal, plain
    lines otherwise; nothing with ``quiet``) and appends one JSON record per event, with
    its UTC time and the seconds since the run started, to OUT/log.jsonl."""

    def __init__(self, out: Path, world: World, quiet: bool = False):
        self.path = Path(out) / LOG_FILE
        self.world, self.quiet = world, quiet
        self.progress: Progress | None = None
        self._t0 = time.monotonic()

    def print(self, msg: str) -> None:
        if self.world.main and not self.quiet:
            if self.progress is not None:
                self.progress.write(msg)
            else:
                print(msg, flush=True)

    def start_progress(self, total: int, done: int, unit: str = "step") -> Progress:
        """The bar (on a terminal) of the work from ``done`` to ``total``; plain lines are
        the caller's (``Progress.meter`` gives their time figures)."""
        self.progress = Progress(total, "training", unit, file=sys.stdout, initial=done,
                                 enabled=self.world.main and not self.quiet, interval=None)
        return self.progress

    def phase(self, total: int, desc: str, unit: str) -> Progress:
        """The progress of other long work of the run (an evaluation): a bar under the
        training bar on a terminal, else a line every 10 seconds."""
        return Progress(total, desc, unit, file=sys.stdout, enabled=self.world.main and not self.quiet)

    def record(self, event: str, **values) -> None:
        if self.world.main:
            stamp = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"),
                     "elapsed_s": round(time.monotonic() - self._t0, 3)}
            with open(self.path, "a") as f:
                f.write(json.dumps({"event": event, **clean_tree(values), **stamp}) + "\n")

    def truncate_after(self, step: int) -> None:
        """On resume: forget what the killed run logged after its last checkpoint, and a
        line it was killed in the middle of writing."""
        if not self.world.main or not self.path.exists():
            return
        keep = [json.dumps(rec) for rec in read_log(self.path.parent) if _logged_step(rec) <= step]
        atomic_write_text(self.path, "".join(line + "\n" for line in keep))


def _logged_step(rec: dict) -> float:
    """A log record's step (0 when it has none); a malformed one (not a whole number, e.g.
    a hand-edited line) counts as after every checkpoint, so truncation drops it."""
    step = rec.get("step", 0)
    return step if isinstance(step, int) and not isinstance(step, bool) else math.inf


def peak_memory_gb() -> float:
    return mx.get_peak_memory() / 1e9


def read_log(out) -> list[dict]:
    """The records of OUT/log.jsonl; a line that is not a JSON object (one cut short by a
    kill) is skipped."""
    path = Path(out) / LOG_FILE
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(rec, dict):
            records.append(rec)
    return records


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


# ---------------------------------------------------------------------------------------
# Files


def list_checkpoints(out: Path) -> list[tuple[int, Path]]:
    root = Path(out) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _CKPT.match(p.name)
        if m and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def save_checkpoint(out: Path, step: int, model, optimizer, state: dict, keep: int = 2) -> Path:
    """Write OUT/checkpoints/step-XXXXXXXX atomically (ufb_ref.fsio.atomic_folder: a
    temporary folder, then a rename) and keep the newest ``max(keep, 1)`` checkpoints (the
    run goes on: --resume needs one)."""
    root = Path(out) / CHECKPOINTS
    final = root / f"step-{step:08d}"
    # replace: a resumed run saving the same step again
    with fsio.atomic_folder(final, replace=True) as tmp:
        save_safetensors(tmp / WEIGHTS_FILE, dict(tree_flatten(model.parameters())))
        save_safetensors(tmp / OPTIMIZER_FILE, dict(tree_flatten(optimizer.state)))
        (tmp / STATE_FILE).write_text(json.dumps(clean_tree({**state, "step": step}), indent=2) + "\n")
    prune_checkpoints(out, max(keep, 1))
    return final


def prune_checkpoints(out: Path, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints; 0 removes them all, and their folder."""
    ckpts = list_checkpoints(out)
    for _, old in ckpts[: max(len(ckpts) - keep, 0)]:
        shutil.rmtree(old, ignore_errors=True)
    root = Path(out) / CHECKPOINTS
    if keep == 0 and root.is_dir() and not any(root.iterdir()):
        root.rmdir()


def restore_checkpoint(path: Path, model, optimizer) -> dict:
    """Restore a training checkpoint's weights and optimizer state in place; returns its
    trainer state (step, run options, best result). Every file is checked before anything
    is restored: the safetensors headers against the file sizes; the trainer state's step
    and run options; the weights and the optimizer state against what this model and
    optimizer hold (the same keys, shapes and dtypes) and finite."""
    try:
        state = json.loads((path / STATE_FILE).read_text())
        if not isinstance(state, dict):
            raise ValueError(f"{STATE_FILE} is not a JSON object")
        step = state.get("step")
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"{STATE_FILE}: 'step' must be a non-negative integer, got {step!r}")
        if not isinstance(state.get("run", {}), dict):
            raise ValueError(f"{STATE_FILE}: 'run' must be an object of run options, got {state['run']!r:.40}")
        for name in (WEIGHTS_FILE, OPTIMIZER_FILE):
            SafetensorsFile(path / name)
        weights = mx.load(str(path / WEIGHTS_FILE))
        opt_state = mx.load(str(path / OPTIMIZER_FILE))
        _check_tree(WEIGHTS_FILE, weights, dict(tree_flatten(model.parameters())))
        optimizer.init(model.trainable_parameters())  # the state's expected keys, shapes and dtypes
        _check_tree(OPTIMIZER_FILE, opt_state, dict(tree_flatten(optimizer.state)))
        model.load_weights(list(weights.items()), strict=True)
        optimizer.state = tree_unflatten(list(opt_state.items()))
    except (OSError, ValueError, RuntimeError, RecursionError) as e:
        raise UFBError(f"{path}: cannot read the checkpoint ({(str(e).splitlines() or ['?'])[0]})") from e
    mx.eval(model.parameters(), optimizer.state)
    return state


def _check_tree(what: str, got: dict, want: dict) -> None:
    """A checkpoint file's arrays must be exactly the ``want`` ones (keys, shapes, dtypes),
    and finite (float ones)."""
    missing = sorted(set(want) - set(got))
    if missing:
        raise ValueError(f"{what} lacks '{missing[0]}'" + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
                         + " (a checkpoint of another model or run?)")
    extra = sorted(set(got) - set(want))
    if extra:
        raise ValueError(f"{what} holds '{extra[0]}'" + (f" and {len(extra) - 1} more" if len(extra) > 1 else "")
                         + " that this run does not have (a checkpoint of another model or run?)")
    for k, w in want.items():
        g = got[k]
        if g.shape != w.shape or g.dtype != w.dtype:
            raise ValueError(f"{what}: '{k}' is {str(g.dtype).split('.')[-1]} {tuple(g.shape)}, this run needs "
                             f"{str(w.dtype).split('.')[-1]} {tuple(w.shape)}")
    floats = [k for k, v in got.items() if mx.issubdtype(v.dtype, mx.floating)]
    finite = mx.stack([mx.all(mx.isfinite(got[k])) for k in floats]) if floats else mx.array([True])
    if not np.array(finite).all():
        raise ValueError(f"{what}: '{floats[int(np.argmin(np.array(finite)))]}' is not finite")


def _occupied(out: Path) -> bool:
    return (out / CHECKPOINTS).exists() or any((out / f).exists() for f in (*RUN_FILES, fsio.MARKER))


def check_out_path(out: str | Path, inputs=()) -> None:
    """``--out`` must name a folder to write that is not the current folder or one above
    it (nor the root), and must not overlap any of ``inputs`` (the model, tokenizer, corpus
    or data files of the run): neither inside one nor holding one."""
    text = str(out)
    if not text.strip() or Path(text).name in ("", ".", ".."):
        raise UFBError(f"--out '{text}' does not name a folder to write")
    try:
        real, cwd = Path(out).resolve(), Path.cwd().resolve()
    except (OSError, RuntimeError) as e:
        raise UFBError(f"--out '{text}': cannot resolve the path ({e})") from e
    if fsio._inside(cwd, real):
        raise UFBError(f"--out '{text}' is the current folder or holds it; write the run into a folder of its own")
    try:  # undecodable bytes (held as surrogates): MLX cannot open such a path to save into
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UFBError(f"--out {text!a} is not valid UTF-8; MLX cannot write model files there") from None
    encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
    try:  # the run prints it (at the end too): fail now rather than after the training
        text.encode(encoding)
    except (UnicodeEncodeError, LookupError):
        raise UFBError(f"--out {text!a} cannot be printed in standard output's encoding ({encoding}); "
                       "set PYTHONIOENCODING=utf-8") from None
    for src in inputs:
        if src is None:
            continue
        src_real = Path(src).resolve()
        if fsio._inside(src_real, real) or fsio._inside(real, src_real):
            raise UFBError(f"--out '{text}' overlaps the input '{src}'; write the output elsewhere")


def check_out(out: Path, resume: bool, force: bool, inputs=()) -> tuple[int, Path] | None:
    """Check the output folder (read only). Returns the checkpoint to resume from, or None
    for a new run; a new run refuses a folder that holds a run or a model unless ``force``,
    and ``force`` replaces only a folder this project's tools wrote (``fsio.check_replaceable``).
    ``inputs``: what the run reads (``check_out_path``)."""
    out = Path(out)
    check_out_path(out, inputs)
    if out.exists() and not out.is_dir():
        raise UFBError(f"output path '{out}' is a file")
    if resume:
        recover_checkpoints(out)
        ckpts = list_checkpoints(out)
        if not ckpts:
            raise UFBError(f"--resume: no checkpoint in '{out / CHECKPOINTS}' to resume from")
        return ckpts[-1]
    if _occupied(out) and not force:
        raise UFBError(f"output folder '{out}' already holds a training run or a model; "
                       "pass --resume to continue the run or --force to start over")
    if force and _occupied(out):
        fsio.check_replaceable(out, [p for p in inputs if p is not None])
    return None


def recover_checkpoints(out: Path) -> None:
    """Put back a checkpoint whose replacement (a resumed run saving the same step again)
    was killed between its two renames (ufb_ref.fsio.recover_replaced)."""
    root = Path(out) / CHECKPOINTS
    if root.is_dir():
        for name in sorted({m.group(1) for p in root.iterdir() if (m := _CKPT_TEMP.match(p.name))}):
            fsio.recover_replaced(root / name)


def lock_out(out: Path, world: World):
    """The output folder's write lock (ufb_ref.fsio.folder_lock), held by rank 0: a second
    run on the same --out stops with a one-line error instead of mixing its files in."""
    return fsio.folder_lock(out) if world.main else contextlib.nullcontext()


def physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_training_memory(args: ModelArgs) -> None:
    """Refuse, before anything is written, a model whose training state alone (float32
    weights, gradients and AdamW's two moments) cannot fit in this machine's memory."""
    n = sum(math.prod(shape) for shape in expected_shapes(args).values())
    need, have = 16 * n, physical_memory()
    if have and need > have:
        raise UFBError(f"the model has {n / 1e9:.3g}G parameters: training needs at least {need / 2**30:.1f} GiB "
                       f"(weights, gradients and optimizer state), more than this machine's {have / 2**30:.1f} GiB; "
                       "make it smaller (fff_depth, hidden_size, num_layers, vocab_size)")


def memory_limit() -> int | None:
    """The bytes this process may use: the machine's memory, or less under ``ulimit -v``."""
    have = physical_memory()
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
        if soft != resource.RLIM_INFINITY:
            have = min(have or soft, soft)
    except (ImportError, ValueError, OSError):
        pass
    return have


def check_batch_memory(args: ModelArgs, tokens: int, predicted: int, what: str,
                       hint: str = "lower --batch-size") -> None:
    """Refuse, before anything is written, a step whose activations alone cannot fit: a
    lower bound (per token and layer the eight (H,) vectors the backward keeps, the
    embedding; ``predicted`` positions' logits and their gradient over the vocabulary, or
    the classifier head's) against ``memory_limit()``. MLX may crash instead of raising
    when an allocation fails, so this is checked up front."""
    per_token = 4 * (8 * args.hidden_size * max(args.num_layers, 1) + 2 * args.hidden_size)
    need = tokens * per_token + 2 * 4 * predicted * max(args.vocab_size if args.task == "mlm" else args.num_labels, 1)
    have = memory_limit()
    if have and need > have:
        raise UFBError(f"{what}: one step of {tokens} tokens needs at least {need / 2**30:.1f} GiB of activations, "
                       f"more than the {have / 2**30:.1f} GiB this process may use; {hint}")


def prepare_out(out: Path, world: World, resume: bool, force: bool, inputs=()) -> tuple[int, Path] | None:
    """``check_out``, then for a new run create the folder and mark it as a run's
    (``fsio.MARKER``); ``force`` first removes what the marker lists (checkpoints, log,
    model, tokenizer files), after ``check_out`` has found nothing else there."""
    out = Path(out)
    found = check_out(out, resume, force, inputs)
    if resume:
        return found
    occupied = _occupied(out)
    world.barrier()  # every process has checked before rank 0 removes anything
    if world.main:
        if occupied:  # check_out found only what the marker lists (and its temporaries)
            listed = fsio.marked_files(out) or []
            for p in out.iterdir():
                if fsio.listed_entry(p.name, listed):
                    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        out.mkdir(parents=True, exist_ok=True)
        fsio.atomic_write_text(out / fsio.MARKER, json.dumps({"written_by": "ultrafastbert-mlx", "kind": "run",
                                                             "files": list(RUN_ENTRIES)}, indent=2) + "\n")
    world.barrier()
    return None


def clean_stale_temporaries(out: Path) -> None:
    """What a killed run left half-written: temporary checkpoint folders and files of the
    model folder (ufb_ref.fsio.clean_stale_temporaries, which keeps those of live
    processes)."""
    root = Path(out) / CHECKPOINTS
    names = {m.group(1) for p in root.iterdir() if (m := _CKPT_TEMP.match(p.name))} if root.is_dir() else set()
    for name in names:
        fsio.clean_stale_temporaries(root / name)
    for name in RUN_FILES:
        fsio.clean_stale_temporaries(Path(out) / name)


def resume(out: Path, checkpoint: Path, model, optimizer, run_cfg: dict, world, logger, total: int) -> dict:
    """Continue a killed run: restore model, optimizer and trainer state from its last
    checkpoint (or, when that one cannot be read, the newest older one that can), refuse
    options that would change the result, and cut the log back to it."""
    if world.main:
        clean_stale_temporaries(out)
    candidates = [p for _, p in reversed(list_checkpoints(out)) if p.name <= Path(checkpoint).name]
    errors = []
    for path in candidates or [Path(checkpoint)]:
        try:
            state = restore_checkpoint(path, model, optimizer)
            break
        except UFBError as e:
            errors.append(str(e))
    else:
        raise UFBError(f"--resume: no readable checkpoint in '{Path(out) / CHECKPOINTS}' ({errors[0]})")
    if errors and world.main:  # the broken ones are replaced when the run saves those steps again
        print(f"warning: skipped {len(errors)} unreadable checkpoint{'s' if len(errors) > 1 else ''} "
              f"({errors[0]}); resuming from the older {path.name}", file=sys.stderr, flush=True)
    checkpoint = path
    check_resume(state.get("run", {}), run_cfg)
    if state["step"] > total:  # the run's length is part of its options: only an edited file gets here
        raise UFBError(f"--resume: {path} claims step {state['step']}, beyond the run's {total} steps")
    logger.truncate_after(state["step"])
    logger.print(f"resuming from {checkpoint} (step {state['step']}/{total})")
    return state


# Options that say where a run writes, how it starts and how often it reports or saves:
# a resumed run may change them. Every other option is part of the run's fingerprint.
NOT_FINGERPRINTED = ("out", "resume", "force", "quiet", "log_every", "save_every", "keep", "eval_every",
                     "eval_batch_size")


def fingerprint(args, inputs: tuple[str, ...] = (), **derived) -> dict:
    """What determines a run's result, which ``--resume`` compares: every parsed option
    (``args``, an argparse Namespace) except NOT_FINGERPRINTED and the ``inputs`` (files
    whose content ``derived`` holds as hashes, so that a moved file still resumes), plus
    ``derived`` (values computed from the inputs, which win over options of the same name)."""
    options = {k: v for k, v in vars(args).items() if k not in NOT_FINGERPRINTED and k not in inputs}
    return json.loads(json.dumps({**options, **derived}))  # as it reads back from JSON


def check_resume(saved: dict, run: dict) -> None:
    """A run resumes only with the options that determine its result."""
    now = json.loads(json.dumps(run))
    for key, value in now.items():
        if saved.get(key) != value:
            raise UFBError(f"--resume: '{key}' was {saved.get(key)!r} in the interrupted run and is "
                           f"{value!r} now; resume with the same options and data")
