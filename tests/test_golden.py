"""Both backends against the original implementation's own outputs (tests/data/golden).

Tolerances (float32 everywhere unless stated; ATOL and GRAD_RTOL are ufb_mlx.check's,
which `python -m ufb_mlx.check` applies on a user's machine):
- hidden states and logits: ATOL = 1e-5 absolute. A correct float32 implementation lands
  near 2e-6 on hidden states of magnitude 3.5 (summation order only); the tanh
  approximation of GELU lands near 3e-5, so 1e-5 tells the two apart.
- routing paths: exact. The smallest routing margin in the golden data is 2.9e-4, three
  orders of magnitude above float32 rounding of the logits.
- MLM/classifier loss: 1e-5 absolute (stored loss 6.59 / 1.10; the golden README measures
  4.8e-7 between two float32 summation orders).
- gradients: 1e-5 relative to each gradient's max-abs entry (observed here below 1e-6).
- the float64 reference against the stored float32 outputs: the same 1e-5, because the
  stored values carry float32 rounding of their own.
"""

from __future__ import annotations

import contextlib

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

import ufb_mlx
import ufb_ref
from ufb_mlx import fff as mlx_fff
from ufb_mlx.check import ATOL, GRAD_RTOL
from ufb_mlx.metal_emu import metal_kernels
from ufb_mlx.losses import classification_loss, mlm_loss
from ufb_ref.losses import mlm_loss as ref_mlm_loss

from conftest import CLS, MLM, require_extension

# "conditional-gather" forces every level through the gather/scatter path (no top-level
# matmul), so both halves of the conditional implementation meet the golden data;
# "conditional-metal" runs the Metal kernels of metal/ (forward and backward): on the GPU
# on a Mac, else through the emulator (ufb_mlx.metal_emu.metal_kernels decides);
# "conditional-cpu" the fused C++ primitive of csrc/ (ufb_mlx._ext, forward and its vjp),
# with the extension's fused attention; "dense-cpu" the masked-dense FFF with the
# extension's GELU and attention.
MLX_MODES = ["conditional", "conditional-gather", "conditional-metal", "conditional-cpu", "dense", "dense-cpu"]


@pytest.fixture
def load_mlx(monkeypatch):
    """load_mlx(path, mode) -> (model, tokenizer) for one of MLX_MODES, for this test."""
    with contextlib.ExitStack() as stack:

        def load(path, mode):
            backend = "ops"
            if mode == "conditional-gather":
                monkeypatch.setattr(mlx_fff, "TOP_LEVELS", 0)
            if mode == "conditional-metal":
                stack.enter_context(metal_kernels())
                backend = "metal"
            if mode.endswith("-cpu"):
                require_extension()
                backend = "cpu"
            return ufb_mlx.load(path, fff_mode="dense" if mode.startswith("dense") else "conditional",
                                backend=backend)

        yield load


@pytest.mark.parametrize("folder", [MLM, CLS], ids=["mlm", "cls"])
def test_tokenizer_ids_match_golden(folder):
    cases = np.load(folder / "cases.npz")
    _, tok = ufb_ref.load(folder)
    batch = tok(list(cases["texts"]))
    np.testing.assert_array_equal(batch["input_ids"], cases["input_ids"])
    np.testing.assert_array_equal(batch["attention_mask"], cases["attention_mask"])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("mode", ["descent", "dense"])
def test_reference_mlm_matches_golden(mlm_cases, dtype, mode):
    model, _ = ufb_ref.load(MLM, dtype=dtype, mode=mode)
    paths = []
    hidden = model.encode(mlm_cases["input_ids"], mlm_cases["attention_mask"], paths)
    np.testing.assert_allclose(hidden, mlm_cases["hidden"], atol=ATOL, rtol=0)
    logits = model(mlm_cases["input_ids"], attention_mask=mlm_cases["attention_mask"])
    assert logits.shape == mlm_cases["mlm_logits"].shape and logits.dtype == dtype
    np.testing.assert_allclose(logits, mlm_cases["mlm_logits"], atol=ATOL, rtol=0)
    np.testing.assert_array_equal(np.stack(paths), mlm_cases["paths"])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("mode", ["descent", "dense"])
