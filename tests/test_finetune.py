"""End-to-end tests of `python -m ufb_mlx.finetune` and `python -m ufb_mlx.classify` on the
tiny golden checkpoints and small synthetic data made here: learning a task, regression on
pairs from CSV, kill -9 and --resume (bit-identical weights), and every bad input."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from mlx.utils import tree_flatten

import ufb_mlx
from conftest import CLS, MLM
from train_utils import (count_task, keyword_task, load_weights, read_log, run_killed_after, run_module,
                         write_csv, write_jsonl)
from ufb_mlx import finetune
from ufb_mlx.entry import errors_to_exit


@pytest.fixture(scope="module")
def keyword_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("kw")
    return write_jsonl(d / "train.jsonl", keyword_task(320, 0)), write_jsonl(d / "valid.jsonl", keyword_task(64, 1))


def test_finetune_learns_and_classify_applies(keyword_data, tmp_path):
    train, valid = keyword_data
    out = tmp_path / "out"
    proc = run_module("ufb_mlx.finetune", "--model", MLM, "--train", train, "--valid", valid, "--out", out,
                      "--lr", "5e-3", "--epochs", "4", "--log-every", "5")
    # Progress lines: step, loss, learning rate, tokens/s, peak memory; eval per epoch.
    assert "tok/s" in proc.stdout and "peak mem" in proc.stdout and "eval epoch 4" in proc.stdout
    log = read_log(out)
    evals = [r for r in log if r["event"] == "eval"]
    assert [r["epoch"] for r in evals] == [1, 2, 3, 4]
    assert {"accuracy", "f1", "mcc", "loss"} <= set(evals[0])
    train_recs = [r for r in log if r["event"] == "train"]
    assert all({"step", "loss", "lr", "tokens_per_s", "peak_memory_gb"} <= set(r) for r in train_recs)
    assert train_recs[-1]["loss"] < train_recs[0]["loss"]
    assert max(r["accuracy"] for r in evals) >= 0.95, evals

    # The saved (best) model is a folder load() reads, with its label names.
    model, tok = ufb_mlx.load(out)
    assert model.args.task == "classification" and model.args.id2label == {"0": "neg", "1": "pos"}
    results = json.loads((out / "train_results.json").read_text())
    assert results["metric"] == "accuracy" and results["value"] >= 0.95

    # classify: prompts, then the labelled file (metrics reported).
    proc = run_module("ufb_mlx.classify", "--model", out, "--prompt", "the old house near the river",
                      "--prompt", "people at the station at night", "--json")
    got = json.loads(proc.stdout)["results"]
    assert [r["label"] for r in got] == ["pos", "neg"]
    proc = run_module("ufb_mlx.classify", "--model", out, "--file", valid, "--top-k", "2")
    assert len(proc.stdout.splitlines()) == 64 and "accuracy" in proc.stderr


def test_regression_on_csv_pairs(tmp_path):
    rows = count_task(96, 2)
    train = write_csv(tmp_path / "train.csv", rows[:64], ["text", "text_pair", "label"])
    valid = write_csv(tmp_path / "valid.csv", rows[64:], ["text", "text_pair", "label"])
    out = tmp_path / "out"
    run_module("ufb_mlx.finetune", "--model", CLS, "--train", train, "--valid", valid, "--out", out,
               "--task", "regression", "--lr", "2e-3", "--epochs", "3", "--batch-size", "8", "--dropout", "0")
    evals = [r for r in read_log(out) if r["event"] == "eval"]
    assert {"pearson", "spearman", "mse"} <= set(evals[0])
    assert max(r["pearson"] for r in evals) > 0.5, evals
    model, _ = ufb_mlx.load(out)
    assert model.args.problem_type == "regression" and model.args.num_labels == 1
    proc = run_module("ufb_mlx.classify", "--model", out, "--prompt", "river river town", "--pair", "river",
                      "--json")
    assert isinstance(json.loads(proc.stdout)["results"][0]["value"], float)


def test_finetune_classifier_checkpoint_keeps_head(tmp_path):
    """The golden classifier has 3 labels: 3 training labels keep its head."""
    rows = [{"text": f"the {w} was small", "label": i % 3} for i, w in enumerate(["river", "town", "book"] * 8)]
    train = write_jsonl(tmp_path / "t.jsonl", rows)
    out = tmp_path / "out"
    proc = run_module("ufb_mlx.finetune", "--model", CLS, "--train", train, "--out", out, "--epochs", "1",
                      "--batch-size", "8")
    assert "head kept" in proc.stdout
    model, _ = ufb_mlx.load(out)
    assert model.args.id2label == {"0": "0", "1": "1", "2": "2"}


def _finetune_args(train, valid, out):
    # Dropout 0.1 (the default) on purpose: the resumed run must draw the same masks.
    return ["--model", MLM, "--train", train, "--valid", valid, "--out", out, "--lr", "1e-3",
            "--epochs", "2", "--batch-size", "8", "--save-every", "5", "--log-every", "1", "--keep", "3"]


def test_kill_and_resume_is_bit_identical(keyword_data, tmp_path):
    train, valid = keyword_data
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    run_module("ufb_mlx.finetune", *_finetune_args(train, valid, ref))

    # The same run, killed with SIGKILL right after its second checkpoint (of 80 steps).
    run_killed_after("ufb_mlx.finetune", _finetune_args(train, valid, cut), "checkpoint step 10")
    last = max(r["step"] for r in read_log(cut) if r["event"] == "train")
    assert last < 80, "the run finished before it was killed"
    assert not (cut / "checkpoints" / "step-00000080").exists()

    time.sleep(0.1)
    resumed = run_module("ufb_mlx.finetune", *_finetune_args(train, valid, cut), "--resume")
    assert "resuming from" in resumed.stdout
    for rel in ("checkpoints/step-00000080/model.safetensors", "checkpoints/step-00000080/optimizer.safetensors",
                "model.safetensors"):
        a, b = load_weights(ref / rel), load_weights(cut / rel)
        assert a.keys() == b.keys()
        for k in a:
            assert np.array_equal(a[k], b[k]), f"{rel}: {k} differs after resume"
    # The log of the resumed run has each step once.
    steps = [r["step"] for r in read_log(cut) if r["event"] == "train"]
    assert steps == list(range(1, 81))
    # Resuming a finished run does nothing; resuming with other options is refused.
    done = run_module("ufb_mlx.finetune", *_finetune_args(train, valid, cut), "--resume")
    assert "nothing to do" in done.stdout
    bad = run_module("ufb_mlx.finetune", *_finetune_args(train, valid, cut), "--resume", "--lr", "2e-3", check=False)
    assert bad.returncode == 2 and "'lr' was 0.001" in bad.stderr


# ---------------------------------------------------------------------------------------
# Bad inputs: one line `error: ...` naming the problem (file:line for data), exit 2.


def _fails(capsys, argv, *needles, module=None):
    from ufb_mlx import finetune

    rc = errors_to_exit((module or finetune).main, [str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for n in needles:
        assert n in err, err
    return err


@pytest.mark.parametrize("content,needle", [
    ('{"text": "a b", "label": 1}\n{"text": "c d", "label": 0\n', "bad.jsonl:2: not valid JSON"),
    ('{"text": "a b", "label": 1}\n\n["c", 0]\n', "bad.jsonl:3: expected a JSON object"),
    ('{"text": "a b", "label": 1}\n{"label": 0}\n', "bad.jsonl:2: no 'text' field"),
    ('{"text": "a b", "label": 1}\n{"text": "c"}\n', "bad.jsonl:2: no 'label' field"),
    ('{"sentence": "a b", "label": 1}\n', "bad.jsonl:1: no 'text' field (fields: sentence, label); --text-column"),
    ('{"text": "a b", "y": 1}\n', "bad.jsonl:1: no 'label' field (fields: text, y); --label-column names"),
    ('{"text": "a b", "label": 1}\n{"text": "  ", "label": 0}\n', "bad.jsonl:2: 'text' is empty"),
    ('{"text": 5, "label": 1}\n', "bad.jsonl:1: 'text' must be a string"),
    ('{"text": "a", "label": [1]}\n', "bad.jsonl:1: 'label' must be a string or a number"),
    ('{"text": "a", "label": true}\n', "bad.jsonl:1: 'label' must be a string or a number"),
    ('{"text": "a", "text_pair": 3, "label": 1}\n', "bad.jsonl:1: 'text_pair' must be a string"),
    ('{"text": "a", "label": 1}\n{"text": "b", "label": 1}\n', "at least 2 different labels"),
    ("\n\n", "bad.jsonl: no examples"),
    (b'{"text": "a", "label": 1}\n{"text": "\xff", "label": 0}\n', "bad.jsonl:2: not valid UTF-8"),
])
def test_bad_jsonl(capsys, tmp_path, content, needle):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(content if isinstance(content, bytes) else content.encode())
    _fails(capsys, ["--model", MLM, "--train", bad, "--out", tmp_path / "o"], needle)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("content,needle", [
    ("text,label\na b,1\nc d,0,extra\n", "bad.csv:3: 3 fields, but the header has 2"),
    ("sentence,label\na b,1\n", "bad.csv:1: no 'text' column"),
    ("text,score\na b,1\n", "bad.csv:1: no 'label' column"),
    ('text,label\n"a "b" c",1\n', "bad.csv:2: malformed CSV"),
    ("text,label\na b,\n", "bad.csv:2: 'label' is empty"),
])
def test_bad_csv(capsys, tmp_path, content, needle):
    bad = tmp_path / "bad.csv"
    bad.write_text(content)
    _fails(capsys, ["--model", MLM, "--train", bad, "--out", tmp_path / "o"], needle)


def test_bad_labels_and_files(capsys, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", keyword_task(8, 0))
    valid = write_jsonl(tmp_path / "valid.jsonl", keyword_task(3, 1) + [{"text": "a b", "label": "maybe"}])
    out = tmp_path / "o"
    _fails(capsys, ["--model", MLM, "--train", train, "--valid", valid, "--out", out],
           "valid.jsonl:4: label 'maybe' does not occur in the training data")
    _fails(capsys, ["--model", MLM, "--train", train, "--out", out, "--task", "regression"],
           "train.jsonl:1: label 'neg' is not a number")
    _fails(capsys, ["--model", MLM, "--train", tmp_path / "missing.jsonl", "--out", out], "missing.jsonl: no such file")
    (tmp_path / "data.parquet").write_text("x")
    _fails(capsys, ["--model", MLM, "--train", tmp_path / "data.parquet", "--out", out], "cannot tell the format")
    _fails(capsys, ["--model", tmp_path / "nomodel", "--train", train, "--out", out], "nomodel")
    _fails(capsys, ["--model", MLM, "--train", train, "--out", MLM], "--out must differ from --model")
    _fails(capsys, ["--model", MLM, "--train", train, "--out", out, "--max-length", "999"], "exceeds the model's")
    _fails(capsys, ["--model", MLM, "--train", train, "--out", out, "--batch-size", "0"], "--batch-size")
    _fails(capsys, ["--model", MLM, "--train", train, "--out", out, "--dropout", "1.5"], "--dropout")
    _fails(capsys, ["--model", MLM, "--train", train, "--out", out, "--metric", "pearson"], "does not fit")
    _fails(capsys, ["--model", MLM, "--train", train, "--out", out, "--resume"], "no checkpoint")
    assert not out.exists()
    # An output folder holding a model is not overwritten without --force.
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "config.json").write_text("{}")
    _fails(capsys, ["--model", MLM, "--train", train, "--out", occupied], "already holds")
    assert (occupied / "config.json").read_text() == "{}"


def test_classify_bad_inputs(capsys, tmp_path):
    from ufb_mlx import classify

    _fails(capsys, ["--model", MLM, "--prompt", "hello"], "masked-language model, not a classifier", module=classify)
    _fails(capsys, ["--model", CLS, "--prompt", "a", "--prompt", "b", "--pair", "c"], "one --pair per --prompt",
           module=classify)
    bad = tmp_path / "in.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "oops"}\n')
    _fails(capsys, ["--model", CLS, "--file", bad], "in.jsonl:2: no 'text' field", module=classify)


def test_max_steps_and_random_init(keyword_data, tmp_path):
    """--max-steps ends mid-epoch (20 steps per epoch here) with the schedule spanning
    exactly those steps, evaluated and saved at the last one; --init random keeps the
    architecture and tokenizer but none of the checkpoint's weights."""
    train, valid = keyword_data
    out = tmp_path / "out"
    run_module("ufb_mlx.finetune", "--model", MLM, "--train", train, "--valid", valid, "--out", out,
               "--max-steps", "7", "--init", "random", "--log-every", "1", "--warmup", "0")
    log = read_log(out)
    recs = [r for r in log if r["event"] == "train"]
    assert [r["step"] for r in recs] == list(range(1, 8))
    # cosine over 7 steps, no warm-up: the lr of step s is lr/2 (1 + cos(pi (s - 1) / 7)), lr
    # the "small" recipe's (the tiny model is narrower than the released one)
    lr = finetune.RECIPES["small"]["lr"]
    for r in recs:
        assert r["lr"] == pytest.approx(lr * 0.5 * (1 + np.cos(np.pi * (r["step"] - 1) / 7)), rel=1e-5)
    assert [r["step"] for r in log if r["event"] == "eval"] == [7]
    assert json.loads((out / "train_results.json").read_text())["step"] == 7

    model, tok = ufb_mlx.load(out)
    golden, golden_tok = ufb_mlx.load(MLM)
    assert tok.vocab_size == golden_tok.vocab_size and (out / "tokenizer.json").read_text() == (MLM / "tokenizer.json").read_text()
    mine = dict(tree_flatten(model.parameters()))
    theirs = dict(tree_flatten(golden.parameters()))
    for k, v in theirs.items():
        assert mine[k].shape == v.shape, k
    # Fresh N(0, 0.02^2) weights, moved by at most 7 Adam steps of the small recipe's lr (1.5e-4:
    # at most ~1e-3 a weight, a std change well under 0.002): uncorrelated with
    # the checkpoint's (|r| of 57k independent pairs is ~0.004; a run from the checkpoint
    # keeps r above 0.95).
    for k in ("encoder.embedding.word_embedding.weight", "encoder.layers.0.ffn.linear_in.weight"):
        a, b = np.array(mine[k]).ravel(), np.array(theirs[k]).ravel()
        assert abs(a.std() - 0.02) < 0.002 and abs(np.corrcoef(a, b)[0, 1]) < 0.05, k


