"""The reproducers of issue 17 ("nothing lost, nothing silently wrong, round 2"): a
--force run that fails on an option validated late (D1), an --out overlapping an input
(D2), --force on a folder the project did not write (D3), locks on the path as typed (D4),
an interrupted replace (D5); success reported for a broken result (S1-S4); primitive calls
that crashed the process (C1-C5); tracebacks and poor messages where one named line was
promised. Each ends in one line and exit 2 with every file as it was, or in a correct
result."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
import numpy as np
import pytest

from conftest import MLM
from refusals import assert_one_line_error, copy_golden, run_cli, tree_state
from train_utils import count_task, keyword_task, load_weights, read_log, toy_corpus, write_jsonl
from ufb_mlx import train
from ufb_mlx.entry import errors_to_exit
from ufb_ref import fsio
from ufb_ref.errors import UFBError


# These tests damage, resume and replace the checkpoints a finished run leaves: keep them
# (a finished run keeps none by default, --keep 0).
KEEP = ["--keep", "2"]


def finetune(*args, **kw):
    return run_cli(["-m", "ufb_mlx.finetune", *args, *([] if "--keep" in args else KEEP)], **kw)


def pretrain(*args, **kw):
    return run_cli(["-m", "ufb_mlx.pretrain", *args, *([] if "--keep" in args else KEEP)], **kw)


PT_TINY = ["--config", "tiny", "--seq-length", "16", "--batch-size", "4", "--eval-every", "2", "--log-every", "1"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    write_jsonl(d / "train.jsonl", keyword_task(32, 0))
    toy_corpus(d / "corpus.txt", 300, 0)
    return d


@pytest.fixture(scope="module")
def ft_run(data_dir, tmp_path_factory):
    """A finished fine-tuning run: 4 steps, checkpoints at 2 and 4, a model, a marker."""
    out = tmp_path_factory.mktemp("ft") / "run"
    proc = finetune("--model", MLM, "--train", data_dir / "train.jsonl", "--out", out, "--max-steps", "4",
                    "--batch-size", "8", "--save-every", "2", "--quiet")
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="module")
def pt_run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("pt") / "run"
    proc = pretrain("--corpus", data_dir / "corpus.txt", "--out", out, *PT_TINY, "--steps", "2", "--quiet")
    assert proc.returncode == 0, proc.stderr
    return out


def _copy(run: Path, tmp_path: Path, name: str = "run") -> Path:
    dst = tmp_path / name
    shutil.copytree(run, dst, symlinks=True)
    return dst


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


# ---------------------------------------------------------------------------- D1: --force validates first


@pytest.mark.parametrize("extra,needle", [
    (["--warmup", "2"], "--warmup must be a fraction in [0, 1)"),
    (["--warmup", "nan"], "--warmup must be a fraction in [0, 1)"),
    (["--head-dim", "100000"], "'head_dim' must be in"),
    (["--seed", "-1"], "--seed must be an integer in [0, 2^64)"),
    (["--seed", str(2**64)], "--seed must be an integer in [0, 2^64)"),
    # S2: floats are validated in float32, the precision they are used in
    (["--lr", "1e39"], "--lr must be positive and a normal float32"),
    (["--eps", "1e-46"], "--eps must be positive and a normal float32"),
    (["--weight-decay", "inf"], "--weight-decay must be a finite float32"),
    (["--betas", "0.9", "0.99999999999"], "float32 rounds it to 1"),
], ids=["warmup2", "warmup-nan", "head-dim", "seed-1", "seed2^64", "lr1e39", "eps1e-46", "wd-inf", "beta-1"])
def test_finetune_force_with_a_bad_option_keeps_the_previous_run(ft_run, data_dir, tmp_path, extra, needle):
    """Before: --force emptied the folder, then the option failed (or, for the floats,
    trained a NaN model)."""
    out = _copy(ft_run, tmp_path)
    before = tree_state(tmp_path)
    proc = finetune("--model", MLM, "--train", data_dir / "train.jsonl", "--out", out, "--force", "--max-steps", "1",
                    *extra)
    assert_one_line_error(proc, needle)
    assert tree_state(tmp_path) == before


@pytest.mark.parametrize("extra,needle", [
    (["--seed", str(2**70)], "--seed must be an integer in [0, 2^64)"),
    (["--warmup", "2"], "--warmup must be a fraction in [0, 1)"),
    (["--valid-fraction", "0.999"], "leaves no training block"),
    # (run_cli's 1.5 GiB address-space limit: MLX crashed with SIGSEGV on the failed allocation)
    (["--batch-size", "100000"], "--batch-size 100000: one step of 1600000 tokens needs at least"),
    (["--vocab-size", "0"], "--vocab-size must be more than the 7 special tokens"),  # (hostile pass: 0 meant the default)
], ids=["seed2^70", "warmup2", "valid-fraction", "batch-size", "vocab-size0"])
def test_pretrain_force_with_a_bad_option_keeps_the_previous_run(pt_run, data_dir, tmp_path, extra, needle):
    out = _copy(pt_run, tmp_path)
    before = tree_state(tmp_path)
    proc = pretrain("--corpus", data_dir / "corpus.txt", "--out", out, "--force", *PT_TINY, "--steps", "1", *extra)
    assert_one_line_error(proc, needle)
    assert tree_state(tmp_path) == before


def test_pretrain_batches_spanning_many_epochs(data_dir, tmp_path):
    """A global batch longer than 5 epochs of the corpus: before, a KeyError traceback
    (after --force had cleared the folder); now the batch cycles through the epochs."""
    corpus = toy_corpus(tmp_path / "small.txt", 40, 1)
    out = tmp_path / "out"
    proc = pretrain("--corpus", corpus, "--out", out, "--config", "tiny", "--seq-length", "16", "--batch-size", "200",
                    "--steps", "2", "--eval-every", "2", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert (out / "model.safetensors").is_file()


# ---------------------------------------------------------------------------- D2: --out never overlaps an input


def test_pretrain_out_onto_its_own_tokenizer_is_refused(pt_run, data_dir, tmp_path):
    """Before: the tokenizer the run was told to use was deleted, then "model saved", exit 0."""
    out = _copy(pt_run, tmp_path)
    before = tree_state(tmp_path)
    proc = pretrain("--corpus", data_dir / "corpus.txt", "--tokenizer", out, "--out", out, "--force", *PT_TINY,
                    "--steps", "1")
    assert_one_line_error(proc, "overlaps the input")
    assert tree_state(tmp_path) == before


@pytest.mark.parametrize("where", ["model", "train"])
def test_finetune_out_holding_an_input_is_refused(ft_run, data_dir, tmp_path, where):
    """--model X/checkpoints/mymodel --out X --force deleted the input model."""
    out = _copy(ft_run, tmp_path)
    model, data = MLM, data_dir / "train.jsonl"
    if where == "model":
        model = copy_golden(out / "checkpoints", name="mymodel")
    else:
        data = shutil.copy(data, out / "checkpoints" / "data.jsonl")
    before = tree_state(tmp_path)
    assert_one_line_error(finetune("--model", model, "--train", data, "--out", out, "--force", "--max-steps", "1"),
                          "overlaps the input")
    assert tree_state(tmp_path) == before


# ---------------------------------------------------------------------------- D3: --force replaces only our folders


@pytest.mark.parametrize("tool", ["finetune", "pretrain"])
def test_force_keeps_a_folder_this_project_did_not_write(data_dir, tmp_path, tool):
    """A user's folder holding a config.json: before, --force removed it."""
    user = tmp_path / "user"
    user.mkdir()
    (user / "config.json").write_text('{"mine": true}')
    (user / "log.jsonl").write_text("my log\n")
    before = tree_state(tmp_path)
    if tool == "finetune":
        proc = finetune("--model", MLM, "--train", data_dir / "train.jsonl", "--out", user, "--force")
    else:
        proc = pretrain("--corpus", data_dir / "corpus.txt", "--out", user, "--force", *PT_TINY, "--steps", "1")
    assert_one_line_error(proc, "not a model folder written by this project")
    assert tree_state(tmp_path) == before


