"""Atomic checkpoints (weights, optimizer state, trainer state) and resuming from them."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from ufb_ref import fsio
from ufb_ref.checkpoint import WEIGHTS_FILE, SafetensorsFile
from ufb_ref.errors import UFBError

from ..loading import save_safetensors
from ..jsonable import clean_tree


CHECKPOINTS = "checkpoints"


STATE_FILE = "trainer_state.json"


OPTIMIZER_FILE = "optimizer.safetensors"


_CKPT = re.compile(r"step-(\d{8,})$")


_CKPT_TEMP = re.compile(r"\.(step-\d{8,})\.(?:tmp|old)-")  # ufb_ref.fsio's temporary names


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


def recover_checkpoints(out: Path) -> None:
    """Put back a checkpoint whose replacement (a resumed run saving the same step again)
    was killed between its two renames (ufb_ref.fsio.recover_replaced)."""
    root = Path(out) / CHECKPOINTS
    if root.is_dir():
        for name in sorted({m.group(1) for p in root.iterdir() if (m := _CKPT_TEMP.match(p.name))}):
            fsio.recover_replaced(root / name)

