"""Data-parallel training with MLX's distributed layer: 2 processes on localhost (ring
backend, started by mlx.launch) with per-process batch b end with the weights of 1
process with batch 2b, and only rank 0 writes files and logs.

Tolerance: the two runs compute the same sums in a different order (two half-batch
forward/backward passes plus an all-reduce, against one full-batch pass), so float32
rounding differs at ~1e-7; Adam and the FFF routing can amplify that over steps. We require
every weight to agree within 1e-5 absolute and the difference to be under 1e-3 of how far
training moved the weights (measured: ~1e-7 and ~3e-5). Dropout is 0: each process draws
its own dropout masks, which a single process cannot reproduce.
"""

from __future__ import annotations

import numpy as np

from conftest import MLM
from train_utils import keyword_task, load_weights, mlx_launch, read_log, run_module, toy_corpus, write_jsonl


def _launch_ok(proc, out):
    # mlx.launch exits 0 even when a rank fails: check the output, not only the status.
    assert proc.returncode == 0 and "error" not in proc.stderr.lower(), proc.stdout + proc.stderr
    assert (out / "model.safetensors").is_file(), proc.stdout + proc.stderr


def _compare(one, two, start):
    a, b = load_weights(one), load_weights(two)
    assert a.keys() == b.keys()
    for k in a:
        diff = np.abs(a[k] - b[k]).max()
        moved = np.abs(a[k] - start[k]).max() if k in start else np.abs(a[k]).max()
        assert diff <= 1e-5 and diff <= 1e-3 * moved + 1e-9, (k, diff, moved)


def _golden_weights():
    import mlx.utils

    import ufb_mlx

    model, _ = ufb_mlx.load(MLM)
    return {k: np.array(v) for k, v in mlx.utils.tree_flatten(model.parameters())}


def test_two_processes_equal_one_process_with_double_batch_finetune(tmp_path):
    # 41 examples, global batch 8: the last batch holds 1 example, so one process gets none
    # (it contributes a zero-weight row).
    train = write_jsonl(tmp_path / "train.jsonl", keyword_task(41, 0))
    valid = write_jsonl(tmp_path / "valid.jsonl", keyword_task(16, 1))
    common = ["--model", MLM, "--train", train, "--valid", valid, "--lr", "1e-3", "--epochs", "2",
              "--dropout", "0", "--log-every", "2", "--save-every", "4", "--keep", "1"]
    two, one = tmp_path / "two", tmp_path / "one"
    proc = mlx_launch(2, "ufb_mlx.finetune", *common, "--out", two, "--batch-size", "4")
    _launch_ok(proc, two)
    assert "x 2 processes" in proc.stdout
    # Only rank 0 prints: each progress line appears once.
    assert proc.stdout.count("step 2/12") == 1 and proc.stdout.count("eval epoch 1") == 1
    assert [r["step"] for r in read_log(two) if r["event"] == "train"] == [2, 4, 6, 8, 10, 12]
    run_module("ufb_mlx.finetune", *common, "--out", one, "--batch-size", "8")
    _compare(one / "checkpoints/step-00000012/model.safetensors",
             two / "checkpoints/step-00000012/model.safetensors", _golden_weights())
    losses_1 = [r["loss"] for r in read_log(one) if r["event"] == "train"]
    losses_2 = [r["loss"] for r in read_log(two) if r["event"] == "train"]
    assert np.allclose(losses_1, losses_2, rtol=1e-4), (losses_1, losses_2)


def test_two_processes_equal_one_process_with_double_batch_pretrain(tmp_path):
    corpus = toy_corpus(tmp_path / "c.txt", 600, 0)
    common = ["--corpus", corpus, "--config", "tiny", "--seq-length", "32", "--vocab-size", "150",
              "--steps", "10", "--eval-every", "5", "--save-every", "5", "--log-every", "5"]
    two, one = tmp_path / "two", tmp_path / "one"
    # The 2-process run trains the tokenizer on rank 0 and sends it to rank 1.
    proc = mlx_launch(2, "ufb_mlx.pretrain", *common, "--out", two, "--batch-size", "4")
    _launch_ok(proc, two)
    run_module("ufb_mlx.pretrain", *common, "--out", one, "--batch-size", "8", "--tokenizer", two)
    start = {}  # from scratch: compare against the size of the weights instead
    _compare(one / "model.safetensors", two / "model.safetensors", start)
    ev1 = [r["mlm_loss"] for r in read_log(one) if r["event"] == "eval"]
    ev2 = [r["mlm_loss"] for r in read_log(two) if r["event"] == "eval"]
    assert np.allclose(ev1, ev2, rtol=1e-4)


WORLD_CHECK = """
import sys
import numpy as np
import ufb_mlx.train as train

world = train.World()
assert world.size == 2
# Integers above 2**24 (float32's exact range) sum exactly.
big = np.array([2**40 + world.rank, 2**24 + 1], dtype=np.int64)
assert world.sum(big).tolist() == [2**41 + 1, 2**25 + 2], world.sum(big)
# A text of an odd number of bytes above 2**24 (which float32 cannot count exactly), with
# multi-byte characters, arrives intact.
want = "\u00e9t\u00e9 \U0001F431 " * 1_600_000 + "."
got = world.broadcast_text(want if world.main else None)
assert len(got.encode()) > 2**24 and len(got.encode()) % 2 == 1 and got == want
print(f"rank {world.rank} ok", flush=True)
"""


def test_world_sums_integers_exactly_and_broadcasts_long_text(tmp_path):
    script = tmp_path / "world_check.py"
    script.write_text(WORLD_CHECK)
    proc = mlx_launch(2, str(script))
    assert proc.returncode == 0 and proc.stdout.count(" ok") == 2, proc.stdout + proc.stderr
