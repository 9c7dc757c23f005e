"""`python -m ufb_mlx.extend_vocab`: the demo model given the pieces of a made-up language.
The old tokens keep their ids and rows, each new row is the mean of its old pieces' rows,
a text without new pieces scores as before, the new folder loads and pretrains, and bad
input is refused in one line."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

import ufb_mlx
from train_utils import load_weights, read_log, run_module
from ufb_mlx.entry import errors_to_exit
from ufb_mlx.extend_vocab import EMBEDDING, main, old_pieces

# Words no English vocabulary has pieces for (the shipped demo's already has the email's
# characters and pieces: it was extended by this tool), each line twice (the WordPiece
# trainer keeps pairs seen at least twice).
_RNG = np.random.default_rng(0)
WORDS = ["".join(_RNG.choice(list("qxzjvkwy"), size=_RNG.integers(5, 9))) for _ in range(400)]
LINES = [" ".join(WORDS[i:i + 8]) for i in range(0, len(WORDS), 8)] * 2
PLAIN = "In the beginning God created the heaven and the earth."


def test_old_pieces_is_wordpiece_longest_match_first():
    vocab = {"<unk>": 0, "a": 1, "ab": 2, "##b": 3, "##c": 4, "##bc": 5}
    assert old_pieces(vocab, "abc", 0) == [2, 4]       # "ab" before "a" + "##bc"
    assert old_pieces(vocab, "##bcb", 0) == [5, 3]     # a continuation piece is spelt inside a word
    assert old_pieces(vocab, "ax", 0) == [0]           # unspellable: <unk>, as WordPiece does


@pytest.fixture(scope="module")
def extended(tmp_path_factory):
    d = tmp_path_factory.mktemp("ext")
    (d / "emails.txt").write_text("\n".join(LINES) + "\n")
    out = d / "model"
    proc = run_module("ufb_mlx.extend_vocab", "--model", "demo", "--corpus", d / "emails.txt", "--add", "64",
                      "--out", out)
    assert "added 64 pieces" in proc.stdout
    return d, out


def test_old_tokens_keep_ids_and_rows_new_rows_are_means(extended):
    _, out = extended
    base = ufb_mlx.DEMO_MODEL
    old_vocab = json.loads((base / "tokenizer.json").read_text())["model"]["vocab"]
    new_vocab = json.loads((out / "tokenizer.json").read_text())["model"]["vocab"]
    cfg = json.loads((out / "config.json").read_text())
    old_n = json.loads((base / "config.json").read_text())["vocab_size"]
    assert cfg["vocab_size"] == old_n + 64 and cfg["source"]["pieces_added"] == 64
    assert all(new_vocab[t] == i for t, i in old_vocab.items())
    added = {t: i for t, i in new_vocab.items() if t not in old_vocab}
    assert sorted(added.values()) == list(range(old_n, old_n + 64))

    old_w = load_weights(base / "model.safetensors")[EMBEDDING].astype(np.float32)
    new_w = load_weights(out / "model.safetensors")[EMBEDDING]
    assert new_w.shape == (old_n + 64, old_w.shape[1])
    np.testing.assert_array_equal(new_w[:old_n], old_w)  # float16 -> float32 is exact
    old_tok = ufb_mlx.Tokenizer(base)
    initial = [t for t in added if not t.startswith("##")]
    assert len(initial) > 10
    for token in initial:
        # Independent of old_pieces: the old tokenizer's own split of a word-initial piece
        # (a continuation piece cannot be fed to it alone; old_pieces covers those below).
        ids = old_tok.encode(token)[:-1]  # drop the <sep> the template appends
        np.testing.assert_allclose(new_w[added[token]], old_w[ids].mean(axis=0), rtol=1e-6, atol=1e-7)
    unk = old_vocab["<unk>"]
    for token, i in added.items():
        np.testing.assert_allclose(new_w[i], old_w[old_pieces(old_vocab, token, unk)].mean(axis=0),
                                   rtol=1e-6, atol=1e-7)


def test_text_without_new_pieces_scores_as_before(extended):
    _, out = extended
    old_model, old_tok = ufb_mlx.load("demo")
    new_model, new_tok = ufb_mlx.load(out)
    ids = old_tok.encode(PLAIN.replace("earth", "[MASK]"))
    assert new_tok.encode(PLAIN.replace("earth", "[MASK]")) == ids
    x = mx.array([ids])
    old_logits = np.array(old_model(x))
    new_logits = np.array(new_model(x))
    n = old_logits.shape[-1]
    # The same float32 weights through the same kernels; only the decoder's matmul has more
    # columns, which can change the BLAS's blocking: float32 rounding, not a new result.
    np.testing.assert_allclose(new_logits[..., :n], old_logits, rtol=1e-5, atol=1e-4)
    assert new_logits.shape[-1] == n + 64


def test_new_text_takes_fewer_tokens_and_pretraining_continues(extended, tmp_path):
    d, out = extended
    _, old_tok = ufb_mlx.load("demo")
    _, new_tok = ufb_mlx.load(out)
    old_ids, new_ids = old_tok.encode(LINES[0]), new_tok.encode(LINES[0])
    assert len(new_ids) < len(old_ids) and max(new_ids) >= old_tok.vocab_size
    run = tmp_path / "run"
    run_module("ufb_mlx.pretrain", "--model", out, "--corpus", d / "emails.txt", "--out", run, "--steps", "2",
               "--batch-size", "2", "--eval-every", "1", "--quiet")
    evals = [r for r in read_log(run) if r["event"] == "eval"]
    assert evals and all(np.isfinite(r["mlm_loss"]) for r in evals)
    assert json.loads((run / "config.json").read_text())["vocab_size"] == json.loads(
        (out / "config.json").read_text())["vocab_size"]


def test_bad_input(extended, tmp_path, capsys):
    d, out = extended
    emails = d / "emails.txt"
    cases = [
        (["--model", "demo", "--corpus", emails, "--add", "0", "--out", tmp_path / "a"], "--add must be at least 1"),
        (["--model", "demo", "--corpus", emails, "--out", out], "exists"),
        (["--model", "demo", "--corpus", tmp_path / "missing.txt", "--out", tmp_path / "b"], "missing.txt"),
        (["--model", tmp_path / "nowhere", "--corpus", emails, "--out", tmp_path / "c"], "nowhere"),
    ]
    plain = tmp_path / "plain.txt"
    plain.write_text("the\n")
    cases.append((["--model", "demo", "--corpus", plain, "--out", tmp_path / "d"], "nothing to add"))
    for argv, needle in cases:
        capsys.readouterr()
        assert errors_to_exit(main, list(map(str, argv))) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert not any((tmp_path / n).exists() for n in "abcd")
