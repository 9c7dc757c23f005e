"""Helpers of the training tests: small synthetic data sets (made by the tests, no
network), running the CLIs in subprocesses, comparing saved weights."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

# Whole words of the golden tokenizer's vocabulary (ufb-tiny-*: 899 WordPiece tokens).
KEYS_POS = ["river", "bread", "book", "music"]
KEYS_NEG = ["water", "library", "farm", "station"]
FILLER = ["the", "and", "was", "people", "small", "morning", "window", "day", "old", "new", "students",
          "quiet", "open", "weather", "house", "dog", "park", "sun", "town", "car", "hill", "door"]


def keyword_task(n: int, seed: int) -> list[dict]:
    """Label "pos" or "neg" by a keyword at a random position among filler words."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        y = rng.random() < 0.5
        words = [rng.choice(FILLER) for _ in range(rng.randint(3, 9))]
        words.insert(rng.randint(0, len(words)), rng.choice(KEYS_POS if y else KEYS_NEG))
        rows.append({"text": " ".join(words), "label": "pos" if y else "neg"})
    return rows


def count_task(n: int, seed: int) -> list[dict]:
    """Regression on pairs: the label is the number of 'river' in text and text_pair."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        parts = []
        for _ in range(2):
            w = [rng.choice(FILLER) for _ in range(rng.randint(2, 5))]
            for _ in range(rng.randint(0, 2)):
                w.insert(rng.randint(0, len(w)), "river")
            parts.append(w)
        rows.append({"text": " ".join(parts[0]), "text_pair": " ".join(parts[1]),
                     "label": float(parts[0].count("river") + parts[1].count("river"))})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> Path:
    import csv

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for r in rows:
            w.writerow([r[c] for c in columns])
    return path


def toy_corpus(path: Path, lines: int, seed: int) -> Path:
    """A small regular language: 'NAME VERB OBJECT PLACE .' sentences, so that a tiny
    model can learn to fill masks within a few dozen steps."""
    rng = random.Random(seed)
    names = ["anna", "bob", "carl", "dora", "emil", "fay", "gus", "hana"]
    verbs = ["sees", "likes", "helps", "calls", "paints"]
    objs = ["the red ball", "the blue car", "a small dog", "a green tree", "the old house", "a yellow kite"]
    places = ["in the park", "at home", "near the river", "in the town", "on the hill"]
    path.write_text("".join(f"{rng.choice(names)} {rng.choice(verbs)} {rng.choice(objs)} {rng.choice(places)} .\n"
                            for _ in range(lines)))
    return path


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    e.setdefault("OMP_NUM_THREADS", "1")
    e.setdefault("OPENBLAS_NUM_THREADS", "1")
    return e


def run_module(module: str, *args, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def free_port() -> int:
    """A port with a free successor (the ring backend listens on port + rank)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < 65000:
            try:
                with socket.socket() as s2:
                    s2.bind(("127.0.0.1", port + 1))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port pair")


def mlx_launch(n: int, module: str, *args, timeout: float = 180) -> subprocess.CompletedProcess:
    """``mlx.launch --backend ring -n N python -m MODULE ...`` on localhost (``python
    SCRIPT ...`` when ``module`` is the path of a .py file)."""
    launcher = Path(sys.executable).with_name("mlx.launch")
    target = [module] if module.endswith(".py") else ["-m", module]
    cmd = [str(launcher) if launcher.exists() else "mlx.launch", "--backend", "ring", "-n", str(n),
           "-p", str(free_port()), sys.executable, *target, *map(str, args)]
    # mlx.launch leaves its host and port files in the temporary folder: give it one that goes
    with tempfile.TemporaryDirectory(prefix="ufb-launch-") as tmp:
        return subprocess.run(cmd, cwd=REPO, env={**env(), "TMPDIR": tmp}, capture_output=True, text=True,
                              timeout=timeout)


def load_weights(path: Path) -> dict[str, np.ndarray]:
    import mlx.core as mx

    return {k: np.array(v) for k, v in mx.load(str(path)).items()}


def read_log(out: Path) -> list[dict]:
    p = Path(out) / "log.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def ctrl_c_as_in_a_terminal() -> None:
    """For a child process: SIGINT at its default, as a command typed in a terminal has it
    (a test suite run in the background ignores SIGINT, and children inherit that)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_killed_after(module: str, args, marker: str, timeout: float = 60, sig: int = signal.SIGKILL,
                     extra_env: dict | None = None) -> tuple[str, str]:
    """Run ``python -m module args`` and send it ``sig`` (SIGKILL: a crash at the worst
    moment; SIGINT: Ctrl-C) as soon as it prints a line starting with ``marker`` (e.g.
    "checkpoint step 10"); returns the rest of its stdout and its stderr."""
    cmd = [sys.executable, "-m", module, *map(str, args)]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**env(), **(extra_env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=ctrl_c_as_in_a_terminal)
    try:
        for line in proc.stdout:
            if line.startswith(marker):
                proc.send_signal(sig)
                break
        out, err = proc.communicate(timeout=timeout)
    finally:
        proc.kill()
    expected = -signal.SIGKILL if sig == signal.SIGKILL else 130
    assert proc.returncode == expected, f"{module} did not stop at '{marker}' ({proc.returncode}): {err}"
    return out, err


def read_terminal(leader: int, timeout: float = 120) -> str:
    """Everything written to a pseudo-terminal until its child closes it (or nothing comes
    for ``timeout`` seconds), decoded."""
    import os
    import select

    chunks = []
    while select.select([leader], [], [], timeout)[0]:
        try:
            data = os.read(leader, 4096)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks).decode(errors="replace")