def test_force_replaces_a_run_of_ours_and_its_leftovers(ft_run, data_dir, tmp_path):
    """What --force may remove: everything the marker lists, and temporaries a killed run
    left beside them; the new run writes its own marker."""
    out = _copy(ft_run, tmp_path)
    (out / ".log.jsonl.tmp-999999999-0123abcd").write_text("half")
    proc = finetune("--model", MLM, "--train", data_dir / "train.jsonl", "--out", out, "--force", "--max-steps", "1",
                    "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000001"]
    assert not (out / ".log.jsonl.tmp-999999999-0123abcd").exists()
    assert json.loads((out / fsio.MARKER).read_text())["kind"] == "run"


@pytest.mark.parametrize("tool", ["finetune", "pretrain"])
@pytest.mark.parametrize("out", [".", "..", "", "/", "//", "sub/..", "CWD-PARENT"])
def test_out_is_never_the_current_folder_a_parent_or_the_root(data_dir, tmp_path, tool, out):
    """finetune accepted '.', '..' and ''; '/', '//' and 'x/..' ended in a traceback."""
    cwd = tmp_path / "work"
    (cwd / "sub").mkdir(parents=True)
    out = str(tmp_path) if out == "CWD-PARENT" else out
    before = tree_state(tmp_path)
    if tool == "finetune":
        proc = finetune("--model", MLM, "--train", data_dir / "train.jsonl", "--out", out, "--force", cwd=cwd)
    else:
        proc = pretrain("--corpus", data_dir / "corpus.txt", "--out", out, "--force", *PT_TINY, cwd=cwd)
    assert_one_line_error(proc, "--out")
    assert tree_state(tmp_path) == before


