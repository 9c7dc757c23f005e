"""Safe writes to the file system, for every writer of the project: nothing the user had is
lost or left half-written, whatever kills the process and whenever.

- ``atomic_write_text`` / ``atomic_write_bytes`` / ``atomic_file``: a file is written under a
  temporary name beside it, flushed to disk, then renamed over the target (a reader sees
  the old file or the new one, never a part).
- ``atomic_folder``: a folder is filled under a temporary sibling name
  (``.NAME.tmp-PID-XXXX``), then renamed into place; a replaced folder is first renamed
  aside (``.NAME.old-PID-XXXX``) and removed only after the new one is in place.
  ``clean_stale_temporaries`` removes what a killed writer left (its process is gone).
- ``folder_lock``: an advisory lock (fcntl.flock) held by the one process that writes a
  folder; a second one gets a one-line error instead of silently losing one of the two
  results. The lock file is a hidden sibling ``.NAME.lock`` that exists only while the
  lock is held: its holder removes it before letting go, and a process that locked a file
  which has meanwhile been removed or replaced lets go and tries again, so that two
  processes never both hold "the" lock.
- Model folders are marked: ``MARKER`` inside lists the files the project wrote, so that
  ``check_replaceable`` can tell a folder that ``--force`` may replace (a model folder of
  ours, nothing else in it) from anything else.

Errors are UFBErrors naming the path; OSErrors of the file system (read-only, disk full)
become one line too.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from .errors import UFBError

MARKER = ".ultrafastbert.json"
_TEMP = re.compile(r"\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)-[0-9a-f]{8}(?:\.[A-Za-z0-9]+)?$")


def describe_os_error(e: OSError) -> str:
    """One line for an OSError: what failed on which path."""
    where = f" '{e.filename}'" if getattr(e, "filename", None) else ""
    what = e.strerror or (str(e).splitlines() or [""])[0] or type(e).__name__
    return f"{what}{where}"


def fsync(path: Path) -> None:
    """Flush a file or a folder (the rename of an entry lives in its folder) to disk;
    best effort: some file systems refuse fsync on folders."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temp_name(path: Path, kind: str) -> Path:
    # The suffix is kept: some writers (mx.save_safetensors) add theirs when it is missing.
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}{path.suffix}")


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """``with atomic_file(p) as tmp: write(tmp)``: ``tmp`` replaces ``p`` when the block
    ends without an exception, and is removed otherwise."""
    path = Path(path)
    tmp = _temp_name(path, "tmp")
    try:
        yield tmp
        fsync(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise UFBError(f"cannot write '{path}': {describe_os_error(e)}") from e
    finally:
        if tmp.exists():
            tmp.unlink(missing_ok=True)
    fsync(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def clean_stale_temporaries(target: str | os.PathLike) -> list[Path]:
    """Remove the temporary files and folders that writers of ``target`` killed before
    they finished left beside it (``.NAME.tmp-PID-*``, ``.NAME.old-PID-*``). A temporary
    whose process still runs is kept (a reused PID only delays the clean-up). A replace
    killed between its two renames left ``target`` missing and the previous version as
    ``.NAME.old-PID-*``: that is put back (``recover_replaced``), never removed. Returns
    what was removed."""
    target = Path(target)
    removed = []
    if not target.parent.is_dir():
        return removed
    recover_replaced(target)
    for p in target.parent.iterdir():
        m = _TEMP.match(p.name)
        if not m or m.group("name") != target.name or _pid_alive(int(m.group("pid"))):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def recover_replaced(target: str | os.PathLike) -> Path | None:
    """When ``target`` is missing but a dead writer's ``.NAME.old-PID-*`` (what
    ``atomic_folder(replace=True)`` renames the previous version to) is there, rename it
    back to ``target``; returns the restored path (None: nothing to recover)."""
    target = Path(target)
    if target.exists() or target.is_symlink() or not target.parent.is_dir():
        return None
    olds = []
    for p in target.parent.iterdir():
        m = _TEMP.match(p.name)
        if m and m.group("name") == target.name and ".old-" in p.name and not _pid_alive(int(m.group("pid"))):
            olds.append(p)
    if not olds:
        return None
    newest = max(olds, key=lambda p: p.lstat().st_mtime_ns)  # the version renamed aside last
    try:
        os.rename(newest, target)
    except OSError as e:
        if target.exists():  # another process of the same run restored it first
            return None
        raise UFBError(f"cannot restore '{target}' from '{newest.name}': {describe_os_error(e)}") from e
    fsync(target.parent)
    return target


@contextmanager
def atomic_folder(dest: str | os.PathLike, replace: bool = False, mark: bool = False) -> Iterator[Path]:
    """``with atomic_folder(d) as tmp: fill(tmp)``: ``tmp`` (a new sibling folder) becomes
    ``d`` when the block ends without an exception and is removed otherwise. An existing
    ``d`` is an error unless ``replace`` (the caller has judged it replaceable, e.g. with
    ``check_replaceable``). ``mark``: write ``MARKER`` listing the folder's files, so that
    a later ``--force`` knows the folder as the project's own."""
    dest = Path(dest)
    tmp = _temp_name(dest, "tmp")
    old = None
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        recover_replaced(dest)  # a replace killed between its renames: the previous version first
        tmp.mkdir()
        yield tmp
        if mark:
            files = sorted(p.name for p in tmp.iterdir())
            (tmp / MARKER).write_text(json.dumps({"written_by": "ultrafastbert-mlx", "kind": "model",
                                                  "files": files}, indent=2) + "\n")
        for p in tmp.iterdir():
            fsync(p)
        fsync(tmp)
        if dest.exists() or dest.is_symlink():
            if not replace:
                raise UFBError(f"'{dest}' exists")
            old = _temp_name(dest, "old")
            os.rename(dest, old)
        os.rename(tmp, dest)
        fsync(dest.parent)
    except OSError as e:
        if old is not None and not dest.exists():  # put the old folder back
            os.rename(old, dest)
            old = None
        raise UFBError(f"cannot write '{dest}': {describe_os_error(e)}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _inside(a: Path, b: Path) -> bool:
    """a is b or lies under b (both resolved)."""
    return a == b or b in a.parents


def check_replaceable(dest: str | os.PathLike, inputs: Iterable[str | os.PathLike] = ()) -> None:
    """Raise a one-line UFBError unless ``dest`` may be replaced by a new model folder:
    it must be a real folder (not a file or a symlink), not the current folder or one above
    it, neither inside nor around any of ``inputs``, and either empty or a folder that the
    project wrote (``MARKER``: a converted model, or a training run whose marker also lists
    its checkpoints folder) holding nothing but the entries the marker lists."""
    dest = Path(dest)
    if dest.is_symlink():
        raise UFBError(f"--force: '{dest}' is a symlink; refusing to replace it (remove it yourself)")
    if not dest.exists():
        return
    if not dest.is_dir():
        raise UFBError(f"--force: '{dest}' is a file, not a model folder; refusing to replace it")
    real = dest.resolve()
    cwd = Path.cwd().resolve()
    if _inside(cwd, real):
        raise UFBError(f"--force: '{dest}' is the current folder or holds it; refusing to replace it")
    for src in inputs:
        src = Path(src).resolve()
        if _inside(src, real) or _inside(real, src):
            raise UFBError(f"--force: '{dest}' overlaps the input '{src}'; write the output elsewhere")
    entries = sorted(p.name for p in dest.iterdir())
    if not entries:
        return
    listed = marked_files(dest)
    if not isinstance(listed, list):
        if (dest / "checkpoints").is_dir() and "log.jsonl" in entries:  # what ufb_mlx.train writes
            raise UFBError(f"--force: '{dest}' holds a training run (ufb-finetune or ufb-pretrain: log.jsonl, "
                           f"checkpoints/) without this project's marker ({MARKER}), not a converted model; "
                           "refusing to replace it (choose another output folder, or remove it yourself)")
        raise UFBError(f"--force: '{dest}' is not a model folder written by this project (no {MARKER}); "
                       "refusing to replace it (remove it yourself)")
    unknown = [e for e in entries if not listed_entry(e, listed)]
    if unknown:
        raise UFBError(f"--force: '{dest}' holds files this project did not write ('{unknown[0]}'); "
                       "refusing to replace it")
    for e in entries:
        p = dest / e
        if p.is_symlink() or not (p.is_file() or p.is_dir()):
            raise UFBError(f"--force: '{p}' is not a plain file or folder; refusing to replace '{dest}'")


def listed_entry(name: str, listed: list) -> bool:
    """``name`` is the marker, an entry it lists, or a writer's temporary of one."""
    m = _TEMP.match(name)
    return name == MARKER or name in listed or bool(m and m.group("name") in listed)


def marked_files(folder: str | os.PathLike) -> list | None:
    """The entries that ``folder``'s ``MARKER`` says the project wrote (None: no readable marker)."""
    folder = Path(folder)
    listed = None
    if (folder / MARKER).is_file() and not (folder / MARKER).is_symlink():
        try:
            listed = json.loads((folder / MARKER).read_text()).get("files")
        except (OSError, ValueError, RecursionError, AttributeError):
            listed = None
    if not isinstance(listed, list) or not all(isinstance(e, str) for e in listed):
        return None
    return listed


@contextmanager
def folder_lock(folder: str | os.PathLike) -> Iterator[None]:
    """Hold the advisory write lock of ``folder`` (a hidden sibling ``.NAME.lock`` of the
    resolved path, symlinks followed, removed when the block ends) for the block; a
    UFBError at once if another process holds it."""
    # The resolved path: a run on a folder and one on a symlink to it share one lock.
    try:
        folder = Path(folder).resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop
        raise UFBError(f"cannot lock '{folder}': {e}") from e
    if not folder.name:
        raise UFBError(f"cannot write '{folder}': the root folder is not an output folder")
    lock_path = folder.with_name(f".{folder.name}.lock")
    above = next((p for p in folder.parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise UFBError(f"cannot write '{folder}': '{above}' is a file, not a folder")
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        fd = _lock_file(lock_path)
    except OSError as e:
        raise UFBError(f"cannot lock '{folder}': {describe_os_error(e)}") from e
    if fd is None:
        raise UFBError(f"'{folder}' is being written by another process (lock {lock_path.name} is held); "
                       "wait for it to finish or choose another output")
    try:
        yield
    finally:
        # Removed while still locked: whoever opened this file meanwhile finds, once it
        # gets the lock, that the name no longer leads to it, and starts again.
        try:
            lock_path.unlink(missing_ok=True)
        finally:
            os.close(fd)


def _lock_file(path: Path) -> int | None:
    """An open descriptor of ``path`` holding its exclusive flock, or None when another
    process holds it. filelock (which the project used before) keeps lock files forever by
    design; removing them safely needs the check of the locked file's identity below."""
    import fcntl

    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):  # EACCES: some file systems
                return None
            raise
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        if current is not None and os.path.samestat(current, os.fstat(fd)):
            return fd
        os.close(fd)  # its holder removed it between our open and our lock
