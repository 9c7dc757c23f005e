"""Unit tests of the training building blocks: GLUE metrics, labels, masking, data order,
schedules, the optimizer's weight-decay split, and the checkpoint round trip."""

from __future__ import annotations

import math

import numpy as np
import pytest

import ufb_mlx  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from conftest import MLM
from ufb_mlx import data, metrics, train
from ufb_ref.config import ModelArgs
from ufb_ref.errors import UFBError
from ufb_ref.tokenizer import Tokenizer

# ---------------------------------------------------------------------------------------
# Metrics


def test_accuracy_and_f1():
    y, p = [0, 1, 1, 0, 1], [0, 1, 0, 0, 1]
    assert metrics.accuracy(y, p) == 0.8
    assert metrics.f1(y, p, 2) == pytest.approx(0.8)           # tp 2, fp 0, fn 1
    # Macro F1 over 3 classes: class 0 tp 1 fp 2 fn 1 -> 0.4; class 1 tp 1 fp 1 fn 1 -> 0.5;
    # class 2 never predicted -> 0.
    y3, p3 = [0, 0, 1, 1, 2], [0, 1, 1, 0, 0]
    assert metrics.f1(y3, p3, 3) == pytest.approx((0.4 + 0.5 + 0) / 3)


def _mcc_by_covariance(y, p, k):
    """MCC as the correlation of one-hot matrices (Gorodkin's definition)."""
    Y, P = np.eye(k)[y], np.eye(k)[p]
    Y, P = Y - Y.mean(0), P - P.mean(0)
    return (Y * P).sum() / math.sqrt((Y * Y).sum() * (P * P).sum())


def test_matthews():
    # scikit-learn's documented example: matthews_corrcoef([1,1,1,-1], [1,-1,1,1]) = -0.333...
    assert metrics.matthews_corrcoef([1, 1, 1, 0], [1, 0, 1, 1], 2) == pytest.approx(-1 / 3)
    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 4, 200), rng.integers(0, 4, 200)
    p[:120] = y[:120]
    assert metrics.matthews_corrcoef(y, p, 4) == pytest.approx(_mcc_by_covariance(y, p, 4))
    assert metrics.matthews_corrcoef([0, 0, 0], [0, 0, 0], 2) == 0.0  # undefined -> 0, as scikit-learn


def test_correlations():
    assert list(metrics.rankdata([10, 20, 20, 5])) == [2, 3.5, 3.5, 1]
    x, y = np.array([1.0, 2, 2, 3, 7]), np.array([1.0, 3, 2, 4, 5])
    assert metrics.pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1])
    assert metrics.spearman(x, y) == pytest.approx(np.corrcoef([1, 2.5, 2.5, 4, 5], [1, 3, 2, 4, 5])[0, 1])
    assert math.isnan(metrics.pearson([1, 1, 1], [1, 2, 3]))
    assert metrics.mse([1, 2], [1, 4]) == 2.0


def test_best_model_selection():
    assert metrics.is_better("accuracy", 0.5, None)
    assert metrics.is_better("accuracy", 0.6, 0.5) and not metrics.is_better("accuracy", 0.5, 0.5)
    assert metrics.is_better("accuracy", 0.5, 0.5, loss=0.1, best_loss=0.2)  # tie: lower loss wins
    assert metrics.is_better("mse", 0.1, 0.2) and not metrics.is_better("mse", 0.3, 0.2)
    assert not metrics.is_better("pearson", float("nan"), None)


# ---------------------------------------------------------------------------------------
# Labels and text


def _ex(label):
    return data.Example("t", None, label, "f:1")