# ---------------------------------------------------------------------------- D4, D5: locks and interrupted replaces


def test_the_lock_is_taken_on_the_resolved_path(tmp_path):
    real = tmp_path / "concA"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    with fsio.folder_lock(real):
        with pytest.raises(UFBError, match="being written by another process"):
            with fsio.folder_lock(tmp_path / "link"):
                pass


def test_a_run_through_a_symlink_waits_for_the_run_on_its_target(data_dir, tmp_path):
    """Before: both proceeded, and the second deleted the first's files mid-run."""
    real = tmp_path / "concA"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    with fsio.folder_lock(real):
        proc = finetune("--model", MLM, "--train", data_dir / "train.jsonl", "--out", tmp_path / "link", "--max-steps", "1")
    assert_one_line_error(proc, "being written by another process")
    assert not any(real.iterdir())


def _interrupt_replace(dest: Path) -> Path:
    """What a kill between atomic_folder's two renames leaves: no ``dest``, the previous
    version renamed aside by a process that is gone."""
    old = dest.with_name(f".{dest.name}.old-{_dead_pid()}-0123abcd")
    os.rename(dest, old)
    return old


def test_an_interrupted_replace_is_recovered_not_deleted(tmp_path):
    dest = tmp_path / "model"
    dest.mkdir()
    (dest / "weights").write_text("the only copy")
    old = _interrupt_replace(dest)
    assert fsio.clean_stale_temporaries(dest) == []  # before: [old], and the only copy was gone
    assert (dest / "weights").read_text() == "the only copy" and not old.exists()
    old = _interrupt_replace(dest)
    with fsio.atomic_folder(dest, replace=True) as tmp:  # a writer restores it first, then replaces it
        assert (dest / "weights").read_text() == "the only copy" and not old.exists()
        (tmp / "weights").write_text("new")
    assert (dest / "weights").read_text() == "new"


def test_resume_finds_a_checkpoint_whose_replace_was_interrupted(ft_run, tmp_path):
    out = _copy(ft_run, tmp_path)
    _interrupt_replace(out / "checkpoints" / "step-00000004")
    step, path = train.check_out(out, resume=True, force=False)
    assert step == 4 and (path / "model.safetensors").is_file()


# ---------------------------------------------------------------------------- S1: NaN metrics


@pytest.mark.parametrize("rows,needle", [
    (count_task(1, 1), "needs at least 2 validation examples with different labels (1 example)"),
    ([dict(r, label=2.0) for r in count_task(6, 1)], "all 6 labels are 2"),
], ids=["one-row", "constant"])
def test_regression_validation_that_pearson_cannot_score_is_refused(data_dir, tmp_path, rows, needle):
    """Before: Pearson was NaN at every epoch, no model was written, "model saved", exit 0."""
    train_file = write_jsonl(tmp_path / "train.jsonl", count_task(16, 0))
    valid = write_jsonl(tmp_path / "valid.jsonl", rows)
    before = tree_state(tmp_path)
    proc = finetune("--model", MLM, "--train", train_file, "--valid", valid, "--task", "regression",
                    "--out", tmp_path / "out", "--max-steps", "1")
    assert_one_line_error(proc, "valid.jsonl", needle)
    assert tree_state(tmp_path) == before


