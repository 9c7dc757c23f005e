"""Helpers of the bad-input tests: build broken model folders, run a CLI in a subprocess
under an address-space limit and check that it refused cleanly (one line on stderr, exit 2,
no traceback, no crash signal) and wrote nothing."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np

from conftest import MLM
from train_utils import REPO, env
from ufb_ref.checkpoint import read_safetensors

# Address space a CLI may use on the tiny models of the tests. Loading mlx, numpy and
# tokenizers with one BLAS thread needs under 1 GiB here (measured: convert and ufb_ref.load
# of the golden model both run under a 1000 MiB limit); a limit this low turns "reads a
# claimed 2 GiB tensor" or "tokenises 50 MB" into a failure instead of a slow success.
MEMORY_LIMIT = 1536 * 2**20


def _limit_memory(limit: int, file_size: int | None = None, close_stdin: bool = False):
    def apply():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        if file_size is not None:  # a full disk: writes past the limit fail with EFBIG
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_size, file_size))
        if close_stdin:
            os.close(0)
    return apply


def run_cli(args, *, stdin: bytes | str | None = None, cwd: Path = REPO, memory: int = MEMORY_LIMIT,
            timeout: float = 120, extra_env: dict | None = None, file_size: int | None = None,
            close_stdin: bool = False) -> subprocess.CompletedProcess:
    """``python ARGS...`` (e.g. ["-m", "ufb_mlx.generate", ...] or ["convert.py", ...]) with
    bytes in and out (argv and stdin may hold invalid UTF-8). ``file_size``: no file may
    grow past it (the disk is full); ``close_stdin``: the process starts without fd 0."""
    e = env()
    e.update(extra_env or {})
    cmd = [sys.executable, *[a if isinstance(a, bytes) else str(a) for a in args]]
    if cmd[1] == "convert.py":
        cmd[1] = str(REPO / "convert.py")
    data = stdin.encode() if isinstance(stdin, str) else stdin
    proc = subprocess.run(cmd, cwd=cwd, env=e, input=None if close_stdin else data if data is not None else b"",
                          capture_output=True, timeout=timeout,
                          preexec_fn=_limit_memory(memory, file_size, close_stdin))
    return subprocess.CompletedProcess(proc.args, proc.returncode,
                                       proc.stdout.decode("utf-8", "replace"), proc.stderr.decode("utf-8", "replace"))


def assert_one_line_error(proc, *needles, rc: int | None = 2) -> str:
    """A clean refusal: exit ``rc`` (2 for user errors; None: any non-zero exit that is not
    a signal), exactly one line on stderr starting with "error: ", no traceback."""
    assert proc.returncode > 0, f"exit {proc.returncode} (negative: killed by a signal)\n{proc.stderr[-2000:]}"
    if rc is not None:
        assert proc.returncode == rc, f"exit {proc.returncode}\n{proc.stderr[-2000:]}"
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1, err[-3000:]
    assert err.startswith("error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def tree_state(*roots: Path) -> dict:
    """Every entry under ``roots`` with its size and modification time: equal before and
    after a refused command means it wrote nothing there."""
    state = {}
    for root in roots:
        root = Path(root)
        if not root.exists():
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                p = Path(dirpath) / name
                st = p.lstat()
                state[str(p)] = (st.st_size, st.st_mtime_ns)
    return state


def copy_golden(tmp_path, src=MLM, name="model") -> Path:
    dst = tmp_path / name
    shutil.copytree(src, dst)
    (dst / "cases.npz").unlink()
    return dst


def write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """A minimal writer (the format: u64 header size, JSON header, raw bytes), so the
    tests can build malformed checkpoints that a library would refuse to write."""
    codes = {np.dtype("float32"): "F32", np.dtype("float16"): "F16", np.dtype("int64"): "I64",
             np.dtype("int32"): "I32"}
    header, blobs, offset = {}, [], 0
    for key, arr in tensors.items():
        b = np.ascontiguousarray(arr).tobytes()
        header[key] = {"dtype": codes[arr.dtype], "shape": list(arr.shape), "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def edit_weights(folder: Path, fn) -> None:
    tensors, _ = read_safetensors(folder / "model.safetensors")
    tensors = dict(tensors)
    fn(tensors)
    write_safetensors(folder / "model.safetensors", tensors)


def assert_refused(proc) -> str:
    """A clean refusal of generated command lines: exit 2, no traceback, no crash signal,
    one "error: " line (argparse's complaints too: ufb_ref.errors.ArgumentParser)."""
    assert proc.returncode == 2, f"exit {proc.returncode} (negative: killed by a signal)\n{proc.stderr[-3000:]}"
    err = proc.stderr.strip()
    assert "Traceback" not in err, err[-3000:]
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]
    return lines[-1]