def test_label_keys_and_order():
    assert {data.label_key(_ex(v)) for v in (1, 1.0, "1", " 1 ", "1.00")} == {"1"}
    assert data.label_key(_ex(0.5)) == "0.5" and data.label_key(_ex(" pos ")) == "pos"
    assert data.build_labels([_ex(v) for v in ("10", 2, "2", "1")], "x") == ["1", "2", "10"]
    assert data.build_labels([_ex(v) for v in ("b", "a", "c")], "x") == ["a", "b", "c"]
    assert data.regression_target(_ex(" 2.5 ")) == 2.5
    with pytest.raises(UFBError, match="f:1: label 'x' is not a number"):
        data.regression_target(_ex("x"))


def test_truncation_keeps_the_template():
    tok = Tokenizer(MLM)
    enc = data.TextEncoder(tok, 8)
    ids, cut = enc([data.Example("the river was long and the town was small today", None, None, "x"),
                    data.Example("the town", "the river was long and the town", None, "y"),
                    data.Example("a day", None, None, "z")])
    assert cut == 2 and [len(s) for s in ids] == [8, 8, 3]
    assert ids[0][-1] == tok.sep_token_id and ids[1][0] == tok.cls_token_id and ids[1][-1] == tok.sep_token_id


def test_masking():
    tok = Tokenizer(MLM)
    masker = data.Masker(tok, tok.vocab_size, 0.25)
    rng = np.random.default_rng(0)
    blocks = rng.integers(7, tok.vocab_size, (64, 128)).astype(np.int32)
    blocks[:, ::10] = tok.sep_token_id
    inputs, labels = masker(blocks, np.random.default_rng(1))
    sel = labels != -100
    assert not sel[:, ::10].any()                                      # special tokens never selected
    assert np.array_equal(labels[sel], blocks[sel])
    assert np.array_equal(inputs[~sel], blocks[~sel])                  # only selected positions change
    eligible = blocks != tok.sep_token_id
    assert abs(sel.sum() / eligible.sum() - 0.25) < 0.01
    masked = (inputs[sel] == tok.mask_token_id).mean()
    kept = (inputs[sel] == blocks[sel]).mean()
    assert abs(masked - 0.8) < 0.02 and abs(kept - 0.1) < 0.02 + 0.001  # (a random draw may equal the token)
    assert not np.isin(inputs[sel & (inputs != tok.mask_token_id)], list(tok.special_ids.values())).any()
    again = masker(blocks, np.random.default_rng(1))
    assert np.array_equal(again[0], inputs) and np.array_equal(again[1], labels)


def test_data_order_is_a_function_of_seed_and_epoch():
    a, b = data.epoch_order(50, 3, 1), data.epoch_order(50, 3, 1)
    assert np.array_equal(a, b) and not np.array_equal(a, data.epoch_order(50, 3, 2))
    assert sorted(a) == list(range(50))
    assert [len(data.shard(np.arange(5), r, 2)) for r in (0, 1)] == [3, 2]
    assert len(data.shard(np.arange(1), 1, 2)) == 0


# ---------------------------------------------------------------------------------------
# Schedules, optimizer, checkpoints


def test_schedules():
    cos = train.make_schedule("cosine", 1.0, 100, 0.1)
    lrs = [cos(mx.array(s)).item() for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0) and lrs[10] == pytest.approx(1.0)
    assert lrs[55] == pytest.approx(0.5, abs=1e-6) and lrs[-1] < 1e-3
    tri = train.make_schedule("triangle", 1.0, 100, 0.5)
    lrs = [tri(mx.array(s)).item() for s in range(100)]
    assert lrs[49] == pytest.approx(1.0) and lrs[0] == pytest.approx(0.02) and lrs[75] == pytest.approx(0.5)
    assert train.make_schedule("constant", 2.0, 10, 0.0)(mx.array(5)).item() == 2.0
    with pytest.raises(UFBError):
        train.make_schedule("linear", 1.0, 10, 0.1)


def _tiny_model(seed=0):
    args = ModelArgs(hidden_size=16, num_layers=1, num_heads=2, vocab_size=30, max_seq_length=8, fff_depth=2)
    mx.random.seed(seed)
    model = ufb_mlx.Model(args)
    train.init_normal(model)
    return model


