"""The output folder of a run: what may be written there, its lock, and the memory a run
needs (checked before anything is written)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
from pathlib import Path


from ufb_ref import fsio
from ufb_ref.checkpoint import CONFIG_FILE, TOKENIZER_FILES, WEIGHTS_FILE, expected_shapes
from ufb_ref.config import ModelArgs
from ufb_ref.errors import UFBError

from .checkpoints import CHECKPOINTS, _CKPT_TEMP, list_checkpoints, recover_checkpoints, restore_checkpoint
from .options import check_resume
from .runlog import LOG_FILE
from .world import World


# Files a run writes into its output folder (what --force may remove).
RUN_FILES = (CONFIG_FILE, WEIGHTS_FILE, LOG_FILE, "train_results.json", *TOKENIZER_FILES)


# What a run's marker (ufb_ref.fsio.MARKER) lists: --force replaces a folder holding only these.
RUN_ENTRIES = (*RUN_FILES, CHECKPOINTS)


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


@contextlib.contextmanager
def tool_run(parser, argv, check_args):
    """The opening that fine-tuning and pretraining share: parse and validate the options
    (before anything is written), join the data-parallel processes and check --out's path.
    Yields (options, world, out, held): ``held`` is an ExitStack that keeps what is
    entered into it (the output folder's lock) until the run ends."""
    a = parser.parse_args(argv)
    check_args(a)
    world = World()
    check_out_path(a.out)
    with contextlib.ExitStack() as held:
        yield a, world, Path(a.out), held