def test_reference_classifier_matches_golden(cls_cases, dtype, mode):
    model, _ = ufb_ref.load(CLS, dtype=dtype, mode=mode)
    paths = []
    hidden = model.encode(cls_cases["input_ids"], cls_cases["attention_mask"], paths)
    np.testing.assert_allclose(hidden, cls_cases["hidden"], atol=ATOL, rtol=0)
    np.testing.assert_array_equal(np.stack(paths), cls_cases["paths"])
    logits = model(cls_cases["input_ids"], attention_mask=cls_cases["attention_mask"])
    assert logits.shape == (3, 3)
    np.testing.assert_allclose(logits, cls_cases["cls_logits"], atol=ATOL, rtol=0)


def test_reference_mlm_loss_matches_golden(mlm_cases):
    model, _ = ufb_ref.load(MLM, dtype=np.float64)
    logits = model(mlm_cases["input_ids"], attention_mask=mlm_cases["attention_mask"])
    assert abs(ref_mlm_loss(logits, mlm_cases["labels"]) - mlm_cases["loss"]) < ATOL


@pytest.mark.parametrize("source", ["hub-folder", "converted"])
@pytest.mark.parametrize("mode", MLX_MODES)
def test_mlx_mlm_matches_golden(mlm_cases, converted_mlm, source, mode, load_mlx):
    model, _ = load_mlx(MLM if source == "hub-folder" else converted_mlm, mode)
    ids, mask = mlm_cases["input_ids"], mlm_cases["attention_mask"]
    paths = []
    hidden = model.encode(ids, mask, paths)
    np.testing.assert_allclose(np.array(hidden), mlm_cases["hidden"], atol=ATOL, rtol=0)
    np.testing.assert_array_equal(np.stack([np.array(p) for p in paths]), mlm_cases["paths"])
    logits = model(mx.array(ids), attention_mask=mx.array(mask))  # MLX inputs work too
    assert logits.shape == (3, 24, 899)
    np.testing.assert_allclose(np.array(logits), mlm_cases["mlm_logits"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("source", ["hub-folder", "converted"])
@pytest.mark.parametrize("mode", MLX_MODES)
def test_mlx_classifier_matches_golden(cls_cases, converted_cls, source, mode, load_mlx):
    model, _ = load_mlx(CLS if source == "hub-folder" else converted_cls, mode)
    paths = []
    hidden = model.encode(cls_cases["input_ids"], cls_cases["attention_mask"], paths)
    np.testing.assert_allclose(np.array(hidden), cls_cases["hidden"], atol=ATOL, rtol=0)
    np.testing.assert_array_equal(np.stack([np.array(p) for p in paths]), cls_cases["paths"])
    logits = model(cls_cases["input_ids"], attention_mask=cls_cases["attention_mask"])
    assert logits.shape == (3, 3)
    np.testing.assert_allclose(np.array(logits), cls_cases["cls_logits"], atol=ATOL, rtol=0)


def _grads(model, loss_fn, cases):
    loss, grads = nn.value_and_grad(model, lambda *a: loss_fn(model, *a))(
        cases["input_ids"], cases["attention_mask"], cases["labels"])
    return float(loss), {k: np.array(v) for k, v in tree_flatten(grads)}


def _assert_grads(grads, cases):
    names = [k for k in cases if k.startswith("grad/")]
    assert names
    for name in names:
        want = cases[name]
        got = grads[name[len("grad/"):]]
        scale = np.abs(want).max()
        np.testing.assert_allclose(got, want, atol=GRAD_RTOL * scale, rtol=0, err_msg=name)


@pytest.mark.parametrize("mode", MLX_MODES)
def test_mlx_mlm_loss_and_gradients_match_golden(mlm_cases, mode, load_mlx):
    model, _ = load_mlx(MLM, mode)
    loss, grads = _grads(model, mlm_loss, mlm_cases)
    assert abs(loss - float(mlm_cases["loss"])) < ATOL
    _assert_grads(grads, mlm_cases)


def test_padding_row_gets_no_lookup_gradient(mlm_cases):
    """Row 0 (arch pad_token_id, here <unk>, which occurs in the input) must get only the
    decoder's gradient. Letting the lookup feed it would move row 0 by up to 1.3e-3 of
    the gradient's max, 130x the tolerance used here."""
    model, _ = ufb_mlx.load(MLM)
    assert (mlm_cases["input_ids"] == 0).sum() == 2
    _, grads = _grads(model, mlm_loss, mlm_cases)
    key = "encoder.embedding.word_embedding.weight"
    want = mlm_cases["grad/" + key]
    np.testing.assert_allclose(grads[key][0], want[0], atol=GRAD_RTOL * np.abs(want).max(), rtol=0)
    # and the rule is what makes the difference: without it row 0 would be off
    model.encoder.embedding.pad_token_id = -1
    _, loose = _grads(model, mlm_loss, mlm_cases)
    assert np.abs(loose[key][0] - want[0]).max() > 100 * GRAD_RTOL * np.abs(want).max()


@pytest.mark.parametrize("mode", MLX_MODES)
def test_mlx_classifier_loss_and_gradients_match_golden(cls_cases, mode, load_mlx):
    model, _ = load_mlx(CLS, mode)
    loss, grads = _grads(model, classification_loss, cls_cases)
    assert abs(loss - float(cls_cases["loss"])) < ATOL
    _assert_grads(grads, cls_cases)


def test_float64_reference_agrees_with_float32_backends(mlm_cases):
    """float64 is the ground truth for float32 rounding: the float32 reference and MLX
    differ from it by summation-order rounding only (~1e-6 on logits of size 0.7), so the
    same 1e-5 absolute bound applies; routing is identical (margins 2.9e-4)."""
    ids, mask = mlm_cases["input_ids"], mlm_cases["attention_mask"]
    m64, _ = ufb_ref.load(MLM, dtype=np.float64)
    m32, _ = ufb_ref.load(MLM, dtype=np.float32)
    mm, _ = ufb_mlx.load(MLM)
    truth = m64(ids, mask)
    np.testing.assert_allclose(m32(ids, mask), truth, atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.array(mm(ids, attention_mask=mask)), truth, atol=ATOL, rtol=0)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("task", ["mlm", "mlm_at", "cls"])
def test_training_step_minimises_the_golden_loss(mlm_cases, cls_cases, task, compiled):
    """The trainer's loss is the golden-tested one: a step on the golden batch (scale =
    1 / count, as one process) reports the stored loss (same 1e-5 bound), eagerly and as
    the compiled step. "mlm_at" is pretraining's form: the labelled positions padded to a
    fixed count with weight 0 (ufb_mlx.data.label_positions)."""
    from ufb_mlx import data
    from ufb_mlx.losses import mlm_loss_at
    from ufb_mlx.train import Trainer, World, make_optimizer

    cases, folder = (cls_cases, CLS) if task == "cls" else (mlm_cases, MLM)
    loss = {"mlm": mlm_loss, "mlm_at": mlm_loss_at, "cls": classification_loss}[task]
    model, _ = ufb_mlx.load(folder)
    count = len(cases["labels"]) if task == "cls" else int((cases["labels"] != -100).sum())
    trainer = Trainer(model, make_optimizer(lambda step: mx.array(0.0)), loss, World(), seed=0, compile=compiled)
    batch = {k: mx.array(cases[k]) for k in ("input_ids", "attention_mask", "labels")}
    if task == "mlm_at":
        labels = batch.pop("labels")
        pos, targets, weights = data.label_positions(np.array(labels), count + 5)
        assert weights.sum() == count and len(weights) == count + 5  # padded to the multiple, weighted out
        batch.update(positions=mx.array(pos), targets=mx.array(targets), weights=mx.array(weights))
    elif task == "mlm":
        batch["labels"] = cases["labels"]  # host labels: mlm_loss selects the positions with NumPy
    assert abs(trainer.step(1, batch, 1.0 / count) - float(cases["loss"])) < ATOL
    assert trainer.compile == (compiled and task != "mlm")  # host data runs the eager step