def _loss(model, ids, reduction):
    hidden = model.encode(ids)
    return (hidden ** 2).mean()


def test_weight_decay_spares_biases_and_norms():
    model = _tiny_model()
    before = dict(tree_flatten(model.parameters()))
    opt = train.make_optimizer(lambda step: mx.array(0.1), weight_decay=0.5)
    zeros = {k: mx.zeros_like(v) for k, v in before.items()}
    opt.update(model, tree_unflatten(list(zeros.items())))
    after = dict(tree_flatten(model.parameters()))
    for k in before:
        factor = 1.0 if ("bias" in k or "norm" in k) else 1 - 0.1 * 0.5
        assert np.allclose(np.array(after[k]), np.array(before[k]) * factor, atol=1e-7), k


def test_checkpoint_round_trip_is_exact(tmp_path):
    world = train.World()
    batches = [{"ids": mx.array(np.random.default_rng(i).integers(0, 30, (2, 8)))} for i in range(6)]

    def make():
        model = _tiny_model()
        model.set_dropout(0.1)
        opt = train.make_optimizer(train.make_schedule("cosine", 1e-2, 6, 0.2))
        return model, opt, train.Trainer(model, opt, _loss, world, seed=5, grad_clip=0.5)

    model, opt, tr = make()
    for s in range(1, 7):
        tr.step(s, batches[s - 1], 1.0)
        if s == 3:
            train.save_checkpoint(tmp_path, s, model, opt, {"run": {"x": 1}}, keep=1)
    model2, opt2, tr2 = make()
    state = train.restore_checkpoint(train.list_checkpoints(tmp_path)[-1][1], model2, opt2)
    assert state["step"] == 3 and state["run"] == {"x": 1}
    for s in range(4, 7):
        tr2.step(s, batches[s - 1], 1.0)
    for (k, a), (_, b) in zip(tree_flatten(model.parameters()), tree_flatten(model2.parameters())):
        assert np.array_equal(np.array(a), np.array(b)), k
    assert not list((tmp_path / "checkpoints").glob(".*"))  # no temporary left beside the checkpoints


def test_checkpoints_kept_while_training_and_after(tmp_path):
    """While training, --keep 0 still keeps the newest checkpoint (what --resume needs);
    once the run has finished, exactly the newest --keep remain (0: none, nor their folder)."""
    model = _tiny_model()
    opt = train.make_optimizer(train.make_schedule("constant", 1e-3, 4, 0.0))
    mx.eval(model.parameters())
    for keep, after in ((0, []), (2, [3, 4]), (9, [1, 2, 3, 4])):
        out = tmp_path / f"keep{keep}"
        for s in range(1, 5):
            train.save_checkpoint(out, s, model, opt, {}, keep=keep)
            assert [n for n, _ in train.list_checkpoints(out)] == list(range(max(1, s - max(keep, 1) + 1), s + 1))
        train.prune_checkpoints(out, keep)
        assert [n for n, _ in train.list_checkpoints(out)] == after
        assert (out / "checkpoints").exists() == bool(after)


def test_single_process_world():
    w = train.World()
    assert (w.rank, w.size, w.main) == (0, 1, True)
    assert w.broadcast_text("abc") == "abc"
    w.check_same("x", "y")
    assert w.sum(np.array([1.5]))[0] == 1.5


def test_problem_type_in_config():
    base = dict(hidden_size=16, num_layers=1, num_heads=2, vocab_size=30, max_seq_length=8, task="classification",
                head_dim=8)
    args = ModelArgs.from_dict(dict(base, num_labels=1, problem_type="regression"))
    assert ModelArgs.from_dict(args.to_dict()).problem_type == "regression"
    assert ModelArgs.from_dict(dict(base, num_labels=3)).problem_type is None  # older configs
    with pytest.raises(UFBError, match="needs task 'classification' and num_labels 1"):
        ModelArgs.from_dict(dict(base, num_labels=2, problem_type="regression"))
    with pytest.raises(UFBError, match="'problem_type' must be one of .*'multi_label"):
        ModelArgs.from_dict(dict(base, num_labels=2, problem_type="multi_label_classification"))