def test_a_metric_that_is_nan_at_every_epoch_still_ends_with_a_model(tmp_path, capsys, monkeypatch):
    """Constant predictions make Pearson NaN however the labels vary: each evaluation says
    so, and the run saves its final model instead of none."""
    from ufb_mlx import finetune as ft

    real = ft.evaluate_classifier

    def nan_pearson(*a, **kw):
        return dict(real(*a, **kw), pearson=math.nan)

    monkeypatch.setattr(ft, "evaluate_classifier", nan_pearson)
    train_file = write_jsonl(tmp_path / "train.jsonl", count_task(16, 0))
    out = tmp_path / "out"
    rc = errors_to_exit(ft.main, ["--model", str(MLM), "--train", str(train_file), "--valid", str(train_file),
                                  "--task", "regression", "--out", str(out), "--epochs", "2", "--batch-size", "8"])
    text = capsys.readouterr().out
    assert rc == 0
    assert text.count("pearson is NaN: it cannot select a model") == 2
    assert "no epoch had a finite pearson: the final model is saved" in text
    assert (out / "model.safetensors").is_file()
    results = json.loads((out / "train_results.json").read_text())
    assert results["value"] is None and results["step"] == 4


# ---------------------------------------------------------------------------- S2: non-finite weights after the update


def test_an_update_that_makes_the_weights_nonfinite_saves_nothing(data_dir, tmp_path):
    """--lr 3e38 is finite in float32, but the first update overflows the weights; the
    loss and gradients (checked before the update) are finite. Before: the NaN model was
    saved as the result (one step) or as checkpoint 1, which the error then said was kept."""
    out = tmp_path / "out"
    proc = finetune("--model", MLM, "--train", data_dir / "train.jsonl", "--out", out, "--lr", "3e38", "--warmup", "0",
                    "--max-steps", "1", "--save-every", "1")
    assert_one_line_error(proc, "step 1: the loss is", "but a gradient or an updated weight is NaN or infinite",
                          "no checkpoint or model had been written yet")
    assert not (out / "model.safetensors").exists() and not (out / "checkpoints").exists()


# ---------------------------------------------------------------------------- S3: resumed state is checked


@pytest.fixture(scope="module")
def restorable(ft_run):
    """(checkpoint, a fresh model and optimizer of the run) for in-process restores."""
    from ufb_mlx import load

    model, _ = load(ft_run)
    opt = train.make_optimizer(train.make_schedule("cosine", 1e-4, 4, 0.1))
    return ft_run / "checkpoints" / "step-00000004", model, opt


def _tamper(ckpt: Path, tmp_path: Path, file: str, edit) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(ckpt, dst)
    if file.endswith(".json"):
        state = json.loads((dst / file).read_text())
        edit(state)
        (dst / file).write_text(json.dumps(state))
    else:
        arrays = dict(mx.load(str(dst / file)))
        edit(arrays)
        mx.save_safetensors(str(dst / file), arrays)
    return dst


def _first(arrays, suffix):
    return next(k for k in sorted(arrays) if k.endswith(suffix))


@pytest.mark.parametrize("file,edit,needle", [
    ("optimizer.safetensors", lambda a: a.update({(k := _first(a, ".m")): mx.full(a[k].shape, math.nan)}),
     "is not finite"),
    ("optimizer.safetensors", lambda a: a.update({(k := _first(a, "weight.v")): mx.ones((1,) * a[k].ndim)}),
     "this run needs float32"),
    ("optimizer.safetensors", lambda a: a.update({(k := _first(a, ".m")): a[k].astype(mx.float16)}),
     "is float16"),
    ("optimizer.safetensors", lambda a: [a.pop(k) for k in sorted(a)[::2]], "lacks"),
    ("model.safetensors", lambda a: a.update({(k := _first(a, "norm.weight")): a[k] > 0}), "is bool"),
    ("model.safetensors", lambda a: a.update({"pooler.extra": mx.zeros((2,))}), "holds 'pooler.extra'"),
    ("trainer_state.json", lambda s: s.update(step=-3), "'step' must be a non-negative integer"),
    ("trainer_state.json", lambda s: s.update(step=True), "'step' must be a non-negative integer"),
    ("trainer_state.json", lambda s: s.update(run="abc"), "'run' must be an object"),
], ids=["nan-moment", "broadcastable-shape", "float16-moment", "half-state", "bool-weight", "extra-weight",
        "negative-step", "bool-step", "string-run"])
