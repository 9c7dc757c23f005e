"""Progress of long work, the same way in every tool, with tqdm: on a terminal a bar with
the rate and the time left; otherwise (a log file, a pipe) plain lines with the same
figures, at most one every ``interval`` seconds, so that a log stays readable.

    with Progress(len(prompts), "fill-mask", unit="prompt") as progress:
        for batch in ...:
            progress.update(len(batch))
"""

from __future__ import annotations

import sys
import time

from tqdm import tqdm


class Progress:
    """``total`` units of work, ``initial`` of them already done (a resumed run).
    ``enabled`` False shows nothing; ``interval`` None prints no periodic plain lines (the
    caller prints its own, with ``meter()`` in them)."""

    def __init__(self, total: int, desc: str, unit: str = "it", file=None, initial: int = 0,
                 enabled: bool = True, interval: float | None = 10.0):
        self.file = file if file is not None else sys.stderr
        self.total, self.desc, self.unit = total, desc, unit
        self.n = self._first = initial
        self.enabled, self.interval = enabled, interval
        self.tty = enabled and hasattr(self.file, "isatty") and self.file.isatty()
        self._t0 = self._last = time.monotonic()
        self._bar = (tqdm(total=total, initial=initial, desc=desc, unit=unit, file=self.file,
                          dynamic_ncols=True, leave=False) if self.tty else None)
        self._figures = None  # a status line under the bar, made by the first figures

    def update(self, n: int = 1, **figures) -> None:
        """``n`` more units done; ``figures`` (e.g. loss=...) shown on a line of their own
        under the bar (beside it, they would squeeze the bar and be cut at 80 columns)."""
        self.n += n
        if self._bar is not None:
            if figures:
                if self._figures is None:
                    self._figures = tqdm(total=0, bar_format="{desc}", position=1, file=self.file,
                                         dynamic_ncols=True, leave=False)
                self._figures.set_description_str("  " + " | ".join(f"{k} {v}" for k, v in figures.items()),
                                                  refresh=True)
            if n:
                self._bar.update(n)
        elif self.enabled and self.interval is not None and time.monotonic() - self._last >= self.interval:
            self.write(f"{self.desc}: {self.n}/{self.total} {self.unit}s, {self.meter()}")

    def set_total(self, total: int) -> None:
        """The amount of work, once it is known (e.g. after a warm-up that sizes it)."""
        self.total = total
        if self._bar is not None:
            self._bar.total = total
            self._bar.refresh()

    def meter(self) -> str:
        """'0:42 elapsed, 1:10 left, 3.2 steps/s' (what a bar shows, for a plain line)."""
        elapsed = time.monotonic() - self._t0
        rate = (self.n - self._first) / elapsed if elapsed > 0 else 0.0
        left = tqdm.format_interval((self.total - self.n) / rate) if rate > 0 else "?"
        return f"{tqdm.format_interval(elapsed)} elapsed, {left} left, {rate:.3g} {self.unit}s/s"

    def write(self, line: str) -> None:
        """A line of its own (above the bar on a terminal)."""
        if not self.enabled:
            return
        self._last = time.monotonic()
        if self._bar is not None:
            self._bar.write(line, file=self.file)
        else:
            print(line, file=self.file, flush=True)

    def close(self) -> None:
        if self._figures is not None:
            self._figures.close()
            self._figures = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
