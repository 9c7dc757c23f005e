"""A run's progress: printed by rank 0 (a bar on a terminal) and appended to OUT/log.jsonl."""

from __future__ import annotations

import datetime
import json
import math
import sys
import time
from pathlib import Path

import mlx.core as mx

from ufb_ref.fsio import atomic_write_text

from ..progress import Progress
from ..jsonable import clean_tree
from .world import World


LOG_FILE = "log.jsonl"


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