def test_a_damaged_checkpoint_is_refused_before_anything_is_restored(restorable, tmp_path, file, edit, needle):
    """Before: NaN moments, a broadcastable shape or another dtype were used silently (the
    final all-NaN model overwrote the good one); the others ended in a traceback."""
    ckpt, model, opt = restorable
    bad = _tamper(ckpt, tmp_path, file, edit)
    before = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    with pytest.raises(UFBError, match="cannot read the checkpoint") as e:
        train.restore_checkpoint(bad, model, opt)
    assert needle in str(e.value) and "\n" not in str(e.value)
    after = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    assert all(np.array_equal(before[k], after[k]) for k in before)
    train.restore_checkpoint(ckpt, model, opt)  # the undamaged one restores


def _resumable(ft_run, tmp_path) -> Path:
    out = _copy(ft_run, tmp_path)
    shutil.rmtree(out / "checkpoints" / "step-00000004")  # killed after step 2's checkpoint
    return out


def _resume(out, data_dir):
    return finetune("--model", MLM, "--train", data_dir / "train.jsonl", "--out", out, "--max-steps", "4",
                    "--batch-size", "8", "--save-every", "2", "--resume", "--quiet")


def test_resume_with_a_best_result_without_metrics_is_one_line(ft_run, data_dir, tmp_path):
    out = _resumable(ft_run, tmp_path)
    state = out / "checkpoints" / "step-00000002" / "trainer_state.json"
    s = json.loads(state.read_text())
    s["best"] = {"value": 0.5}
    state.write_text(json.dumps(s))
    assert_one_line_error(_resume(out, data_dir), "best result is malformed")


def test_resume_from_a_step_beyond_the_run_is_one_line(ft_run, data_dir, tmp_path):
    """Found by the hostile pass: an edited step 10**20 said "nothing to do: the run
    already finished", exit 0."""
    out = _resumable(ft_run, tmp_path)
    state = out / "checkpoints" / "step-00000002" / "trainer_state.json"
    state.write_text(json.dumps(dict(json.loads(state.read_text()), step=10**20)))
    assert_one_line_error(_resume(out, data_dir), "claims step 100000000000000000000, beyond the run's 4 steps")


def test_resume_over_malformed_log_records(ft_run, data_dir, tmp_path):
    """Records whose step is not a whole number (before: a TypeError traceback) are dropped
    with the others after the checkpoint."""
    out = _resumable(ft_run, tmp_path)
    with open(out / "log.jsonl", "a") as f:
        f.write('{"event": "train", "step": "x"}\n{"event": "train", "step": [1]}\n')
    proc = _resume(out, data_dir)
    assert proc.returncode == 0, proc.stderr
    records = read_log(out)
    assert all(isinstance(r.get("step", 0), int) for r in records), records
    assert [r["step"] for r in records if r["event"] == "train"] == [4]  # (--log-every 10: the last step only)
    assert [r["step"] for r in records if r["event"] == "checkpoint"] == [2, 4]


def test_pretrain_resuming_a_finetune_folder_names_a_key(ft_run, data_dir, tmp_path):
    """Before: "Missing 4 parameters: " with an empty list."""
    out = _copy(ft_run, tmp_path)
    proc = pretrain("--corpus", data_dir / "corpus.txt", "--out", out, "--resume", *PT_TINY, "--steps", "4")
    err = assert_one_line_error(proc, "no readable checkpoint")
    assert "'head." in err or "'pooler." in err or "lacks" in err, err


# ---------------------------------------------------------------------------- S4, C1-C3: the C++ primitives


