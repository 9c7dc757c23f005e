"""The reproducers of issue 10 for the training and inference CLIs: concurrent runs on one
--out, resuming after a kill that cut the log short or broke the newest checkpoint,
non-finite losses, hostile labels, generate's extreme options and undecodable input,
file-system faults, impossible pretraining configs. Each ends in one line and exit 2 (or
in a correct result), never in a traceback, a crash or lost files."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import MLM
from refusals import assert_one_line_error, run_cli, tree_state
from train_utils import keyword_task, load_weights, read_log, write_jsonl
from ufb_mlx.entry import errors_to_exit
from ufb_ref import fsio
from ufb_ref.errors import UFBError


def finetune(*args, **kw):
    return run_cli(["-m", "ufb_mlx.finetune", *args], **kw)


def generate(*args, **kw):
    return run_cli(["-m", "ufb_mlx.generate", "--model", MLM, *args], **kw)


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", keyword_task(32, 0))


# ---------------------------------------------------------------------------- concurrent runs


def test_a_second_run_on_the_same_out_is_refused(train_file, tmp_path):
    """While one process writes OUT (it holds OUT's lock), a second run with --force gets one
    line and exit 2 and touches nothing; before, both exited 0 and one result was lost."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "log.jsonl").write_text('{"event": "start", "step": 0}\n')
    (out / fsio.MARKER).write_text(json.dumps({"written_by": "ultrafastbert-mlx", "kind": "run", "files": ["log.jsonl"]}))
    with fsio.folder_lock(out):
        before = tree_state(tmp_path)
        proc = finetune("--model", MLM, "--train", train_file, "--out", out, "--force", "--epochs", "1")
        after = tree_state(tmp_path)
    assert_one_line_error(proc, "being written by another process")
    assert after == before
    assert not (tmp_path / ".out.lock").exists()  # the holder's lock file went with its lock


# ---------------------------------------------------------------------------- resume


def _run_args(train, out):
    return ["--model", MLM, "--train", train, "--out", out, "--lr", "1e-3", "--epochs", "2", "--batch-size", "8",
            "--save-every", "4", "--keep", "2", "--log-every", "1"]


def test_resume_after_a_partial_log_line_and_a_corrupt_newest_checkpoint(train_file, tmp_path):
    """A run of 8 steps keeps checkpoints 4 and 8. Its copy gets what a kill during the
    last checkpoint can leave: a log line cut short and a truncated newest checkpoint.
    --resume warns, falls back to step 4 and ends with the reference's weights, bit for bit."""
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    assert finetune(*_run_args(train_file, ref)).returncode == 0
    shutil.copytree(ref, cut)
    newest = cut / "checkpoints" / "step-00000008" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    with open(cut / "log.jsonl", "a") as f:
        f.write('{"event": "train", "step": 9, "lo')
    proc = finetune(*_run_args(train_file, cut), "--resume")
    assert proc.returncode == 0, proc.stderr
    assert "step-00000008" in proc.stderr and "resuming from the older step-00000004" in proc.stderr
    assert "resuming from" in proc.stdout and "step-00000004" in proc.stdout
    for name in ("model.safetensors", "optimizer.safetensors"):
        a = load_weights(ref / "checkpoints" / "step-00000008" / name)
        b = load_weights(cut / "checkpoints" / "step-00000008" / name)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), name
    steps = [r["step"] for r in read_log(cut) if r["event"] == "train"]
    assert steps == list(range(1, 9))
    json.loads("[" + ",".join((cut / "log.jsonl").read_text().splitlines()) + "]")  # every line whole


def test_resume_with_no_readable_checkpoint_is_one_line(train_file, tmp_path):
    out = tmp_path / "out"
    assert finetune(*_run_args(train_file, out)).returncode == 0
    for p in (out / "checkpoints").glob("*/model.safetensors"):
        p.write_bytes(b"broken")
    assert_one_line_error(finetune(*_run_args(train_file, out), "--resume"), "no readable checkpoint")


# ---------------------------------------------------------------------------- non-finite loss


