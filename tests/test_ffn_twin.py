"""The dense-feedforward twin (``intermed_type`` "ffn"): the crammedBERT FFN block
gelu(x W_in^T + b) W_out^T in place of the FFF tree, used to measure the paper's claim
against a dense model of the same width. No Hub checkpoint of it exists, so the
golden-style checks are: MLX against the float64 NumPy reference (forward), MLX
gradients against float64 central differences of the reference loss, conversion, and
training that lowers the loss."""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten

import ufb_mlx
import ufb_ref
from ufb_mlx.convert import convert
from ufb_mlx.losses import mlm_loss
from ufb_mlx.model import Model
from ufb_ref.checkpoint import read_safetensors
from ufb_ref.config import ModelArgs
from ufb_ref.losses import mlm_loss as ref_mlm_loss

from conftest import MLM


@pytest.fixture(scope="module")
def twin(tmp_path_factory):
    """A small random FFN twin saved as a converted folder with the golden tokenizer."""
    args = ModelArgs(hidden_size=32, num_layers=2, num_heads=2, vocab_size=899, max_seq_length=32,
                     intermed_type="ffn", ffn_width=15)
    mx.random.seed(0)
    model = Model(args)
    params = dict(tree_flatten(model.parameters()))
    rng = np.random.default_rng(0)
    params = {k: mx.array(rng.normal(size=v.shape).astype(np.float32) * (0.3 if v.ndim > 1 else 0.1) + (1 if "norm" in k and k.endswith("weight") else 0))
              for k, v in params.items()}
    folder = tmp_path_factory.mktemp("twin") / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(args.to_dict()))
    mx.save_safetensors(str(folder / "model.safetensors"), params)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).write_bytes((MLM / name).read_bytes())
    return folder


def batch(tok):
    return tok(["The baker lit his ovens before the sun.", "Ducks ate bread on the lake."])


def test_twin_forward_matches_float64_reference(twin):
    """float32 against float64 with weights of size ~0.3: summation-order rounding only,
    observed ~1e-6 on logits of size ~5; 1e-4 absolute leaves room and still catches any
    wrong block (a missing bias or GELU changes logits by > 1e-2)."""
    ref, tok = ufb_ref.load(twin, dtype=np.float64)
    model, _ = ufb_mlx.load(twin)
    b = batch(tok)
    want = ref(b["input_ids"], b["attention_mask"])
    got = np.array(model(b["input_ids"], attention_mask=b["attention_mask"]))
    assert got.shape == want.shape == (2, b["input_ids"].shape[1], 899)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_twin_gradients_match_finite_differences(twin):
    """MLX float32 gradients of the MLM loss against float64 central differences of the
    reference loss (step 1e-6: truncation error ~1e-12, rounding ~1e-10) at a few
    coordinates of the FFN weights and the embedding. Tolerance 1e-4 relative to the
    gradient's scale: float32 backprop error is ~1e-6 of it."""
    ref, tok = ufb_ref.load(twin, dtype=np.float64)
    model, _ = ufb_mlx.load(twin)
    b = batch(tok)
    labels = np.full(b["input_ids"].shape, -100)
    labels[0, 2], labels[1, 3], labels[0, 5] = 17, 40, b["input_ids"][0, 5]
    _, grads = nn.value_and_grad(model, lambda *a: mlm_loss(model, *a))(b["input_ids"], b["attention_mask"], labels)
    grads = dict(tree_flatten(grads))
    rng = np.random.default_rng(1)
    for key in ("encoder.layers.0.ffn.linear_in.weight", "encoder.layers.1.ffn.linear_in.bias",
                "encoder.layers.1.ffn.linear_out.weight", "encoder.embedding.word_embedding.weight"):
        g = np.array(grads[key])
        scale = np.abs(g).max()
        flat = np.argsort(-np.abs(g).reshape(-1))[:3].tolist() + rng.integers(0, g.size, 2).tolist()
        for i in flat:
            idx = np.unravel_index(i, g.shape)
            w = ref.weights[key]
            old = w[idx]
            w[idx] = old + 1e-6
            up = ref_mlm_loss(ref(b["input_ids"], b["attention_mask"]), labels)
            w[idx] = old - 1e-6
            down = ref_mlm_loss(ref(b["input_ids"], b["attention_mask"]), labels)
            w[idx] = old
            assert abs((up - down) / 2e-6 - g[idx]) <= 1e-4 * scale, (key, idx)


def test_twin_converts_and_trains(twin, tmp_path):
    out = convert(str(twin), tmp_path / "conv", dtype="float16")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["intermed_type"] == "ffn" and cfg["ffn_width"] == 15
    _, dtypes = read_safetensors(out / "model.safetensors")
    assert set(dtypes.values()) == {"F16"}
    half, tok = ufb_mlx.load(out, dtype=mx.float16)
    assert half.encoder.layers[0].ffn.linear_in.weight.dtype == mx.float16

    model, _ = ufb_mlx.load(twin)
    b = batch(tok)
    labels = np.where(b["attention_mask"] == 1, b["input_ids"], -100)
    opt = optim.AdamW(learning_rate=1e-2)
    step = nn.value_and_grad(model, lambda *a: mlm_loss(model, *a))
    losses = []
    for _ in range(15):
        loss, grads = step(b["input_ids"], b["attention_mask"], labels)
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state)
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]


def test_hub_config_with_dense_ffn_is_refused():
    """Hub crammedBERT configs are FFF-only here: anything else is named, not guessed."""
    cfg = json.loads((MLM / "config.json").read_text())
    cfg["arch"]["intermed_type"] = "ffn"
    with pytest.raises(ufb_ref.UFBError, match="not an FFF crammedBERT"):
        ModelArgs.from_dict(cfg)
