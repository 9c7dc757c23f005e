"""The corpus builder's atomic writes: its outputs are replaced all together or not at
all, and a package is never left half unpacked under its final name."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


class AtomicOutputs:
    """Write files as temporaries in the output directory; rename all on commit.

    If anything fails before :meth:`commit`, the temporaries are removed and
    existing outputs are left untouched.
    """

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.pending: list[tuple[Path, Path]] = []

    def __enter__(self):
        self.out_dir.mkdir(parents=True, exist_ok=True)
        return self

    def open(self, name: str):
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=self.out_dir)
        self.pending.append((Path(tmp), self.out_dir / name))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(fd, 0o666 & ~umask)  # mkstemp creates 0600; give the usual file mode
        return os.fdopen(fd, "w", encoding="utf-8", newline="\n")

    def commit(self) -> None:
        for tmp, _ in self.pending:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        for tmp, final in self.pending:
            os.replace(tmp, final)
        self.pending = []

    def __exit__(self, exc_type, exc, tb):
        for tmp, _ in self.pending:
            try:
                tmp.unlink()
            except FileNotFoundError:
                pass
        self.pending = []
        return False


def replace_folder(dest: Path, fill: Callable[[Path], None]) -> None:
    """Fill a temporary sibling of ``dest``, then rename it to ``dest`` (replacing what was
    there); if ``fill`` fails, the temporary folder is removed and ``dest`` is untouched."""
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        fill(tmp)
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
