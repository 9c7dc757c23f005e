"""Fine-tune UltraFastBERT for sequence classification or regression.

    python -m ufb_mlx.finetune --model M --train train.jsonl --valid valid.jsonl \\
        --task classification --out OUT

Data: JSONL (one object a line), CSV or TSV (header row) with a ``text`` column, an
optional ``text_pair`` column and a ``label`` column (strings or numbers; for regression,
numbers). Defaults: the paper's fine-tuning recipe (AdamW betas (0.9, 0.98), eps 1e-6,
weight decay 0.01, batch 16, cosine schedule with 10 % warm-up, dropout 0.1), with the
learning rate and epochs of --recipe: "paper" (lr 4e-5, 5 epochs) for models of the
released width, "small" (lr 1.5e-4, 3 epochs, measured on the demo model; see its model
card) for smaller ones. --max-steps trains an exact number of steps; --init random starts
the same architecture from fresh weights (a baseline). The model is evaluated on --valid
after every epoch (accuracy, F1, Matthews correlation; Pearson, Spearman, MSE for
regression) and the best one is saved as a model folder in OUT, which ``ufb_mlx.load`` and
``python -m ufb_mlx.classify --model OUT`` read.
Checkpoints go to OUT/checkpoints (every --save-every steps and at each epoch's end);
the same command with --resume continues a killed run and ends with the same weights.
Under ``mlx.launch -n N`` the processes train data-parallel (--batch-size is per process).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from ufb_ref import fsio
from ufb_ref.checkpoint import CONFIG_FILE, WEIGHTS_FILE, resolve
from ufb_ref.config import ModelArgs
from ufb_ref.errors import ArgumentParser, UFBError, command_name
from ufb_ref.tokenizer import pad_batch

from . import data, metrics, train
from .entry import console
from .evaluate import evaluate_classifier
from .jsonable import clean_tree
from .loading import DEMO, load, model_location, save_model
from .losses import classification_loss
from .model import FFF_MODES, Model

TASKS = ("classification", "regression")
# The defaults of --lr and --epochs. Everything else (AdamW betas 0.9/0.98, eps 1e-6, weight
# decay 0.01, batch 16, cosine schedule with 10 % warm-up, dropout 0.1) is the paper's in both.
RECIPES = {
    "paper": {"lr": 4e-5, "epochs": 5, "about": "the paper's GLUE recipe for the released width-768 model"},
    "small": {"lr": 1.5e-4, "epochs": 3,
              "about": "the best measured on the width-256 demo model, averaged over two tasks (its model card "
                       "has the grids)"},
}
RELEASED_WIDTH = 768


def recipe_for(name: str, args: ModelArgs) -> str:
    """"auto": the paper's recipe for models as wide as the released one, "small" below
    (where it was measured); otherwise the name given."""
    if name != "auto":
        return name
    return "paper" if args.hidden_size >= RELEASED_WIDTH else "small"


# ---------------------------------------------------------------------------------------
# Model


def _hub_head_dim(folder: Path) -> int:
    """The classification head width a Hub (crammedBERT) config asks for, if any."""
    try:
        cfg = json.loads((folder / CONFIG_FILE).read_text())
        return int(cfg["arch"]["classification_head"]["head_dim"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def classifier_args(base: Model, base_folder: Path, num_labels: int, regression: bool, id2label: dict | None,
                    head_dim: int | None, source: dict) -> tuple[ModelArgs, bool]:
    """The config of the classifier (or regressor: one output) that ``build_classifier``
    makes from ``base`` (validated: a bad --head-dim fails here, before anything is
    written), and whether ``base``'s head is kept: it is when ``base`` is already a
    classifier of the same shape."""
    b = base.args
    head_dim = head_dim or b.head_dim or _hub_head_dim(base_folder) or b.hidden_size
    keep = (b.task == "classification" and b.num_labels == num_labels and b.head_dim == head_dim
            and (b.problem_type == "regression") == regression)
    params = {**b.to_dict(), "task": "classification", "num_labels": num_labels, "head_dim": head_dim,
              "id2label": id2label, "problem_type": "regression" if regression else "single_label_classification",
              "source": source}
    return ModelArgs.from_dict(params, where="the classifier (--head-dim and the labels)"), keep


def build_classifier(base: Model, base_folder: Path, num_labels: int, regression: bool,
                     id2label: dict | None, head_dim: int | None, seed: int, fff_mode: str,
                     source: dict) -> tuple[Model, bool]:
    """A classifier (or regressor: one output) whose encoder is ``base``'s. The pooler and
    head are new (N(0, 0.02^2) weights, zero biases) unless ``base`` is already a classifier
    of the same shape, whose head is then kept. Returns (model, head kept)."""
    args, keep = classifier_args(base, base_folder, num_labels, regression, id2label, head_dim, source)
    mx.random.seed(seed)
    model = Model(args, fff_mode)
    train.init_normal(model.pooler)
    train.init_normal(model.head)
    weights = [(k, v) for k, v in tree_flatten(base.parameters())
               if k.startswith("encoder.") or (keep and k.startswith(("pooler.", "head.")))]
    model.load_weights(weights, strict=False)
    mx.eval(model.parameters())
    return model, keep


# ---------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog=command_name("ufb_mlx.finetune"), description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEMO,
                   help="model folder, Hub id or 'demo' (the model shipped in the package; default); "
                        "an MLM or a classifier")
    p.add_argument("--train", required=True, help="training data (.jsonl, .csv or .tsv)")
    p.add_argument("--valid", help="validation data, evaluated after every epoch")
    p.add_argument("--task", choices=TASKS, default="classification")
    p.add_argument("--out", required=True, help="output folder: the best model, checkpoints, log.jsonl")
    d = p.add_argument_group("data")
    d.add_argument("--format", choices=("auto",) + data.FORMATS, default="auto", help="default: from the file suffix")
    d.add_argument("--text-column", default="text")
    d.add_argument("--pair-column", default="text_pair")
    d.add_argument("--label-column", default="label")
    d.add_argument("--max-length", type=int, help="truncate inputs to this many tokens (default: the model's max_seq_length)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--recipe", choices=("auto", *RECIPES), default="auto",
                   help="the defaults of --lr and --epochs: " + "; ".join(
                       f"{k}: {v['about']} (lr {v['lr']:g}, {v['epochs']} epochs)" for k, v in RECIPES.items())
                   + f"; auto (default): paper for models of hidden size {RELEASED_WIDTH} or more, else small")
    o.add_argument("--lr", type=float, help="peak learning rate (default: the recipe's)")
    o.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.98))
    o.add_argument("--eps", type=float, default=1e-6)
    o.add_argument("--weight-decay", type=float, default=0.01)
    o.add_argument("--batch-size", type=int, default=16, help="per process (default 16)")
    o.add_argument("--epochs", type=int, help="passes over the training data (default: the recipe's)")
    o.add_argument("--max-steps", type=int,
                   help="train exactly this many optimizer steps instead of whole epochs (the schedule spans them)")
    o.add_argument("--schedule", choices=train.SCHEDULES, default="cosine")
    o.add_argument("--warmup", type=float, default=0.1, help="warm-up fraction of all steps (default 0.1)")
    o.add_argument("--dropout", type=float, default=0.1)
    o.add_argument("--grad-clip", type=float, default=0.0, help="max global gradient norm (0: off)")
    o.add_argument("--seed", type=int, default=0)
    m = p.add_argument_group("model")
    m.add_argument("--init", choices=("pretrained", "random"), default="pretrained",
                   help="random: the same architecture and tokenizer with fresh weights (a baseline)")
    m.add_argument("--head-dim", type=int, help="pooler width of a new head (default: the checkpoint's)")
    m.add_argument("--fff-mode", choices=FFF_MODES, default="conditional")
    m.add_argument("--metric", choices=tuple(metrics.HIGHER_IS_BETTER),
                   help="selects the best model (default: accuracy; pearson for regression)")
    train.add_run_arguments(p, save_every=0, save_help="checkpoint every N steps (0: at epoch ends only)")
    return p


def _check_args(a) -> None:
    positive = {"--batch-size": a.batch_size, **{k: v for k, v in (("--epochs", a.epochs), ("--max-steps", a.max_steps))
                                                 if v is not None}}
    for name, v in positive.items():
        if v < 1:
            raise UFBError(f"{name} must be at least 1, got {v}")
    if a.save_every < 0:
        raise UFBError(f"--save-every must be >= 0, got {a.save_every}")
    train.check_optimisation_args(a)
    if a.head_dim is not None and a.head_dim < 1:
        raise UFBError(f"--head-dim must be at least 1, got {a.head_dim}")
    if a.max_length is not None and a.max_length < 1:
        raise UFBError(f"--max-length must be at least 1, got {a.max_length}")
    metric = a.metric or ("pearson" if a.task == "regression" else "accuracy")
    allowed = (metrics.REGRESSION_METRICS if a.task == "regression" else metrics.CLASSIFICATION_METRICS) + ("loss",)
    if metric not in allowed:
        raise UFBError(f"--metric {metric} does not fit --task {a.task} (choose from {', '.join(allowed)})")
    a.metric = metric


def main(argv=None) -> int:
    with train.tool_run(build_parser(), argv, _check_args) as run:
        return _main(*run)


def _main(a, world: train.World, out: Path, held: contextlib.ExitStack) -> int:

    # Everything a bad input can break is checked before the output folder is touched.
    base_folder = resolve(model_location(a.model))
    if out.resolve() == base_folder.resolve():
        raise UFBError("--out must differ from --model (the model folder would be overwritten)")
    inputs = (base_folder, a.train, a.valid)  # --out may overlap none of them
    train.check_out(out, a.resume, a.force, inputs)  # fail early; prepare_out below, once the data is known good
    logger = train.Logger(out, world, a.quiet)
    logger.print(f"loading {a.model}, reading and tokenising {a.train}" + (f" and {a.valid}" if a.valid else ""))
    base, tok = load(a.model, fff_mode=a.fff_mode)
    recipe = RECIPES[recipe_for(a.recipe, base.args)]
    a.lr = recipe["lr"] if a.lr is None else a.lr
    a.epochs = recipe["epochs"] if a.epochs is None else a.epochs
    max_length = a.max_length or base.args.max_seq_length
    if max_length > base.args.max_seq_length:
        raise UFBError(f"--max-length {max_length} exceeds the model's max_seq_length {base.args.max_seq_length}")
    cols = dict(fmt=a.format, text_column=a.text_column, pair_column=a.pair_column, label_column=a.label_column)
    train_ex = data.read_examples(a.train, **cols)
    valid_ex = data.read_examples(a.valid, **cols) if a.valid else []
    regression = a.task == "regression"
    if regression:
        labels, id2label = None, None
        y_train, y_valid = data.regression_targets(train_ex), data.regression_targets(valid_ex)
    else:
        labels = data.build_labels(train_ex, a.train)
        id2label = {str(i): k for i, k in enumerate(labels)}
        y_train, y_valid = data.encode_labels(train_ex, labels), data.encode_labels(valid_ex, labels)
    encoder = data.TextEncoder(tok, max_length)
    x_train, cut_train = encoder(train_ex)
    x_valid, cut_valid = encoder(valid_ex) if valid_ex else ([], 0)
    world.check_same("training data", _digest(x_train, y_train))
    source = {"finetuned_from": str(a.model), "task": a.task, "train": str(a.train)}
    cls_args = classifier_args(base, tok.path.parent, 1 if regression else len(labels), regression, id2label,
                               a.head_dim, source)[0]
    if regression and valid_ex and a.metric in ("pearson", "spearman"):
        _check_correlation_labels(y_valid, a.valid, a.metric)
    n = len(x_train)
    steps_per_epoch = math.ceil(n / (a.batch_size * world.size))
    total = steps_per_epoch * a.epochs if a.max_steps is None else a.max_steps
    train.make_schedule(a.schedule, a.lr, total, a.warmup)  # validates
    rows = min(a.batch_size * world.size, n)
    train.check_batch_memory(cls_args, rows * max((len(x) for x in x_train), default=1), rows,
                             f"--batch-size {a.batch_size}")
    held.enter_context(train.lock_out(out, world))
    resume_from = train.prepare_out(out, world, a.resume, a.force, inputs)

    model, kept = build_classifier(base, tok.path.parent, 1 if regression else len(labels), regression,
                                   id2label, a.head_dim, a.seed, a.fff_mode, source)
    del base
    if a.init == "random":  # a baseline: the same architecture and tokenizer, nothing learnt
        mx.random.seed(a.seed)
        train.init_model(model)
        kept = False
    model.set_dropout(a.dropout)

    n = len(x_train)
    global_batch = a.batch_size * world.size
    steps_per_epoch = math.ceil(n / global_batch)
    total = steps_per_epoch * a.epochs if a.max_steps is None else a.max_steps
    schedule = train.make_schedule(a.schedule, a.lr, total, a.warmup)
    optimizer = train.make_optimizer(schedule, a.betas, a.eps, a.weight_decay)
    trainer = train.Trainer(model, optimizer, classification_loss, world, a.seed, a.grad_clip)

    # What determines the result: a resumed run must agree on all of it.
    run_cfg = train.fingerprint(a, ("train", "valid"), labels=labels, train_examples=n,
                                train_hash=_digest(x_train, y_train), valid_hash=_digest(x_valid, y_valid),
                                processes=world.size, head_dim=model.args.head_dim, max_length=max_length)
    best = {"metric": a.metric, "value": None, "step": None, "epoch": None, "metrics": None}
    start = 0
    if resume_from is not None:
        state = train.resume(out, resume_from[1], model, optimizer, run_cfg, world, logger, total)
        start, best = state["step"], _check_best(state.get("best", best))
    else:
        logger.print(f"fine-tuning {a.model} for {a.task}: {n} training examples"
                     + (f", {len(x_valid)} validation" if valid_ex else "")
                     + (f", labels {labels}" if labels else "")
                     + f"; lr {a.lr:g}"
                     + (f"; {total} steps ({total / steps_per_epoch:.2f} epochs of {steps_per_epoch})" if a.max_steps
                        else f"; {a.epochs} epochs x {steps_per_epoch} steps") + f", batch {a.batch_size}"
                     + (f" x {world.size} processes" if world.size > 1 else "")
                     + ("; random weights (--init random)" if a.init == "random"
                        else "; head kept from the checkpoint" if kept else "; new classification head"))
        for what, cut in (("training", cut_train), ("validation", cut_valid)):
            if cut:
                logger.print(f"note: {cut} {what} examples truncated to {max_length} tokens")
        logger.record("start", step=0, total_steps=total, **{
            k: v for k, v in run_cfg.items() if k not in ("train_hash", "valid_hash")})
    if start >= total:
        logger.print(f"nothing to do: the run already finished at step {start}")
        return 0

    pad_id = tok.pad_token_id
    y_train_mx = np.asarray(y_train)
    orders: dict[int, np.ndarray] = {}

    def get_batch(step):
        epoch, i = divmod(step - 1, steps_per_epoch)
        if epoch not in orders:
            orders.clear()
            orders[epoch] = data.epoch_order(n, a.seed, epoch)
        rows = orders[epoch][i * global_batch:(i + 1) * global_batch]
        # Padded up to a multiple of 16: the compiled step is traced once per shape, and
        # the padding is masked out of attention (the result is that of the shortest pad).
        length = min(-(-max(len(x_train[r]) for r in rows) // 16) * 16, max_length)
        local = data.shard(rows, world.rank, world.size)
        weights = np.ones(len(local), dtype=np.float32)
        if not len(local):  # fewer rows than processes in the last batch: a zero-weight row
            local, weights = rows[:1], np.zeros(1, dtype=np.float32)
        padded = pad_batch([x_train[r] for r in local], pad_id, length)
        batch = {"input_ids": mx.array(padded["input_ids"]), "attention_mask": mx.array(padded["attention_mask"]),
                 "labels": mx.array(y_train_mx[local]), "weights": mx.array(weights)}
        return batch, world.size / len(rows), int(sum(len(x_train[r]) for r in rows))

    def after_step(step):
        nonlocal best
        epoch_end = step % steps_per_epoch == 0 or step == total  # (--max-steps may end mid-epoch)
        epoch = (step - 1) // steps_per_epoch + 1
        if epoch_end and valid_ex:
            with logger.phase(len(x_valid), "evaluating", "text") as progress:
                res = evaluate_classifier(model, x_valid, y_valid, pad_id, a.eval_batch_size, progress.update)
            improved = metrics.is_better(a.metric, res[a.metric], best["value"], res["loss"],
                                   (best["metrics"] or {}).get("loss"))
            # A NaN metric (e.g. Pearson of constant predictions) selects nothing; the run
            # still ends with a model: the last one, when no epoch had a finite metric.
            fallback = not improved and best["value"] is None and step == total
            if improved or fallback:
                best = {"metric": a.metric, "value": res[a.metric] if improved else None, "step": step,
                        "epoch": epoch, "metrics": res}
                if world.main:
                    save_model(out, model, model.args, tok.path.parent)
            shown = " | ".join(f"{k} {v:.4f}" for k, v in res.items())
            logger.print(f"eval epoch {epoch} step {step} | {shown}" + (" | best, saved" if improved else "")
                         + (f" | {a.metric} is NaN: it cannot select a model" if math.isnan(res[a.metric]) else "")
                         + (f" | no epoch had a finite {a.metric}: the final model is saved" if fallback else ""))
            logger.record("eval", step=step, epoch=epoch, best=improved, **res)
        elif epoch_end and world.main:  # no validation data: the latest model is the result
            save_model(out, model, model.args, tok.path.parent)
            best = {"metric": None, "value": None, "step": step, "epoch": epoch, "metrics": None}
        if epoch_end or (a.save_every and step % a.save_every == 0) or step == total:
            checkpoint(step)

    def checkpoint(step):
        if world.main:
            path = train.save_checkpoint(out, step, model, optimizer, {"run": run_cfg, "best": best}, a.keep)
            logger.print(f"checkpoint step {step} -> {path}")
        logger.record("checkpoint", step=step)
        world.barrier()

    train.train_loop(trainer, logger, start_step=start, total_steps=total, get_batch=get_batch,
                 after_step=after_step, log_every=a.log_every,
                 describe=lambda s: f" epoch {(s - 1) // steps_per_epoch + 1}", checkpoint=checkpoint, keep=a.keep)
    if world.main:
        fsio.atomic_write_text(out / "train_results.json", json.dumps(clean_tree(best), indent=2) + "\n")
    if world.main and not (out / WEIGHTS_FILE).is_file():  # never report a model that is not there
        raise UFBError(f"the run ended without a model in '{out}'")
    if best["value"] is not None:
        logger.print(f"best {a.metric} {best['value']:.4f} at epoch {best['epoch']} (step {best['step']}); "
                     f"model saved in {out}")
    else:
        logger.print(f"model saved in {out}" + (f" (the final one: no epoch had a finite {a.metric})"
                                                 if valid_ex else ""))
    return 0


def _check_correlation_labels(y_valid, path, metric: str) -> None:
    """Pearson and Spearman need two or more validation labels that differ: otherwise they
    are NaN at every epoch and could never select a model."""
    y = np.asarray(y_valid, dtype=np.float64)
    if len(y) < 2 or np.all(y == y[0]):
        what = f"{len(y)} example" if len(y) < 2 else f"all {len(y)} labels are {y[0]:g}"
        raise UFBError(f"{path}: --metric {metric} needs at least 2 validation examples with different labels "
                       f"({what}); add validation data or choose --metric mse or loss")


def _check_best(best) -> dict:
    """A resumed run's best result (its checkpoint's trainer state)."""
    keys = {"metric", "value", "step", "epoch", "metrics"}
    if (not isinstance(best, dict) or not keys <= set(best)
            or not (best["value"] is None or isinstance(best["value"], (int, float)))
            or not (best["metrics"] is None or isinstance(best["metrics"], dict))):
        raise UFBError(f"--resume: the checkpoint's best result is malformed ({json.dumps(best)[:80]}); "
                       "start again with --force")
    return best


def _digest(x, y) -> str:
    import hashlib

    return hashlib.sha256(json.dumps([x, np.asarray(y).tolist()]).encode()).hexdigest()[:16]


cli = console(main)  # the console script (pyproject.toml)

if __name__ == "__main__":
    cli()