def test_set_dropout_replaces_the_modules():
    """set_dropout builds new nn.Dropout modules (public API): in training mode each drops
    about p of its inputs (20000 draws: standard error 0.003, bound 0.02), in eval mode none."""
    import mlx.nn as nn

    args = ModelArgs(hidden_size=16, num_layers=2, num_heads=2, vocab_size=30, max_seq_length=8, fff_depth=2,
                     task="classification", num_labels=2, head_dim=8)
    model = ufb_mlx.Model(args)
    model.set_dropout(0.3)
    drops = [m for _, m in model.named_modules() if isinstance(m, nn.Dropout)]
    assert len(drops) == 3  # one per layer and the pooler's
    model.train()
    for m in drops:
        assert abs(float((m(mx.ones((20000,))) == 0).mean()) - 0.3) < 0.02
    model.eval()
    assert all(float((m(mx.ones((100,))) == 0).mean()) == 0 for m in drops)


@pytest.mark.parametrize("tool", ["finetune", "pretrain"])
def test_resume_fingerprint_covers_every_option(tool):
    """Every option of a training tool is in the run's fingerprint unless it is listed as
    not changing the result, so that a new option cannot be forgotten by --resume."""
    import importlib

    module = importlib.import_module(f"ufb_mlx.{tool}")
    parser = module.build_parser()
    argv = (["--model", "m", "--train", "t.jsonl", "--out", "o"] if tool == "finetune"
            else ["--corpus", "c.txt", "--out", "o"])
    args = parser.parse_args(argv)
    inputs = ("train", "valid") if tool == "finetune" else ("corpus", "valid", "tokenizer")
    fp = train.fingerprint(args, inputs, seen=1)
    dests = {a.dest for a in parser._actions if a.dest != "help"}
    assert dests - set(fp) == set(train.NOT_FINGERPRINTED) & dests | set(inputs)
    assert fp["seen"] == 1 and fp["betas"] == [0.9, 0.98]


def test_stale_temporaries_of_a_killed_run_are_removed(tmp_path):
    """What a killed writer (a process that is gone) left beside the checkpoints and the
    model files is removed when the run resumes; a live writer's temporaries stay."""
    import os

    dead = 2**22 + 12345
    while True:  # a process id that is not running
        try:
            os.kill(dead, 0)
            dead += 1
        except ProcessLookupError:
            break
        except PermissionError:
            dead += 1
    root = tmp_path / "checkpoints"
    root.mkdir()
    stale = [root / f".step-00000010.tmp-{dead}-0123abcd", tmp_path / f".model.safetensors.tmp-{dead}-0123abcd.safetensors",
             tmp_path / f".config.json.tmp-{dead}-89abcdef.json"]
    live = root / f".step-00000020.tmp-{os.getpid()}-0123abcd"
    stale[0].mkdir()
    live.mkdir()
    for f in stale[1:]:
        f.write_text("half")
    train.clean_stale_temporaries(tmp_path)
    assert not any(p.exists() for p in stale) and live.is_dir()


def _steps(compiled: bool, lr: float = 1e-2, steps: int = 4):
    world = train.World()
    batches = [{"ids": mx.array(np.random.default_rng(i).integers(0, 30, (2, 8)))} for i in range(steps)]
    model = _tiny_model()
    model.set_dropout(0.1)
    opt = train.make_optimizer(train.make_schedule("cosine", lr, steps, 0.2))
    tr = train.Trainer(model, opt, _loss, world, seed=5, grad_clip=0.5, compile=compiled)
    losses = [tr.step(s, batches[s - 1], 1.0) for s in range(1, steps + 1)]
    return losses, dict(tree_flatten(model.parameters())), tr


