"""End-to-end tests of `python -m ufb_mlx.pretrain` on small corpora generated here:
the held-out MLM loss goes down, the trained tokenizer is the released model's kind,
continued pretraining of the golden checkpoint, kill -9 and --resume (bit-identical), and
every bad input."""

from __future__ import annotations

import json
import signal

import numpy as np
import pytest

import ufb_mlx
from conftest import CLS, MLM
from train_utils import keyword_task, load_weights, read_log, run_killed_after, run_module, toy_corpus
from ufb_mlx.entry import errors_to_exit
from ufb_mlx.train import list_checkpoints

TINY = ["--config", "tiny", "--seq-length", "32", "--vocab-size", "200"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    toy_corpus(d / "a.txt", 1500, 0)
    (d / "sub").mkdir()
    toy_corpus(d / "sub" / "b.txt", 500, 1)
    (d / "notes.bin").write_bytes(b"\xff\xfe ignored: not a text suffix")
    return d


def test_pretraining_lowers_heldout_loss(corpus, tmp_path):
    out = tmp_path / "out"
    proc = run_module("ufb_mlx.pretrain", "--corpus", corpus, "--out", out, *TINY, "--steps", "60",
                      "--batch-size", "16", "--eval-every", "30", "--save-every", "30", "--log-every", "10")
    assert "tok/s" in proc.stdout and "peak mem" in proc.stdout
    evals = [r for r in read_log(out) if r["event"] == "eval"]
    assert [r["step"] for r in evals] == [0, 30, 60]
    first, last = evals[0], evals[-1]
    assert last["mlm_loss"] < 0.8 * first["mlm_loss"], evals
    assert last["mlm_accuracy"] > first["mlm_accuracy"] + 0.05, evals
    lrs = [r["lr"] for r in read_log(out) if r["event"] == "train"]
    assert max(lrs) == pytest.approx(1e-3, rel=1e-6) and lrs.index(max(lrs)) == 2  # triangle peak at step 30

    # The model folder loads, predicts only masked positions' labels, and its tokenizer
    # is built like the released one (same normaliser, pre-tokeniser, templates, special tokens).
    model, tok = ufb_mlx.load(out)
    assert model.args.task == "mlm" and model.args.vocab_size == tok.vocab_size <= 200
    assert model.args.pad_token_id == tok.pad_token_id
    mine = json.loads((out / "tokenizer.json").read_text())
    ref = json.loads((MLM / "tokenizer.json").read_text())
    for key in ("normalizer", "pre_tokenizer", "post_processor", "decoder", "added_tokens"):
        assert mine[key] == ref[key], key
    batch = tok(["anna sees the red [MASK] in the park ."])
    assert model(batch["input_ids"], attention_mask=batch["attention_mask"]).shape[-1] == model.args.vocab_size

    # A pretrained folder is a starting point for fine-tuning.
    train = tmp_path / "t.jsonl"
    train.write_text("".join(json.dumps({"text": f"{n} sees a dog", "label": n == "anna"}) + "\n"
                             for n in ["anna", "bob"] * 4).replace("true", '"yes"').replace("false", '"no"'))
    run_module("ufb_mlx.finetune", "--model", out, "--train", train, "--out", tmp_path / "cls", "--epochs", "1")
    assert ufb_mlx.load(tmp_path / "cls")[0].args.head_dim == 64  # the tiny preset's head_dim


def test_continued_pretraining_of_golden_checkpoint(tmp_path):
    text = tmp_path / "c.txt"
    text.write_text("".join(r["text"] + " .\n" for r in keyword_task(400, 3)))
    out = tmp_path / "out"
    run_module("ufb_mlx.pretrain", "--corpus", text, "--model", MLM, "--out", out, "--steps", "8",
               "--batch-size", "8", "--eval-every", "8", "--lr", "5e-4")
    model, tok = ufb_mlx.load(out)
    assert model.args.vocab_size == 899 and model.args.source["pretrained_from"] == str(MLM)
    assert (out / "tokenizer.json").read_text() == (MLM / "tokenizer.json").read_text()
    evals = [r for r in read_log(out) if r["event"] == "eval"]
    assert evals[-1]["mlm_loss"] < evals[0]["mlm_loss"]


def _pretrain_args(corpus, out, *extra):
    return ["--corpus", corpus, "--out", out, *TINY, "--steps", "80", "--batch-size", "8",
            "--eval-every", "40", "--save-every", "10", "--log-every", "1", "--dropout", "0.1", *extra]


def test_kill_and_resume_is_bit_identical(corpus, tmp_path):
    """kill -9 after a checkpoint, and Ctrl-C (a real SIGINT, which saves a checkpoint at
    the step it stops at) between two: both resume to the uninterrupted run's bits. The
    killed run leaves nothing in the temporary folder (its tokenizer copy is gone)."""
    cut, ref, ctrl_c = tmp_path / "cut", tmp_path / "ref", tmp_path / "ctrl-c"
    keep = ("--keep", "1")  # the last checkpoint, to compare optimizer states (0, the default, keeps none)
    (tmp_path / "tmp").mkdir()
    run_killed_after("ufb_mlx.pretrain", _pretrain_args(corpus, cut, *keep), "checkpoint step 20",
                     extra_env={"TMPDIR": str(tmp_path / "tmp")})
    assert max(r["step"] for r in read_log(cut) if r["event"] == "train") < 80
    # (mlx: MLX's cache of compiled CPU kernels, one folder that every run reuses)
    assert [p.name for p in (tmp_path / "tmp").iterdir() if p.name != "mlx"] == []
    out, err = run_killed_after("ufb_mlx.pretrain", _pretrain_args(corpus, ctrl_c, *keep, "--save-every", "1000"),
                                "step 5/80", sig=signal.SIGINT)
    (step, path), = list_checkpoints(ctrl_c)
    assert 5 <= step < 80 and f"saving a checkpoint at step {step}" in out
    assert err == f"interrupted: at step {step}, saved in {path}: run the same command with --resume to continue " \
                  "from there\n"

    run_module("ufb_mlx.pretrain", *_pretrain_args(corpus, ref, *keep))
    for run, extra in ((cut, keep), (ctrl_c, (*keep, "--save-every", "1000"))):
        resumed = run_module("ufb_mlx.pretrain", *_pretrain_args(corpus, run, *extra, "--resume"))
        assert "resuming from" in resumed.stdout
        assert (ref / "tokenizer.json").read_bytes() == (run / "tokenizer.json").read_bytes()
        for rel in ("model.safetensors", "checkpoints/step-00000080/optimizer.safetensors"):
            a, b = load_weights(ref / rel), load_weights(run / rel)
            assert a.keys() == b.keys()
            for k in a:
                assert np.array_equal(a[k], b[k]), f"{run.name}: {rel}: {k} differs after resume"
        ev_ref = [r for r in read_log(ref) if r["event"] == "eval"]
        ev_run = [r for r in read_log(run) if r["event"] == "eval"]
        assert without_times(ev_ref) == without_times(ev_run), run.name


def without_times(records):
    return [{k: v for k, v in r.items() if k not in ("time", "elapsed_s")} for r in records]


def test_same_command_and_seed_give_identical_files(corpus, tmp_path):
    """Pretraining from scratch is reproducible: the trained tokenizer, the weights, the
    config and the held-out figures are the same in two runs of one command."""
    for name in ("a", "b"):
        run_module("ufb_mlx.pretrain", "--corpus", corpus, "--out", tmp_path / name, *TINY, "--steps", "6",
                   "--batch-size", "8", "--eval-every", "3", "--seed", "5")
    names = sorted(f.name for f in (tmp_path / "a").iterdir() if f.is_file() and f.name != "log.jsonl")
    assert {"tokenizer.json", "model.safetensors", "config.json"} <= set(names)
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    evals = [without_times(r for r in read_log(tmp_path / n) if r["event"] == "eval") for n in ("a", "b")]
    assert evals[0] == evals[1] and len(evals[0]) == 3


# ---------------------------------------------------------------------------------------
# Bad inputs


def _fails(capsys, argv, *needles):
    from ufb_mlx import pretrain

    rc = errors_to_exit(pretrain.main, [str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for n in needles:
        assert n in err, err


def test_bad_inputs(capsys, corpus, tmp_path):
    out = tmp_path / "o"
    tiny = [*TINY, "--out", out]
    _fails(capsys, ["--corpus", tmp_path / "nope.txt", *tiny], "nope.txt' does not exist")
    (tmp_path / "empty_dir").mkdir()
    _fails(capsys, ["--corpus", tmp_path / "empty_dir", *tiny], "holds no .txt")
    (tmp_path / "blank.txt").write_text("\n  \n")
    _fails(capsys, ["--corpus", tmp_path / "blank.txt", *tiny], "holds no text")
    (tmp_path / "latin1.txt").write_bytes(b"fine line\nsecond line\ncaf\xe9\n")
    _fails(capsys, ["--corpus", tmp_path / "latin1.txt", *tiny], "latin1.txt:3: not valid UTF-8")
    (tmp_path / "short.txt").write_text("anna sees a dog .\n" * 3)
    _fails(capsys, ["--corpus", tmp_path / "short.txt", *tiny, "--vocab-size", "50"], "too small")
    (tmp_path / "two.txt").write_text("anna sees a dog .\n" * 13)
    _fails(capsys, ["--corpus", tmp_path / "two.txt", "--out", out, "--config", "tiny", "--seq-length", "64"],
           "too small for a held-out split")
    _fails(capsys, ["--corpus", corpus, "--out", out, "--config", "huge"], "tiny, base or a JSON file")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    _fails(capsys, ["--corpus", corpus, "--out", out, "--config", bad], "bad.json: not valid JSON")
    bad.write_text(json.dumps({"hidden_size": 64, "num_layers": 2, "num_heads": 4, "vocab_size": 300}))
    _fails(capsys, ["--corpus", corpus, "--out", out, "--config", bad], "missing key 'max_seq_length'")
    bad.write_text(json.dumps({"hidden_size": 66, "num_layers": 2, "num_heads": 4, "vocab_size": 300,
                               "max_seq_length": 32}))
    _fails(capsys, ["--corpus", corpus, "--out", out, "--config", bad], "not divisible by num_heads")
    _fails(capsys, ["--corpus", corpus, "--out", out, "--config", MLM / "config.json"], "Hub crammedBERT config")
    bad.write_text(json.dumps({"hidden_size": 32, "num_layers": 1, "num_heads": 2, "vocab_size": 20,
                               "max_seq_length": 32, "fff_depth": 2}))
    _fails(capsys, ["--corpus", corpus, "--out", out, "--config", bad, "--tokenizer", MLM],
           "more than the config's vocab_size 20")
    _fails(capsys, ["--corpus", corpus, "--out", out, "--model", CLS], "is a classifier")
    _fails(capsys, ["--corpus", corpus, "--out", out, "--model", MLM, "--tokenizer", MLM], "brings its own tokenizer")
    _fails(capsys, ["--corpus", corpus, "--out", out, "--model", MLM, "--seq-length", "64"], "exceeds the model's")
    _fails(capsys, ["--corpus", corpus, *tiny, "--tokenizer", tmp_path], "no tokenizer.json")
    _fails(capsys, ["--corpus", corpus, *tiny, "--resume"], "no checkpoint")
    _fails(capsys, ["--corpus", corpus, *tiny, "--steps", "0"], "--steps must be at least 1")
    _fails(capsys, ["--corpus", corpus, *tiny, "--mask-rate", "1.5"], "--mask-rate must be in (0, 1)")
    _fails(capsys, ["--corpus", corpus, "--out", MLM, "--model", MLM], "--out must differ")
    assert not out.exists()


def test_config_and_model_exclude_each_other(capsys, corpus, tmp_path):
    from ufb_mlx import pretrain

    from ufb_mlx.entry import errors_to_exit

    rc = errors_to_exit(pretrain.main, ["--corpus", str(corpus), "--out", str(tmp_path), "--config", "tiny",
                                        "--model", str(MLM)])
    err = capsys.readouterr().err
    assert rc == 2 and "not allowed with argument" in err and err.count("\n") == 1


def test_freeze_position_scale_keeps_only_that_scalar(corpus, tmp_path):
    """--freeze-position-scale: the positions' learnt scale leaves the run exactly as it was
    initialised (hidden_size ** -0.5, stored in float32), while every other weight trains;
    without it the scale moves too. Resume stays bit-identical (the kill test's run with it)."""
    scale = "encoder.embedding.pos_embedding.scale_factor"
    for frozen in (True, False):
        out = tmp_path / f"pt-{frozen}"
        run_module("ufb_mlx.pretrain", "--corpus", corpus, "--out", out, *TINY, "--steps", "6", "--batch-size", "8",
                   "--eval-every", "6", "--lr", "5e-3", "--keep", "1", *(["--freeze-position-scale"] if frozen else []))
        w = load_weights(out / "model.safetensors")
        init = np.float32(json.loads((out / "config.json").read_text())["hidden_size"] ** -0.5)
        assert (w[scale] == init).all() == frozen, (frozen, w[scale])
        opt = load_weights(out / "checkpoints/step-00000006/optimizer.safetensors")
        assert any(scale in k for k in opt) != frozen  # a frozen scale has no Adam moments


def test_kill_and_resume_with_a_frozen_scale_is_bit_identical(corpus, tmp_path):
    cut, ref = tmp_path / "cut", tmp_path / "ref"
    run_killed_after("ufb_mlx.pretrain", _pretrain_args(corpus, cut, "--freeze-position-scale"), "checkpoint step 20")
    run_module("ufb_mlx.pretrain", *_pretrain_args(corpus, ref, "--freeze-position-scale"))
    run_module("ufb_mlx.pretrain", *_pretrain_args(corpus, cut, "--freeze-position-scale", "--resume"))
    a, b = load_weights(ref / "model.safetensors"), load_weights(cut / "model.safetensors")
    assert all(np.array_equal(a[k], b[k]) for k in a)
