"""Masked-language-model pretraining of UltraFastBERT, from scratch or continued.

    python -m ufb_mlx.pretrain --corpus texts/ --out OUT --config tiny|base|config.json
    python -m ufb_mlx.pretrain --corpus more.txt --out OUT2 --model OUT      # continue

The corpus is text files (or folders of .txt/.text/.md files); every non-blank line is a
segment. Without --tokenizer (or --model) a WordPiece tokenizer is trained on the corpus
with the released model's normaliser, special tokens and templates. Segments are
tokenised as ``A <sep>``, concatenated and packed into blocks of max_seq_length tokens;
25 % of the non-special tokens are selected (80 % become <mask>, 10 % a random token, 10 %
stay) and only those positions are predicted. Defaults are the paper's recipe: AdamW lr
1e-3, betas (0.9, 0.98), eps 1e-12, weight decay 0.01 (not on biases and norms), no
dropout, gradient clipping 0.5, one-cycle "triangle" schedule, sequence length 128.
The held-out split (--valid files, or --valid-fraction of the blocks) is evaluated every
--eval-every steps: MLM loss and masked-token accuracy. The model folder in OUT (updated
at every checkpoint) is what ``ufb_mlx.load`` and ``ufb_mlx.finetune --model`` read.
Under ``mlx.launch -n N`` the processes train data-parallel (--batch-size is per process).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from ufb_ref.checkpoint import read_json_object, resolve
from ufb_ref.config import ModelArgs
from ufb_ref.errors import ArgumentParser, UFBError, command_name
from ufb_ref.tokenizer import SPECIAL_TOKENS, Tokenizer

from . import data, train
from .entry import console
from .evaluate import evaluate_mlm
from .progress import Progress
from .loading import load, model_location, save_model
from .losses import mlm_loss_at
from .model import FFF_MODES, Model

# Model presets. "base" is the released UltraFastBERT-1x11 architecture.
PRESETS = {
    "tiny": dict(hidden_size=64, num_layers=2, num_heads=4, vocab_size=1024, max_seq_length=128,
                 intermed_type="fff", fff_trees=1, fff_depth=3, head_dim=64),
    "base": dict(hidden_size=768, num_layers=16, num_heads=12, vocab_size=32768, max_seq_length=128,
                 intermed_type="fff", fff_trees=1, fff_depth=11, head_dim=1024),
}


def config_from(spec: str) -> dict:
    """A preset name or the path of a flat ModelArgs JSON file."""
    if spec in PRESETS:
        return dict(PRESETS[spec], task="mlm")
    path = Path(spec)
    if not path.is_file():
        raise UFBError(f"--config must be one of {', '.join(PRESETS)} or a JSON file; '{spec}' is neither")
    cfg = read_json_object(path)
    if "arch" in cfg:
        raise UFBError(f"{path}: a Hub crammedBERT config; --config takes the flat config of this project "
                       "(as in a converted model's config.json)")
    if cfg.get("task", "mlm") != "mlm":
        raise UFBError(f"{path}: task {cfg.get('task')!r}; pretraining needs an 'mlm' config")
    ModelArgs.from_dict(dict(cfg, task="mlm"))  # validates, names a missing or bad key
    return dict(cfg, task="mlm")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog=command_name("ufb_mlx.pretrain"), description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", nargs="+", required=True, help="text files and/or folders")
    p.add_argument("--out", required=True, help="output folder: the model, checkpoints, log.jsonl")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--config", help="tiny, base (the released 1x11 architecture; default) or a flat config JSON")
    src.add_argument("--model", help="continue pretraining this MLM model (folder, Hub id or 'demo')")
    t = p.add_argument_group("tokenizer and data")
    t.add_argument("--tokenizer", help="folder with a tokenizer.json (default: train one on the corpus)")
    t.add_argument("--vocab-size", type=int, help="vocabulary of a trained tokenizer (default: the config's)")
    t.add_argument("--seq-length", type=int, help="block length (default: the config's max_seq_length, 128)")
    t.add_argument("--mask-rate", type=float, default=0.25)
    t.add_argument("--valid", nargs="+", help="held-out text files/folders (default: --valid-fraction of the blocks)")
    t.add_argument("--valid-fraction", type=float, default=0.05)
    o = p.add_argument_group("optimisation (defaults: the paper's recipe)")
    o.add_argument("--steps", type=int, default=1000, help="optimizer steps (default 1000)")
    o.add_argument("--batch-size", type=int, default=128, help="blocks per step and process (default 128)")
    o.add_argument("--lr", type=float, default=1e-3)
    o.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.98))
    o.add_argument("--eps", type=float, default=1e-12)
    o.add_argument("--weight-decay", type=float, default=0.01)
    o.add_argument("--grad-clip", type=float, default=0.5, help="max global gradient norm (0: off)")
    o.add_argument("--schedule", choices=train.SCHEDULES, default="triangle")
    o.add_argument("--warmup", type=float, default=0.5, help="fraction of the steps at which the triangle peaks")
    o.add_argument("--dropout", type=float, default=0.0)
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--fff-mode", choices=FFF_MODES, default="conditional")
    o.add_argument("--freeze-position-scale", action="store_true",
                   help="keep the positional embedding's learnt scale at its initial value (a small model "
                        "trained from scratch otherwise drives this one scalar to ~0 within a few hundred Adam "
                        "steps, losing word order; see docs/demo_model.md)")
    r = train.add_run_arguments(p, save_every=500, save_help="checkpoint (and model) every N steps, and at the end")
    r.add_argument("--eval-every", type=int, default=100)
    return p


def _check_args(a) -> None:
    for name in ("steps", "batch_size", "eval_every", "save_every"):
        if getattr(a, name) < 1:
            raise UFBError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(a, name)}")
    train.check_optimisation_args(a)
    if not 0 < a.valid_fraction < 1:
        raise UFBError(f"--valid-fraction must be in (0, 1), got {a.valid_fraction}")
    if a.model and (a.tokenizer or a.vocab_size):
        raise UFBError("--model brings its own tokenizer; --tokenizer and --vocab-size go with --config")
    if not 0 < a.mask_rate < 1:
        raise UFBError(f"--mask-rate must be in (0, 1), got {a.mask_rate}")
    if a.vocab_size is not None and a.vocab_size <= len(SPECIAL_TOKENS):  # (0 would mean the config's)
        raise UFBError(f"--vocab-size must be more than the {len(SPECIAL_TOKENS)} special tokens, got {a.vocab_size}")
    if a.seq_length is not None and a.seq_length < 8:
        raise UFBError(f"--seq-length must be at least 8, got {a.seq_length}")


def _tokenizer_hash(tok: Tokenizer) -> str:
    """Of the vocabulary (the file's layout may differ between a saved and a sent copy)."""
    vocab = sorted((tok.id_to_token(i), i) for i in range(tok.vocab_size))
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]