def test_compiled_step_matches_the_eager_step():
    """mx.compile traces the same step (loss, gradients, clipping, AdamW, dropout from the
    same seeded state): four steps agree with the eager ones to float32 rounding (fused
    element-wise kernels may round intermediate results differently: 1e-5 relative on
    weights of order 0.02-1, losses of order 0.1-1)."""
    eager_losses, eager, tr_e = _steps(False)
    compiled_losses, compiled, tr_c = _steps(True)
    assert not tr_e.compile and tr_c.compile and tr_c._compiled is not None
    np.testing.assert_allclose(compiled_losses, eager_losses, rtol=1e-5)
    for k in eager:
        np.testing.assert_allclose(np.array(compiled[k]), np.array(eager[k]), rtol=1e-5, atol=1e-7, err_msg=k)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_an_update_that_overflows_stops_training(compiled):
    """Finite loss and gradients, but a learning rate so large that the update makes the
    weights infinite: the step reports a NonFiniteLoss instead of returning as if trained."""
    with pytest.raises(train.NonFiniteLoss, match="step 1"):
        _steps(compiled, lr=1e38, steps=1)


def test_evaluations_report_their_progress():
    """Every held-out block (or text) is counted once, batches without a label included,
    and the figures are those of a run without progress."""
    from ufb_mlx.evaluate import evaluate_classifier, evaluate_mlm

    model = _tiny_model()
    rng = np.random.default_rng(0)
    inputs = rng.integers(7, 30, (10, 8)).astype(np.int32)
    labels = np.full((10, 8), -100, dtype=np.int32)
    labels[:4, 2] = inputs[:4, 2]  # the last batches hold no label
    seen = []
    with_progress = evaluate_mlm(model, inputs, labels, batch_size=3, on_batch=seen.append)
    assert seen == [3, 3, 3, 1] and with_progress == evaluate_mlm(model, inputs, labels, batch_size=3)
    cls = ufb_mlx.Model(ModelArgs(hidden_size=16, num_layers=1, num_heads=2, vocab_size=30, max_seq_length=8,
                                  fff_depth=2, task="classification", num_labels=2, head_dim=8))
    seen.clear()
    evaluate_classifier(cls, [[7, 8, 9]] * 5, [0, 1, 0, 1, 0], pad_id=0, batch_size=2, on_batch=seen.append)
    assert seen == [2, 2, 1]


def test_the_training_package_does_not_import_the_command_line_layer():
    """ufb_mlx.train is library code: importing it (and the model, data and losses it
    trains) loads no module of the CLI layer (ufb_mlx.entry) nor any tool."""
    import subprocess
    import sys

    code = ("import sys, ufb_mlx.train, ufb_mlx.losses, ufb_mlx.data; "
            "print(sorted(m for m in sys.modules if m in ('ufb_mlx.entry', 'ufb_mlx.finetune', 'ufb_mlx.pretrain', "
            "'ufb_mlx.generate', 'ufb_mlx.classify')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_label_positions_pad_to_a_multiple():
    """The labelled tokens in row-major order, then padding of weight 0 up to the next
    multiple (at least one multiple for a batch without a label)."""
    from ufb_mlx import data

    labels = np.full((3, 10), -100, dtype=np.int32)
    labels[0, 2], labels[2, 7], labels[1, 0] = 11, 33, 22
    pos, targets, weights = data.label_positions(labels, multiple=4)
    assert pos.tolist() == [2, 10, 27, 0] and targets.tolist() == [11, 22, 33, 0]
    assert weights.tolist() == [1, 1, 1, 0]
    assert len(data.label_positions(np.full((2, 5), 7, np.int32), multiple=4)[0]) == 12
    assert data.label_positions(np.full((2, 5), -100, np.int32), multiple=4)[2].tolist() == [0, 0, 0, 0]
