"""`python -m ufb_mlx.grow`: progressive stacking of the tiny golden MLM. Layer i of the
new model is the old layer i mod depth, everything else is kept, the folder loads and
pretrains, and bad input is refused in one line with nothing written."""

from __future__ import annotations

import json
import re

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

import ufb_mlx
from conftest import MLM
from train_utils import load_weights, read_log, run_module
from ufb_mlx.entry import errors_to_exit
from ufb_mlx.grow import main, stack
from ufb_ref.errors import UFBError

LAYER = re.compile(r"encoder\.layers\.(\d+)\.(.+)")


@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    old, _ = ufb_mlx.load(MLM)
    depth = old.args.num_layers
    out = tmp_path_factory.mktemp("grow") / "model"
    proc = run_module("ufb_mlx.grow", "--model", MLM, "--layers", 2 * depth, "--out", out)
    assert f"stacked {depth} layers into {2 * depth}" in proc.stdout
    return old, out


def test_layer_i_is_the_old_layer_i_mod_depth_and_the_rest_is_kept(grown):
    old, out = grown
    depth = old.args.num_layers
    before = {k: np.array(v) for k, v in dict(tree_flatten(old.parameters())).items()}
    after = load_weights(out / "model.safetensors")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_layers"] == 2 * depth and cfg["source"]["stacked_layers"] == f"{depth} -> {2 * depth}"
    assert "dtype" not in cfg["source"]
    layer_keys = [k for k in after if LAYER.fullmatch(k)]
    assert {int(LAYER.fullmatch(k).group(1)) for k in layer_keys} == set(range(2 * depth))
    assert len(after) == len(before) + len(layer_keys) // 2
    for key, value in after.items():
        m = LAYER.fullmatch(key)
        src = f"encoder.layers.{int(m.group(1)) % depth}.{m.group(2)}" if m else key
        np.testing.assert_array_equal(value, before[src], err_msg=key)


def test_the_grown_model_runs_and_pretraining_continues(grown, tmp_path):
    old, out = grown
    model, tok = ufb_mlx.load(out)
    assert len(model.encoder.layers) == 2 * old.args.num_layers
    logits = np.array(model(mx.array([tok.encode("the [MASK] of the text")])))
    assert np.isfinite(logits).all()
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(f"line {i} of a small corpus for two steps of pretraining" for i in range(64)))
    run = tmp_path / "run"
    run_module("ufb_mlx.pretrain", "--model", out, "--corpus", corpus, "--out", run, "--steps", "2",
               "--batch-size", "2", "--eval-every", "1", "--quiet")
    evals = [r for r in read_log(run) if r["event"] == "eval"]
    assert evals and all(np.isfinite(r["mlm_loss"]) for r in evals)
    assert json.loads((run / "config.json").read_text())["num_layers"] == 2 * old.args.num_layers


def test_bad_input(grown, tmp_path, capsys):
    old, out = grown
    depth = old.args.num_layers
    cases = [
        (["--model", MLM, "--layers", depth, "--out", tmp_path / "a"], f"multiple of the model's {depth} layers"),
        (["--model", MLM, "--layers", 2 * depth + 1, "--out", tmp_path / "b"], f"got {2 * depth + 1}"),
        (["--model", MLM, "--layers", 2 * depth, "--out", out], "exists"),
        (["--model", tmp_path / "nowhere", "--layers", 2 * depth, "--out", tmp_path / "c"], "nowhere"),
    ]
    for argv, needle in cases:
        capsys.readouterr()
        assert errors_to_exit(main, list(map(str, argv))) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert not any((tmp_path / n).exists() for n in "abc")
    classifier = old.args.__class__.from_dict(dict(old.args.to_dict(), task="classification", num_labels=2,
                                                             head_dim=8))
    with pytest.raises(UFBError, match="is a classifier"):
        stack({}, classifier, 2 * depth)