def main(argv=None) -> int:
    with train.tool_run(build_parser(), argv, _check_args) as run:
        return _main(*run)


def _main(a, world: train.World, out: Path, held: contextlib.ExitStack) -> int:

    # Corpus and model source first: bad inputs fail before the output folder is touched.
    files = data.corpus_files(a.corpus)
    lines = data.read_corpus(files)
    if world.main and not a.quiet:
        print(f"read {len(lines)} lines from {len(files)} corpus file(s)", flush=True)
    valid_lines = data.read_corpus(data.corpus_files(a.valid)) if a.valid else None
    base = base_tok = None
    if a.model:
        folder = resolve(model_location(a.model))
        if out.resolve() == folder.resolve():
            raise UFBError("--out must differ from --model (the model folder would be overwritten)")
        base, base_tok = load(a.model, fff_mode=a.fff_mode)
        if base.args.task != "mlm":
            raise UFBError(f"--model '{a.model}' is a classifier; pretraining continues masked-language models only")
        cfg = base.args.to_dict()
    else:
        cfg = config_from(a.config or "base")
    seq = a.seq_length or cfg["max_seq_length"]
    if a.model and seq > cfg["max_seq_length"]:
        raise UFBError(f"--seq-length {seq} exceeds the model's max_seq_length {cfg['max_seq_length']}")
    if not a.model:
        cfg["max_seq_length"] = seq
        # The largest model this run can build (the tokenizer may bring fewer tokens), checked
        # before a tokenizer is trained on a vocabulary that cannot be: nothing written yet.
        largest = ModelArgs.from_dict(dict(cfg, vocab_size=a.vocab_size or cfg["vocab_size"], pad_token_id=0),
                                      where=f"the model to pretrain ({a.config or 'base'}, --vocab-size, --seq-length)")
        train.check_training_memory(largest)
    if a.tokenizer:
        Tokenizer(a.tokenizer)  # a clear error for a missing or bad tokenizer.json
    # --out may overlap none of what the run reads.
    inputs = (*files, *(data.corpus_files(a.valid) if a.valid else ()), *a.corpus, *(a.valid or ()), a.tokenizer,
              folder if a.model else None, a.config if a.config and a.config not in PRESETS else None)
    resume_from = train.check_out(out, a.resume, a.force, inputs)

    # Tokenizer: the model's, a given one, the interrupted run's, or a new one.
    logger = train.Logger(out, world, a.quiet)
    hf = tok_tmp = None
    if base_tok is not None:
        tok, tok_src = base_tok, base_tok.path.parent
    elif a.tokenizer:
        tok_src = Path(a.tokenizer)
        tok_src = tok_src if tok_src.is_dir() else tok_src.parent
        tok = Tokenizer(tok_src)
    elif resume_from is not None:
        tok, tok_src = Tokenizer(out), None
    else:
        # Rank 0 trains it (deterministically: data.train_wordpiece) and sends it to the
        # others; it is saved in OUT, where --resume finds it.
        target = a.vocab_size or cfg["vocab_size"]
        logger.print(f"training a WordPiece tokenizer (vocabulary {target}) on {len(lines)} lines")
        t0 = time.perf_counter()
        hf = data.train_wordpiece(lines, target) if world.main else None
        logger.print(f"tokenizer trained in {time.perf_counter() - t0:.1f} s")
        text = world.broadcast_text(hf.to_str() if world.main else None)
        # Read again while packing, then removed (on every way out of main, too).
        tok_tmp = tempfile.TemporaryDirectory(prefix="ufb-tokenizer-")
        held.callback(tok_tmp.cleanup)
        (Path(tok_tmp.name) / "tokenizer.json").write_text(text)
        tok, tok_src = Tokenizer(tok_tmp.name), None
    if base is None:
        if a.config is None or a.config in PRESETS:
            cfg["vocab_size"] = tok.vocab_size  # presets take the tokenizer's vocabulary
        if tok.vocab_size > cfg["vocab_size"]:
            raise UFBError(f"the tokenizer has {tok.vocab_size} tokens, more than the config's vocab_size {cfg['vocab_size']}")
        cfg["pad_token_id"] = tok.pad_token_id
        cfg["source"] = {"pretrained_on": [str(f) for f in a.corpus], "config": a.config or "base"}
    else:
        cfg["source"] = {"pretrained_from": str(a.model), "pretrained_on": [str(f) for f in a.corpus]}
    args = ModelArgs.from_dict(cfg)

    # Data: packed blocks, a held-out split, fixed held-out masks.
    with Progress(len(lines) + len(valid_lines or []), "tokenising", "line", file=sys.stdout,
                  enabled=world.main and not a.quiet) as progress:
        blocks = data.pack(tok, lines, seq, on_lines=progress.update)
        if valid_lines is not None:
            valid = data.pack(tok, valid_lines, seq, what="held-out corpus", on_lines=progress.update)
    if valid_lines is None:
        if len(blocks) < 2:
            raise UFBError(f"corpus too small for a held-out split: {len(blocks)} block of {seq} tokens "
                           "(add text, lower --seq-length or give --valid)")
        perm = np.random.default_rng([a.seed, 7]).permutation(len(blocks))
        n_valid = max(1, int(round(a.valid_fraction * len(blocks))))
        if n_valid >= len(blocks):
            raise UFBError(f"--valid-fraction {a.valid_fraction:g} of {len(blocks)} blocks leaves no training block; "
                           "lower it or give --valid")
        valid, blocks = blocks[np.sort(perm[:n_valid])], blocks[np.sort(perm[n_valid:])]
    if tok_tmp is not None:  # packed: a kill during training leaves no copy behind
        tok_tmp.cleanup()

    # All inputs are good: now the output folder is prepared (and --force clears it).
    train.make_schedule(a.schedule, a.lr, a.steps, a.warmup)  # validates
    tokens = a.batch_size * world.size * seq
    train.check_batch_memory(args, tokens, int(math.ceil(a.mask_rate * tokens)), f"--batch-size {a.batch_size}")
    held.enter_context(train.lock_out(out, world))
    train.prepare_out(out, world, a.resume, a.force, inputs)
    if hf is not None and world.main:
        data.save_tokenizer_files(hf, out, seq)
    masker = data.Masker(tok, args.vocab_size, a.mask_rate)
    valid_inputs, valid_labels = masker(valid, np.random.default_rng([a.seed, 2**31 - 1]))
    world.check_same("corpus", hashlib.sha256(blocks.tobytes() + valid.tobytes()).hexdigest())

    # Model.
    mx.random.seed(a.seed)
    if base is not None:
        model = base
    else:
        model = Model(args, a.fff_mode)
        train.init_model(model)
    model.args = args
    model.set_dropout(a.dropout)
    if a.freeze_position_scale:
        model.encoder.embedding.pos_embedding.freeze(keys=["scale_factor"])

    schedule = train.make_schedule(a.schedule, a.lr, a.steps, a.warmup)
    optimizer = train.make_optimizer(schedule, a.betas, a.eps, a.weight_decay)
    trainer = train.Trainer(model, optimizer, mlm_loss_at, world, a.seed, a.grad_clip)
    run_cfg = train.fingerprint(a, ("corpus", "valid", "tokenizer"),
                                model_config={k: v for k, v in cfg.items() if k != "source"},
                                tokenizer_hash=_tokenizer_hash(tok), data=hashlib.sha256(blocks.tobytes()).hexdigest()[:16],
                                valid_hash=hashlib.sha256(valid.tobytes()).hexdigest()[:16], processes=world.size)
    start = 0
    if resume_from is not None:
        start = train.resume(out, resume_from[1], model, optimizer, run_cfg, world, logger, a.steps)["step"]
    else:
        n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
        logger.print(f"pretraining {'from ' + str(a.model) if a.model else (a.config or 'base') + ' from scratch'}: "
                     f"{n_params / 1e6:.2f}M parameters, vocabulary {args.vocab_size}, {len(blocks)} training and "
                     f"{len(valid)} held-out blocks of {seq} tokens; {a.steps} steps, batch {a.batch_size}"
                     + (f" x {world.size} processes" if world.size > 1 else ""))
        # run: the options, which a finished run's log keeps when its checkpoints are gone (--keep 0)
        logger.record("start", step=0, total_steps=a.steps, processes=world.size, blocks=len(blocks),
                      valid_blocks=len(valid), vocab_size=args.vocab_size, run=run_cfg)
        with logger.phase(len(valid_inputs), "evaluating", "block") as progress:
            res = evaluate_mlm(model, valid_inputs, valid_labels, a.eval_batch_size, progress.update)
        logger.print(f"eval step 0 | held-out mlm loss {res['mlm_loss']:.4f} | accuracy {res['mlm_accuracy']:.4f}")
        logger.record("eval", step=0, **res)
    if start >= a.steps:
        logger.print(f"nothing to do: the run already finished at step {start}")
        return 0

    n = len(blocks)
    global_batch = a.batch_size * world.size
    orders: dict[int, np.ndarray] = {}

    def rows_of(step):
        pos = np.arange((step - 1) * global_batch, step * global_batch)
        epochs, within = np.divmod(pos, n)
        for old in [e for e in orders if e < epochs[0]]:  # epochs behind this batch (a batch may span many)
            orders.pop(old)
        rows = np.empty(len(pos), dtype=np.int64)
        for e in np.unique(epochs):
            if int(e) not in orders:
                orders[int(e)] = data.epoch_order(n, a.seed, int(e))
            sel = epochs == e
            rows[sel] = orders[int(e)][within[sel]]
        return rows

    def get_batch(step):
        inputs, labels = masker(blocks[rows_of(step)], np.random.default_rng([a.seed, step]))
        count = int((labels != -100).sum())
        local = data.shard(np.arange(global_batch), world.rank, world.size)
        # A slice without a masked token adds 0 to the loss sum (and zero gradients).
        positions, targets, weights = data.label_positions(labels[local])
        batch = {"input_ids": mx.array(inputs[local]), "attention_mask": mx.ones(inputs[local].shape, dtype=mx.int32),
                 "positions": mx.array(positions), "targets": mx.array(targets), "weights": mx.array(weights)}
        return batch, world.size / max(count, 1), global_batch * seq

    def after_step(step):
        if step % a.eval_every == 0 or step == a.steps:
            with logger.phase(len(valid_inputs), "evaluating", "block") as progress:
                res = evaluate_mlm(model, valid_inputs, valid_labels, a.eval_batch_size, progress.update)
            logger.print(f"eval step {step} | held-out mlm loss {res['mlm_loss']:.4f} | accuracy {res['mlm_accuracy']:.4f}")
            logger.record("eval", step=step, **res)
        if step % a.save_every == 0 or step == a.steps:
            checkpoint(step)

    def checkpoint(step):
        if world.main:
            save_model(out, model, args, tok_src)
            path = train.save_checkpoint(out, step, model, optimizer, {"run": run_cfg}, a.keep)
            logger.print(f"checkpoint step {step} -> {path}")
        logger.record("checkpoint", step=step)
        world.barrier()

    train.train_loop(trainer, logger, start_step=start, total_steps=a.steps, get_batch=get_batch,
                 after_step=after_step, log_every=a.log_every, checkpoint=checkpoint, keep=a.keep)
    logger.print(f"model saved in {out}")
    return 0


cli = console(main)  # the console script (pyproject.toml)

if __name__ == "__main__":
    cli()