def test_nonfinite_loss_stops_training_and_keeps_the_last_checkpoint(train_file, tmp_path):
    """--lr 1e30: step 1 is finite (and checkpointed), step 2's loss is NaN."""
    out = tmp_path / "out"
    proc = finetune("--model", MLM, "--train", train_file, "--out", out, "--lr", "1e30", "--epochs", "2",
                    "--batch-size", "8", "--save-every", "1")
    assert_one_line_error(proc, "step 2: the loss is nan", "nothing of this step is saved",
                          "the last checkpoint (step 1) is kept")  # (no model: no --valid, no epoch end)
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["step-00000001"]
    weights = load_weights(out / "checkpoints" / "step-00000001" / "model.safetensors")
    assert all(np.isfinite(v).all() for v in weights.values())


# ---------------------------------------------------------------------------- labels


@pytest.mark.parametrize("name,content,extra,needle", [
    ("big.jsonl", '{"text": "a b", "label": 1}\n{"text": "c d", "label": ' + "7" * 5001 + "}\n", [],
     "big.jsonl:2: not valid JSON"),
    ("huge.jsonl", '{"text": "a b", "label": 1}\n{"text": "c d", "label": 1' + "0" * 400 + "}\n",
     ["--task", "regression"], "huge.jsonl:2: label 1000000000000000000000000000000000000... is not a finite float32"),
    ("f32.jsonl", '{"text": "a b", "label": 1}\n{"text": "c d", "label": 1e39}\n', ["--task", "regression"],
     "f32.jsonl:2: label 1e+39 is not a finite float32 number"),
    ("deep.jsonl", '{"text": "a b", "label": 1}\n' + "[" * 100_000 + "]" * 100_000 + "\n", [],
     "deep.jsonl:2: not valid JSON (nested too deeply)"),
    ("deeplabel.jsonl", '{"text": "a b", "label": ' + "[" * 100_000 + "]" * 100_000 + "}\n", [],
     "deeplabel.jsonl:1: not valid JSON (nested too deeply)"),
    ("dup.csv", "text,label,label\na b,1,0\nc d,0,1\n", [], "dup.csv:1: column 'label' appears more than once"),
    ("long.csv", "text,label\na b," + "9" * 5001 + "\nc d,1\n", [], "long.csv:2: 'label' is 5001 characters long"),
], ids=["5001-digits", "10**400-regression", "1e39-regression", "deep-row", "deep-label", "csv-duplicate-column",
        "csv-5001-digits"])
def test_hostile_labels_are_one_line(tmp_path, name, content, extra, needle):
    data = tmp_path / name
    data.write_text(content)
    before = tree_state(tmp_path)
    assert_one_line_error(finetune("--model", MLM, "--train", data, "--out", tmp_path / "o", *extra), needle)
    assert tree_state(tmp_path) == before


# ---------------------------------------------------------------------------- generate


def strict_json(text: str):
    def refuse(constant):
        raise ValueError(f"bare {constant} in JSON output")
    return json.loads(text, parse_constant=refuse)