def _primitive(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` with ``ext`` (the C++ extension), ``mx`` and ``np`` in a subprocess: a
    crash must not take the test run with it."""
    prelude = "import mlx.core as mx, numpy as np\nfrom ufb_mlx import _ext as ext\n"
    return run_cli(["-c", prelude + textwrap.dedent(code)], timeout=120, memory=4 * 2**30)


def _refused(code: str, needle: str) -> None:
    body = textwrap.indent(textwrap.dedent(code).strip(), "    ")
    proc = _primitive("try:\n" + body + "\n    print('NO ERROR')\nexcept ValueError as e:\n    print('ValueError:', e)\n")
    assert proc.returncode == 0, f"exit {proc.returncode} (negative: a signal)\n{proc.stderr[-2000:]}"
    assert f"ValueError: {needle}" in proc.stdout, proc.stdout + proc.stderr[-2000:]


pytestmark_ext = pytest.mark.skipif(not __import__("ufb_mlx").cpu_kernels.available(),
                                    reason="the C++ extension is not built")


@pytestmark_ext
def test_shapeless_compile_revalidates_the_fff_weights():
    """S4: smaller weights on the second call read out of bounds (8.4e32, no error)."""
    _refused("""
        f = mx.compile(lambda x, a, b, c: ext.fff_forward(x, a, b, c, 1, 2)[0], shapeless=True)
        x, wi, bi, wo = mx.ones((4, 8)), mx.ones((7, 8)), mx.zeros((7,)), mx.ones((8, 7))
        mx.eval(f(x, wi, bi, wo))
        mx.eval(f(x, wi[:3], bi[:3], wo[:, :3]))
    """, "[ufb.fff_forward] w_in must be")


@pytestmark_ext
@pytest.mark.parametrize("code,needle", [
    ("""
        f = mx.compile(lambda x, a, b, c: ext.fff_forward(x, a, b, c, 1, 2)[0], shapeless=True)
        mx.eval(f(mx.ones((4, 8)), mx.ones((7, 8)), mx.zeros((7,)), mx.ones((8, 7))))
        mx.eval(f(mx.ones((4, 4096)), mx.ones((7, 8)), mx.zeros((7,)), mx.ones((8, 7))))
    """, "[ufb.fff_forward]"),
    ("""
        f = mx.compile(lambda x, w, b: ext.layer_norm(x, w, b, 1e-5)[0], shapeless=True)
        mx.eval(f(mx.ones((2, 4)), mx.ones((4,)), mx.zeros((4,))))
        mx.eval(f(mx.ones((2, 1 << 20)), mx.ones((4,)), mx.zeros((4,))))
    """, "[ufb.layer_norm]"),
    ("""
        f = mx.compile(lambda q, m: ext.attention(q, m, 2, 1.0)[0], shapeless=True)
        mx.eval(f(mx.ones((1, 3, 12)), mx.ones((1, 3))))
        mx.eval(f(mx.ones((1, 3, 9)), mx.ones((1, 3))))
    """, "[ufb.attention]"),
    ("""
        f = mx.compile(lambda q, m: ext.attention(q, m, 2, 1.0)[0], shapeless=True)
        mx.eval(f(mx.ones((1, 3, 12)), mx.ones((1, 3))))
        mx.eval(f(mx.ones((1, 5, 12)), mx.ones((1, 3))))
    """, "[ufb.attention] mask"),
], ids=["fff-wider-x", "layer-norm-wider-row", "attention-width", "attention-mask"])
def test_shapeless_compile_with_inputs_the_weights_do_not_fit(code, needle):
    """C3: a wider x or LayerNorm row than the weights: SIGSEGV."""
    _refused(code, needle)


@pytestmark_ext
@pytest.mark.parametrize("heads,width", [(1431655766, 6), (10**9, 0), (4, 0), (3, 6)],
                         ids=["3heads-overflows-int32", "huge-heads-zero-width", "heads-zero-width", "no-column"])
def test_attention_refuses_impossible_head_counts(heads, width):
    """C2: 3 * heads overflowed int32 (SIGSEGV); a huge count on a zero-width input ran for
    minutes allocating ~11 GB."""
    _refused(f"mx.eval(ext.attention(mx.ones((1, 2, {width})), mx.ones((1, 2)), {heads}, 1.0))",
             "[ufb.attention] qkv must be")


@pytestmark_ext
def test_zero_width_rows_give_empty_results():
    """C1: layer_norm on a zero-width last axis died of SIGFPE; attention with one head and
    no columns gives an empty result too."""
    proc = _primitive("""
        x = mx.zeros((3, 0))
        y = ext.layer_norm(x, mx.zeros((0,)), mx.zeros((0,)), 1e-5)[0]
        g = mx.grad(lambda x, w, b: ext.layer_norm(x, w, b, 1e-5)[0].sum(), argnums=(0, 1, 2))(
            x, mx.zeros((0,)), mx.zeros((0,)))
        a = ext.attention(mx.ones((2, 3, 0)), mx.ones((2, 3)), 1, 1.0)[0]
        mx.eval(y, g, a)
        print("shapes", y.shape, [t.shape for t in g], a.shape)
    """)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "shapes (3, 0) [(3, 0), (0,), (0,)] (2, 3, 0)" in proc.stdout


# ---------------------------------------------------------------------------- C4, C5: bounded memory


@pytest.mark.parametrize("tokens,needle", [("1000000000", "more than 2^31 - 1 elements"),
                                           ("8000000", "GiB, more than the")])
def test_benchmark_refuses_token_counts_that_cannot_fit(tokens, needle):
    """C4: SIGSEGV (np.array of an array MLX failed to allocate)."""
    assert_one_line_error(run_cli(["-m", "ufb_mlx.benchmark", "layer", "--tiny", "--tokens", tokens]), needle)


def test_check_negative_seed_is_one_line():
    """Found by the hostile pass: a ValueError traceback from NumPy's generator."""
    assert_one_line_error(run_cli(["-m", "ufb_mlx.check", "--seed", "-1", "--configs", "0"]), "--seed must be 0 or more")


@pytest.mark.parametrize("bench", ["model", "train"])
def test_benchmark_refuses_batches_that_cannot_fit(bench):
    """Found by the fresh hostile pass: `train --tiny --batch 1000000` died of SIGSEGV."""
    proc = run_cli(["-m", "ufb_mlx.benchmark", bench, "--tiny", "--batch", "1000000", "--hf-python", "none"][
        : None if bench == "model" else -2])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --batch 1000000 --seq 16: one step"), proc.stderr


def test_check_refuses_configurations_that_cannot_fit():
    """C5: --configs 100000 grew ~300 MB/s until the OOM killer ended it at 24 GB; now
    the estimate (the shapes only, a few seconds; about 31 GiB) refuses it against the
    memory the process may use (run_cli's 1.5 GiB address space)."""
    from ufb_mlx import check

    assert check.problem_shapes(6, 3) == [(p.trees, p.depth, p.x.shape[1], p.x.shape[0])
                                          for p in check.random_problems(6, 3)]
    for count in ("100000", str(10**12)):  # (10**12: the estimate stops early)
        assert_one_line_error(run_cli(["-m", "ufb_mlx.check", "--configs", count]), f"--configs {count}", "GiB")


# ---------------------------------------------------------------------------- tracebacks -> one line


@pytest.mark.parametrize("tool", ["finetune", "pretrain", "convert"])
def test_a_full_disk_is_one_line(data_dir, tmp_path, tool):
    """MLX's "[write] Unable to write N bytes" was not matched by entry.py: a traceback.
    RLIMIT_FSIZE stands in for a full disk (a write past it fails with EFBIG)."""
    out = tmp_path / "out"
    if tool == "finetune":
        proc = finetune("--model", MLM, "--train", data_dir / "train.jsonl", "--out", out, "--max-steps", "1",
                        file_size=300_000)
    elif tool == "pretrain":
        proc = pretrain("--corpus", data_dir / "corpus.txt", "--out", out, *PT_TINY, "--steps", "1", file_size=50_000)
    else:
        proc = run_cli(["convert.py", "--hf-path", MLM, "--mlx-path", out], file_size=300_000)
    err = assert_one_line_error(proc)
    assert "Unable to write" in err or "File too large" in err, err
    if tool == "convert":  # written into a temporary folder: nothing is left (but a lock file)
        assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


@pytest.mark.parametrize("tool", ["finetune", "pretrain"])
def test_a_tokenizer_whose_unk_token_is_not_in_its_vocabulary(data_dir, tmp_path, tool):
    """Before: "Exception: WordPiece error: Missing [UNK] token" (a traceback) on the first
    unknown word; generate handled it."""
    model = copy_golden(tmp_path)
    tok = json.loads((model / "tokenizer.json").read_text())
    tok["model"]["unk_token"] = "<nounk>"
    (model / "tokenizer.json").write_text(json.dumps(tok))
    if tool == "finetune":
        proc = finetune("--model", model, "--train", data_dir / "train.jsonl", "--out", tmp_path / "o")
    else:
        proc = pretrain("--corpus", data_dir / "corpus.txt", "--tokenizer", model, "--out", tmp_path / "o", *PT_TINY)
    assert_one_line_error(proc, "unk_token '<nounk>' is not in its vocabulary")
    assert not (tmp_path / "o").exists()


def test_a_post_processor_that_is_a_number(data_dir, tmp_path):
    model = copy_golden(tmp_path)
    tok = json.loads((model / "tokenizer.json").read_text())
    tok["post_processor"] = 5
    (model / "tokenizer.json").write_text(json.dumps(tok))
    assert_one_line_error(finetune("--model", model, "--train", data_dir / "train.jsonl", "--out", tmp_path / "o"),
                          "tokenizer.json")


def test_generate_with_stdin_closed():
    proc = run_cli(["-m", "ufb_mlx.generate", "--model", MLM, "--prompt", "-"], close_stdin=True)
    assert_one_line_error(proc, "stdin is closed")


def test_generate_output_the_terminal_cannot_encode():
    proc = run_cli(["-m", "ufb_mlx.generate", "--model", MLM, "--prompt", "café [MASK]"],
                   extra_env={"PYTHONIOENCODING": "ascii"})
    assert_one_line_error(proc, "standard output's encoding is ascii", "PYTHONIOENCODING=utf-8")


def test_an_out_path_with_undecodable_bytes(data_dir, tmp_path):
    """Before: training finished, then printing the path raised UnicodeEncodeError (and
    MLX cannot save into such a path: std::bad_cast). Refused before anything is written."""
    out = os.fsencode(tmp_path) + b"/out\xff"
    before = tree_state(tmp_path)
    proc = finetune("--model", MLM, "--train", data_dir / "train.jsonl", "--out", out, "--max-steps", "1")
    assert_one_line_error(proc, "is not valid UTF-8")
    proc = run_cli(["convert.py", "--hf-path", MLM, "--mlx-path", out])
    assert_one_line_error(proc, "is not valid UTF-8")
    assert tree_state(tmp_path) == before


def test_benchmark_plot_path_is_checked_before_the_work():
    """Before: the whole benchmark ran, then savefig raised on the .txt suffix."""
    pytest.importorskip("matplotlib")
    proc = run_cli(["-m", "ufb_mlx.benchmark", "layer", "--tiny", "--plot", "out.txt"])
    assert_one_line_error(proc, "--plot 'out.txt'", "png")
    assert "[layer]" not in proc.stdout + proc.stderr  # nothing was measured


# ---------------------------------------------------------------------------- poor messages


@pytest.mark.parametrize("args,needle", [
    (["-m", "ufb_mlx.generate", "--bogus"], "unrecognized arguments: --bogus"),
    (["-m", "ufb_mlx.finetune", "--trian", "x.jsonl"], "unrecognized arguments: --trian"),
    (["-m", "ufb_mlx.benchmark", "layer", "--budget", "nan"], "--budget must be a positive number"),
])
def test_unknown_options_are_named(args, needle):
    """Before: "the following arguments are required: --prompt" hid the mistyped option."""
    assert_one_line_error(run_cli(args), needle)


def test_cpu_isa_names_the_choices():
    from ufb_mlx.cpu_kernels import check_isa

    check_isa("", ["avx2", "generic"])
    check_isa("avx2", ["avx2", "generic"])
    with pytest.raises(UFBError, match="this CPU does not support avx512; choose one of avx2, generic"):
        check_isa("avx512", ["avx2", "generic"])
    with pytest.raises(UFBError, match=r"names are lower case: avx2\); choose one of avx2, generic"):
        check_isa("AVX2", ["avx2", "generic"])
    with pytest.raises(UFBError, match="not an instruction set of the CPU kernels"):
        check_isa("sse9", ["generic"])


@pytestmark_ext
def test_cpu_isa_from_the_environment_is_an_error_not_a_fallback():
    """Before: UFB_CPU_ISA=AVX2 silently ran the generic kernels."""
    proc = run_cli(["-m", "ufb_mlx.generate", "--model", MLM, "--prompt", "the [MASK] river"],
                   extra_env={"UFB_CPU_ISA": "AVX2"})
    assert_one_line_error(proc, "UFB_CPU_ISA='AVX2'", "choose one of")


@pytest.mark.parametrize("args,needle", [
    (["--max-mb-per-source", "-5"], "'-5': a cap is a number of MB >= 0"),
    (["--max-mb-per-source", "nan"], "'nan': a cap is a number of MB >= 0"),
    (["--max-mb-per-group", "web=-1"], "'web=-1'"),
    (["--min-words", "10", "--max-words", "2"], "1 <= min <= max, got 10 and 2"),
    (["--jobs", "0"], "--jobs must be at least 1"),
])
def test_corpus_builder_options_are_checked_before_downloading(tmp_path, capsys, args, needle):
    """Before: accepted; the builder downloaded everything before failing (or used them)."""
    from ufb_corpus import build

    rc = build.cli(["--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"), *args])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and needle in err, err
    assert not any(tmp_path.iterdir())
