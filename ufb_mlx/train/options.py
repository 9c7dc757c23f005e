"""The run options fine-tuning and pretraining share: their arguments, their validation
(before anything is written) and the fingerprint that ``--resume`` compares."""

from __future__ import annotations

import json

import numpy as np

from ufb_ref.errors import UFBError


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

