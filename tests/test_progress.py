"""Progress of long work: a tqdm bar with rate and time left on a terminal, plain lines
with the same figures otherwise; timestamps in log.jsonl; Ctrl-C of a training run says how
to continue it."""

from __future__ import annotations

import datetime
import fcntl
import io
import os
import pty
import signal
import struct
import subprocess
import sys
import termios

import pytest

from conftest import MLM, REPO
from train_utils import ctrl_c_as_in_a_terminal, env, keyword_task, read_log, read_terminal, write_jsonl
from ufb_mlx.progress import Progress


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_bar_on_a_terminal():
    out = Terminal()
    with Progress(10, "fill-mask", "prompt", file=out) as p:
        for _ in range(10):
            p.update(1)
        p.write("a line above the bar")
    text = out.getvalue()
    assert "\r" in text and "fill-mask" in text and "10/10" in text and "prompt/s" in text
    assert "a line above the bar" in text
    assert "<" in text  # tqdm's "[elapsed<left, rate]"


def test_plain_lines_elsewhere():
    out = io.StringIO()
    with Progress(4, "tokenising", "line", file=out, interval=0) as p:
        for _ in range(4):
            p.update(1)
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and len(lines) == 4
    assert lines[-1].startswith("tokenising: 4/4 lines, ") and "elapsed" in lines[-1] and "left" in lines[-1]
    assert "lines/s" in lines[-1]
    # Short work prints nothing between the default 10-second lines.
    quiet = io.StringIO()
    with Progress(4, "x", file=quiet) as p:
        p.update(4)
    assert quiet.getvalue() == ""


def _finetune_args(tmp_path, *extra):
    train = write_jsonl(tmp_path / "t.jsonl", keyword_task(64, 0))
    return [sys.executable, "-m", "ufb_mlx.finetune", "--model", str(MLM), "--train", str(train),
            "--out", str(tmp_path / "out"), "--epochs", "2", "--batch-size", "8", "--log-every", "2", *extra]


def test_training_shows_a_bar_on_a_terminal(tmp_path):
    """At 80 columns the bar keeps its width and its figures: loss, learning rate and
    tokens/s go on a line of their own under it."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))  # an 80-column terminal
    proc = subprocess.Popen(_finetune_args(tmp_path), cwd=REPO, env=env(), stdout=follower, stderr=follower)
    os.close(follower)
    text = read_terminal(leader)
    assert proc.wait(timeout=120) == 0
    assert "training:" in text and "16/16" in text and "step/s" in text
    assert "step 16/16 |" not in text  # no plain progress lines on a terminal
    screen_lines = [ln.rstrip("\r").split("\r")[-1] for ln in text.replace("\x1b[A", "\n").split("\n")]
    bars = [ln for ln in screen_lines if ln.startswith("training:") and "/16 [" in ln]
    # nothing cut off the end: the rate closes the line (s/step while a step takes over a second)
    assert bars and all(len(ln) <= 80 and ln.rstrip().endswith(("step/s]", "s/step]")) for ln in bars), bars
    assert all(len(ln.split("|")[1]) >= 20 for ln in bars), bars  # the bar itself keeps its width
    figures = [ln for ln in screen_lines if ln.startswith("  loss ")]
    assert figures and all(len(ln) <= 80 and " | lr " in ln and " tok/s " in ln for ln in figures), figures


def test_plain_lines_and_timestamps_when_not_a_terminal(tmp_path):
    proc = subprocess.run(_finetune_args(tmp_path), cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("step ")]
    assert len(lines) == 8 and all(" elapsed, " in ln and " left, " in ln and "steps/s" in ln for ln in lines)
    assert proc.stdout.splitlines()[0].startswith("loading ")  # something is said before the slow part
    log = read_log(tmp_path / "out")
    elapsed = [r["elapsed_s"] for r in log]
    assert elapsed == sorted(elapsed) and all(e >= 0 for e in elapsed)
    for r in log:
        stamp = datetime.datetime.fromisoformat(r["time"])
        assert stamp.tzinfo is not None and abs(datetime.datetime.now(datetime.timezone.utc) - stamp).total_seconds() < 600


def test_ctrl_c_saves_a_checkpoint_where_the_run_stands(tmp_path):
    """Ctrl-C (a real SIGINT) before the first --save-every checkpoint: the step under way
    finishes, a checkpoint of it is saved, and the message says --resume (not --force)."""
    proc = subprocess.Popen(_finetune_args(tmp_path, "--save-every", "100", "--log-every", "1"), cwd=REPO,
                            env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=ctrl_c_as_in_a_terminal)
    try:
        for line in proc.stdout:
            if line.startswith("step 2/16"):
                proc.send_signal(signal.SIGINT)
                break
        rest, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    ckpts = sorted((tmp_path / "out" / "checkpoints").iterdir())
    assert len(ckpts) == 1 and (ckpts[0] / "trainer_state.json").is_file()
    step = int(ckpts[0].name.split("-")[1])
    assert 2 <= step < 16 and f"Ctrl-C: saving a checkpoint at step {step}" in rest
    assert err.startswith(f"interrupted: at step {step}, saved in ") and err.count("\n") == 1, err
    assert "run the same command with --resume" in err and "--force" not in err
    # the checkpoint is a complete one: --resume takes it and finishes the run
    resumed = subprocess.run(_finetune_args(tmp_path, "--resume"), cwd=REPO, env=env(), capture_output=True,
                             text=True, timeout=120)
    assert resumed.returncode == 0 and f"(step {step}/16)" in resumed.stdout, resumed.stderr
    # finished: the model stays, the checkpoints go (--keep 0, the default)
    assert (tmp_path / "out" / "model.safetensors").is_file() and not (tmp_path / "out" / "checkpoints").exists()


def test_a_second_ctrl_c_stops_at_once():
    from ufb_mlx.train import StopRequest

    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
    try:
        with StopRequest() as stop:
            assert signal.getsignal(signal.SIGINT) == stop._handler
            stop._handler(signal.SIGINT, None)
            assert stop.requested
            with pytest.raises(KeyboardInterrupt):
                stop._handler(signal.SIGINT, None)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a background job ignores Ctrl-C: it still does
        with StopRequest():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


def test_interrupt_says_how_to_continue(tmp_path):
    """Ctrl-C while the checkpoint of that very step is written: none is written twice."""
    proc = subprocess.Popen(_finetune_args(tmp_path, "--save-every", "4"), cwd=REPO, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=ctrl_c_as_in_a_terminal)
    try:
        for line in proc.stdout:
            if line.startswith("checkpoint step 4"):
                proc.send_signal(signal.SIGINT)
                break
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert err.startswith("interrupted: at step ") and "--resume" in err and err.count("\n") == 1, err