def test_tiny_temperature_samples_without_nan():
    proc = generate("--prompt", "the [MASK] river", "--temperature", "5e-324", "--seed", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    mask = strict_json(proc.stdout)["results"][0]["masks"][0]
    assert mask["chosen"]["token_id"] == mask["candidates"][0]["token_id"]  # T -> 0 is greedy


@pytest.mark.parametrize("args,needle", [
    (["--prompt", "the [MASK] river", "--temperature", "1", "--seed", "-1"], "seed must be a non-negative integer"),
    (["--prompt", "the [MASK] river", "--model", ""], "model path is empty"),
    (["--prompt", b"the [MASK] \xff\xfe river"], "not valid UTF-8"),
    (["--prompt", "the [MASK] river", "--temperature", "nan"], "temperature must be >= 0"),
])
def test_generate_bad_options_are_one_line(args, needle):
    assert_one_line_error(generate(*args), needle)


@pytest.mark.parametrize("stdin,needle", [
    (b"the [MASK] river \xff\n", "stdin line 1: not valid UTF-8"),
    (b"the [MASK] " + b"word " * 10_000_000 + b"\n", "50000010 characters long, more than the model's"),
], ids=["invalid-utf8", "50MB-line"])
def test_generate_bad_stdin_is_one_line(stdin, needle):
    """Undecodable bytes, and a one-line 50 MB prompt: refused before tokenising, within
    the 1.5 GiB address-space limit of run_cli (before: 43 s, 4.9 GB, then an abort)."""
    assert_one_line_error(generate("--prompt", "-", stdin=stdin), needle)


def test_generate_json_output_is_strict_json():
    proc = generate("--prompt", "the [MASK] river", "--prompt", "a [MASK] day", "--json")
    assert proc.returncode == 0, proc.stderr
    out = strict_json(proc.stdout)
    assert len(out["results"]) == 2


# ---------------------------------------------------------------------------- file-system faults


def test_output_below_a_file_is_one_line(train_file, tmp_path):
    (tmp_path / "afile").write_text("x")
    assert_one_line_error(finetune("--model", MLM, "--train", train_file, "--out", tmp_path / "afile" / "out"),
                          "afile")
    assert_one_line_error(run_cli(["convert.py", "--hf-path", MLM, "--mlx-path", tmp_path / "afile" / "out"]),
                          "afile")
    assert (tmp_path / "afile").read_text() == "x"


@pytest.mark.parametrize("exc,needle", [
    (OSError(28, "No space left on device", "/data/out/model.safetensors"), "No space left on device"),
    (PermissionError(13, "Permission denied", "/ro/out"), "Permission denied '/ro/out'"),
    (RuntimeError("[save_safetensors] Failed to open file /ro/x.safetensors"), "Failed to open file"),
    (RuntimeError("[malloc] Unable to allocate 1099511627776 bytes."), "Unable to allocate"),
    (MemoryError(), "out of memory"),
])
def test_cli_wrapper_turns_environment_faults_into_one_line(capsys, exc, needle):
    def main(argv):
        raise exc
    assert errors_to_exit(main, []) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and needle in err, err


def test_cli_wrapper_keeps_the_traceback_of_bugs():
    def main(argv):
        raise RuntimeError("an internal invariant broke")
    with pytest.raises(RuntimeError, match="internal invariant"):
        errors_to_exit(main, [])


# ---------------------------------------------------------------------------- pretrain configs


@pytest.mark.parametrize("change,extra,needle", [
    ({"fff_depth": 24, "hidden_size": 128}, [], "more than one array can"),  # 2^25 nodes x 128 values
    ({"fff_depth": 40}, [], "'fff_depth' must be in [0, 30]"),
    ({"vocab_size": 10**10}, [], "'vocab_size' must be in"),
    ({}, ["--vocab-size", str(10**10)], "the model to pretrain"),
    ({"hidden_size": 768, "num_heads": 12, "num_layers": 16, "fff_depth": 20}, [], "GiB"),  # memory
], ids=["depth24", "depth40", "vocab1e10", "cli-vocab1e10", "too-big-for-memory"])
def test_impossible_pretraining_configs_write_nothing(tmp_path, change, extra, needle):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the river runs by the old town .\n" * 50)
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"hidden_size": 64, "num_layers": 2, "num_heads": 4, "vocab_size": 1024,
                               "max_seq_length": 32, "intermed_type": "fff", "fff_trees": 1, "fff_depth": 3,
                               **change}))
    before = tree_state(tmp_path)
    proc = run_cli(["-m", "ufb_mlx.pretrain", "--corpus", corpus, "--out", tmp_path / "out", "--config", cfg,
                    "--steps", "2", *extra])
    assert_one_line_error(proc, needle)
    assert tree_state(tmp_path) == before  # nothing that would block the corrected rerun


def test_model_args_refuse_what_mlx_cannot_hold():
    from ufb_ref.config import ModelArgs

    base = dict(hidden_size=64, num_layers=2, num_heads=4, vocab_size=1024, max_seq_length=32)
    with pytest.raises(UFBError, match="feedforward weight .* more than one array"):
        ModelArgs.from_dict(dict(base, fff_depth=25))  # (2^26 - 1) x 64 > 2^31 - 1
    ModelArgs.from_dict(dict(base, fff_depth=20))  # 2^21 x 64 values: allowed