def test_recipes(capsys, tmp_path):
    """--recipe auto takes the paper's recipe at the released width and the measured small
    one below; explicit --lr/--epochs win; bad values are refused."""
    from ufb_ref.config import ModelArgs

    wide = ModelArgs(hidden_size=768, num_layers=1, num_heads=12, vocab_size=30, max_seq_length=8)
    narrow = ModelArgs(hidden_size=256, num_layers=1, num_heads=4, vocab_size=30, max_seq_length=8)
    assert finetune.recipe_for("auto", wide) == "paper" and finetune.recipe_for("auto", narrow) == "small"
    assert finetune.recipe_for("paper", narrow) == "paper"
    train = write_jsonl(tmp_path / "t.jsonl", keyword_task(16, 0))
    run_module("ufb_mlx.finetune", "--model", MLM, "--train", train, "--out", tmp_path / "o", "--recipe", "paper",
               "--max-steps", "1")
    start = next(r for r in read_log(tmp_path / "o") if r["event"] == "start")
    assert (start["lr"], start["epochs"], start["recipe"]) == (4e-5, 5, "paper")
    run_module("ufb_mlx.finetune", "--model", MLM, "--train", train, "--out", tmp_path / "p", "--lr", "1e-3",
               "--max-steps", "1")
    start = next(r for r in read_log(tmp_path / "p") if r["event"] == "start")
    assert (start["lr"], start["epochs"]) == (1e-3, finetune.RECIPES["small"]["epochs"])
    for bad, needle in ((["--epochs", "0"], "--epochs must be at least 1"), (["--max-steps", "0"], "--max-steps"),
                        (["--lr", "-1"], "--lr must be positive")):
        _fails(capsys, ["--model", MLM, "--train", train, "--out", tmp_path / "q", *bad], needle)


@pytest.mark.parametrize("header,needle", [
    ("sentence,label", "bad.csv:1: no 'text' column in the header (columns: sentence, label); --text-column names"),
    ("text,y", "bad.csv:1: no 'label' column in the header (columns: text, y); --label-column names"),
])
def test_csv_with_other_column_names_suggests_the_options(capsys, tmp_path, header, needle):
    bad = tmp_path / "bad.csv"
    bad.write_text(f"{header}\na b,1\nc d,0\n")
    _fails(capsys, ["--model", MLM, "--train", bad, "--out", tmp_path / "o"], needle)

