"""Loading, converting and their errors: every bad input gets one line naming the
problem, CLIs exit non-zero, and no partial output folder is left behind."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import ufb_mlx
import ufb_ref
from ufb_mlx.convert import convert
from ufb_ref.checkpoint import read_safetensors
from ufb_ref.errors import UFBError

from conftest import CLS, MLM, REPO
from refusals import assert_one_line_error, copy_golden, edit_weights, run_cli


def run_convert(*args):
    return subprocess.run([sys.executable, str(REPO / "convert.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=REPO)


# ---------------------------------------------------------------------------- converting


def test_convert_cli_writes_a_loadable_folder(tmp_path, mlm_cases):
    out = tmp_path / "out"
    proc = run_convert("--hf-path", MLM, "--mlx-path", out)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
         ".ultrafastbert.json"])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "ultrafastbert" and cfg["source"]["hf_path"] == str(MLM)
    weights, _ = read_safetensors(out / "model.safetensors")
    assert "decoder.weight" not in weights and not any("norm_factor" in k for k in weights)
    assert len(weights) == 27 - 1 - 2  # Hub keys minus decoder.weight and 2 norm_factors


@pytest.mark.parametrize("dtype,atol", [("float16", 5e-3), ("bfloat16", 3e-2)])
def test_convert_half_precision(tmp_path, mlm_cases, dtype, atol):
    """Half-precision weights change logits (|logits| <= 0.67) by their rounding only:
    float16 keeps ~11 bits (observed ~1e-3 here), bfloat16 ~8 bits (observed ~2e-3)."""
    out = convert(str(MLM), tmp_path / dtype, dtype=dtype)
    # Computed in the stored precision (as on a Mac's GPU), and widened to float32, the
    # CPU default (see ufb_mlx.load): both carry only the weights' rounding.
    for load_dtype in (getattr(mx, dtype), None):
        model, _ = ufb_mlx.load(out, dtype=load_dtype)
        want = load_dtype or (mx.float32 if not mx.metal.is_available() else getattr(mx, dtype))
        assert model.encoder.embedding.word_embedding.weight.dtype == want
        logits = model(mlm_cases["input_ids"], attention_mask=mlm_cases["attention_mask"])
        np.testing.assert_allclose(np.array(logits.astype(mx.float32)), mlm_cases["mlm_logits"], atol=atol, rtol=0)
    ref, _ = ufb_ref.load(out)  # the NumPy side reads half-precision files too
    np.testing.assert_allclose(ref(mlm_cases["input_ids"], mlm_cases["attention_mask"]),
                               mlm_cases["mlm_logits"], atol=atol, rtol=0)


def test_convert_refuses_existing_output_without_force(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_one_line_error(run_convert("--hf-path", MLM, "--mlx-path", out), "exists", "--force")
    # --force replaces only a folder convert wrote: this one holds a file of the user's.
    assert_one_line_error(run_convert("--hf-path", MLM, "--mlx-path", out, "--force"),
                          "not a model folder written by this project")
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()  # an empty folder holds nothing to lose
    assert run_convert("--hf-path", MLM, "--mlx-path", out, "--force").returncode == 0
    assert (out / "model.safetensors").is_file() and (out / ".ultrafastbert.json").is_file()
    before = (out / "config.json").stat().st_ino
    assert run_convert("--hf-path", MLM, "--mlx-path", out, "--force", "--dtype", "float16").returncode == 0
    assert (out / "config.json").stat().st_ino != before  # replaced: a folder convert wrote
    assert json.loads((out / "config.json").read_text())["source"]["dtype"] == "float16"


def _bad_key_cases():
    def missing(t):
        del t["encoder.layers.1.ffn.linear_in.bias"]

    def extra(t):
        t["encoder.layers.0.ffn.extra.weight"] = np.zeros((3,), np.float32)

    def misshaped(t):
        t["encoder.layers.0.ffn.linear_in.weight"] = np.zeros((16, 64), np.float32)

    def integer(t):
        t["encoder.final_norm.bias"] = np.zeros((64,), np.int64)

    def untied(t):
        t["decoder.weight"] = t["decoder.weight"] + 1

    return [
        (missing, "missing key 'encoder.layers.1.ffn.linear_in.bias'"),
        (extra, "unexpected key 'encoder.layers.0.ffn.extra.weight'"),
        (misshaped, "'encoder.layers.0.ffn.linear_in.weight' has shape (16, 64), expected (15, 64)"),
        (integer, "'encoder.final_norm.bias' has dtype I64"),
        (untied, "'decoder.weight' differs"),
    ]


@pytest.mark.parametrize("edit,message", _bad_key_cases(), ids=["missing", "extra", "misshaped", "int", "untied"])
def test_convert_rejects_bad_checkpoints(tmp_path, edit, message):
    src = copy_golden(tmp_path)
    edit_weights(src, edit)
    out = tmp_path / "out"
    assert_one_line_error(run_convert("--hf-path", src, "--mlx-path", out), message)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary folder left
    with pytest.raises(UFBError, match=re.escape(message)):
        ufb_mlx.load(src)


def test_convert_rejects_non_fff_config(tmp_path):
    src = copy_golden(tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    cfg["arch"]["intermed_type"] = "gated-glu"
    (src / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    assert_one_line_error(run_convert("--hf-path", src, "--mlx-path", out), "intermed_type", "not an FFF")
    assert not out.exists()


@pytest.mark.parametrize("key,value,needle", [
    ("norm_scheme", "post", "arch.norm_scheme is 'post'"),
    ("nonlin", "GELUglu", "arch.nonlin"),
])
def test_unsupported_arch_values_are_named(tmp_path, key, value, needle):
    src = copy_golden(tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    cfg["arch"][key] = value
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UFBError, match=needle):
        ufb_ref.load(src)


def test_pickled_checkpoint_is_refused(tmp_path):
    src = copy_golden(tmp_path)
    (src / "model.safetensors").rename(src / "pytorch_model.bin")
    out = tmp_path / "out"
    assert_one_line_error(run_convert("--hf-path", src, "--mlx-path", out), "pytorch_model.bin", "never loaded")
    assert not out.exists()


@pytest.mark.parametrize("corruption", ["truncated", "garbage-header", "short"])
def test_corrupted_safetensors(tmp_path, corruption):
    src = copy_golden(tmp_path)
    f = src / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes({"truncated": data[: len(data) // 2], "garbage-header": data[:8] + b"{not json" + data[17:],
                   "short": b"abc"}[corruption])
    assert_one_line_error(run_convert("--hf-path", src, "--mlx-path", tmp_path / "out"),
                          "model.safetensors", "corrupted safetensors")
    with pytest.raises(UFBError, match="corrupted"):
        ufb_ref.load(src)


def test_folder_without_tokenizer(tmp_path):
    src = copy_golden(tmp_path)
    (src / "tokenizer.json").unlink()
    assert_one_line_error(run_convert("--hf-path", src, "--mlx-path", tmp_path / "out"), "no tokenizer.json")
    assert not (tmp_path / "out").exists()
    with pytest.raises(UFBError, match="no tokenizer.json"):
        ufb_mlx.load(src)


def test_folder_without_config_or_weights(tmp_path):
    src = copy_golden(tmp_path)
    (src / "model.safetensors").unlink()
    with pytest.raises(UFBError, match="no model.safetensors"):
        ufb_ref.load(src)
    (src / "config.json").unlink()
    with pytest.raises(UFBError, match="no config.json"):
        ufb_ref.load(src)


def test_unknown_path_is_not_a_hub_id(tmp_path):
    with pytest.raises(UFBError, match="neither a local folder nor a Hub repo id"):
        ufb_mlx.load(str(tmp_path / "does" / "not" / "exist"))


# ---------------------------------------------------------------------------- the Hub


def make_hub_cache(cache: Path, repo_id: str, src: Path) -> None:
    """Lay out a huggingface_hub cache entry (blobs are plain copies here)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for p in src.iterdir():
        if p.name != "cases.npz":
            shutil.copyfile(p, snap / p.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def test_load_hub_id_from_cache_offline(tmp_path, monkeypatch, mlm_cases):
    """A Hub id goes through huggingface_hub.snapshot_download, which with
    HF_HUB_OFFLINE=1 answers from the cache without touching the network."""
    make_hub_cache(tmp_path / "hub", "pbelcak/UltraFastBERT-tiny-test", MLM)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    model, tok = ufb_mlx.load("pbelcak/UltraFastBERT-tiny-test")
    logits = model(mlm_cases["input_ids"], attention_mask=mlm_cases["attention_mask"])
    np.testing.assert_allclose(np.array(logits), mlm_cases["mlm_logits"], atol=1e-5, rtol=0)
    out = convert("pbelcak/UltraFastBERT-tiny-test", tmp_path / "conv")
    assert (out / "model.safetensors").is_file()
    with pytest.raises(UFBError, match="not in the Hugging Face cache"):
        ufb_ref.load("pbelcak/UltraFastBERT-1x11-long")


# ---------------------------------------------------------------------------- inputs


def test_sequence_longer_than_max_seq_length():
    model, tok = ufb_mlx.load(MLM)
    ids = np.full((1, 33), 7)
    with pytest.raises(UFBError, match="sequence length 33 exceeds max_seq_length 32"):
        model(ids)
    ref, _ = ufb_ref.load(MLM)
    with pytest.raises(UFBError, match="exceeds max_seq_length 32"):
        ref(ids)
    with pytest.raises(UFBError, match="more than the model's max_seq_length 32"):
        tok("word " * 40)


@pytest.mark.parametrize("text", ["", "   "])
def test_empty_text(text):
    _, tok = ufb_ref.load(MLM)
    with pytest.raises(UFBError, match="empty text"):
        tok(text)


def test_tokenizer_special_tokens_by_name_and_mask_spellings():
    _, tok = ufb_ref.load(MLM)
    assert (tok.mask_token_id, tok.pad_token_id, tok.sep_token_id) == (4, 6, 5)
    assert tok.encode("the [MASK] river") == tok.encode("the <mask> river")
    assert tok.encode("the river")[-1] == tok.sep_token_id  # template "A <sep>"
    pair = tok.encode("the river", "the sun")
    assert pair[0] == tok.cls_token_id and pair.count(tok.sep_token_id) == 2


def test_fff_mode_is_checked():
    with pytest.raises(UFBError, match="fff_mode must be one of"):
        ufb_mlx.load(MLM, fff_mode="sparse")


def test_classifier_width_comes_from_head_weight(tmp_path, cls_cases):
    """The original sizes the head from transformers' num_labels; a config without
    id2label must still load with head.weight's row count."""
    src = copy_golden(tmp_path, CLS)
    cfg = json.loads((src / "config.json").read_text())
    del cfg["id2label"], cfg["label2id"]
    cfg["arch"]["num_labels"] = None
    (src / "config.json").write_text(json.dumps(cfg))
    model, _ = ufb_mlx.load(src)
    assert model.args.num_labels == 3
    logits = model(cls_cases["input_ids"], attention_mask=cls_cases["attention_mask"])
    np.testing.assert_allclose(np.array(logits), cls_cases["cls_logits"], atol=1e-5, rtol=0)


def test_mlx_parameter_names_are_hub_keys():
    from mlx.utils import tree_flatten

    from ufb_ref.checkpoint import read_safetensors

    model, _ = ufb_mlx.load(CLS)
    names = {k for k, _ in tree_flatten(model.parameters())}
    hub, _ = read_safetensors(CLS / "model.safetensors")
    assert names == {k for k in hub if not k.endswith("norm_factor")}


# ---------------------------------------------------------------------------- other models given as a model

BERT_CONFIG = {"architectures": ["BertForMaskedLM"], "model_type": "bert", "hidden_size": 768,
               "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072, "vocab_size": 30522}


def test_a_dense_bert_folder_is_named_as_such_by_every_tool(tmp_path, train_jsonl):
    """A Hugging Face BERT folder: the error names the folder and says what it is, instead
    of "config.json: missing key 'num_layers'"."""
    bert = tmp_path / "bert-base-uncased"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps(BERT_CONFIG))
    with pytest.raises(UFBError, match=re.escape(f"'{bert}' is a dense BERT (model_type 'bert', BertForMaskedLM)")):
        ufb_ref.load(bert)
    for args in (["-m", "ufb_mlx.generate", "--model", bert, "--prompt", "a [MASK]."],
                 ["convert.py", "--hf-path", bert, "--mlx-path", tmp_path / "out"],
                 ["-m", "ufb_mlx.finetune", "--model", bert, "--train", train_jsonl, "--out", tmp_path / "ft"]):
        assert_one_line_error(run_cli(args), str(bert), "is a dense BERT", "not an UltraFastBERT checkpoint")
    (bert / "config.json").write_text(json.dumps({"model_type": "roberta", "architectures": ["RobertaModel"]}))
    with pytest.raises(UFBError, match="holds a 'roberta' model"):
        ufb_ref.load(bert)
    (bert / "config.json").write_text(json.dumps({"hidden_size": 64}))  # ours, but incomplete: the path is named
    with pytest.raises(UFBError, match=re.escape(f"{bert / 'config.json'}: missing key 'num_layers'")):
        ufb_ref.load(bert)


@pytest.fixture
def train_jsonl(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "a b", "label": 0}\n{"text": "c d", "label": 1}\n')
    return path


def _offline_cache(monkeypatch, cache: Path) -> None:
    import huggingface_hub.constants as c

    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)


def test_a_bare_hub_id_is_a_hub_id(tmp_path, monkeypatch):
    """bert-base-uncased (no owner) is a valid Hub id: offline and not cached it is "not in
    the cache", and once cached it is recognised as the dense BERT it is."""
    _offline_cache(monkeypatch, tmp_path / "hub")
    with pytest.raises(UFBError, match="'bert-base-uncased' is not a local folder, and as a Hub repo id it is not "
                                       "in the Hugging Face cache; HF_HUB_OFFLINE is set") as e:
        ufb_ref.load("bert-base-uncased")
    assert "neither" not in str(e.value)
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(BERT_CONFIG))
    make_hub_cache(tmp_path / "hub", "bert-base-uncased", src)
    with pytest.raises(UFBError, match="is a dense BERT"):
        ufb_mlx.load("bert-base-uncased")


def test_a_dense_bert_on_the_hub_is_refused_before_its_weights_are_downloaded(tmp_path, monkeypatch):
    """Online, the config comes first: a dense BERT never gets its 440 MB downloaded."""
    import huggingface_hub
    import huggingface_hub.constants as c

    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(BERT_CONFIG))
    asked = []
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", lambda self, repo_id, **kw: asked.append(repo_id))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo_id, filename, **kw: asked.append(filename) or cfg)

    def no_snapshot(*a, **kw):
        raise AssertionError("the weights would be downloaded")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_snapshot)
    with pytest.raises(UFBError, match="'bert-base-uncased' is a dense BERT"):
        ufb_ref.load("bert-base-uncased")
    assert asked == ["bert-base-uncased", "config.json"]


def test_a_checkpoint_folder_points_at_the_model_beside_it(tmp_path):
    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "step-00000008"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text('{"step": 8}')
    shutil.copytree(MLM, run, dirs_exist_ok=True)
    with pytest.raises(UFBError, match=re.escape(f"'{ckpt}' is a training checkpoint (for --resume), not a model "
                                                 f"folder: the model is in '{run}'")):
        ufb_mlx.load(ckpt)
    with pytest.raises(UFBError, match=re.escape(f"the model is in '{run}'")):
        ufb_ref.load(run / "checkpoints")


def test_numpy_reference_loads_the_demo_model_by_name():
    """The same interface as ufb_mlx.load: "demo" is the shipped model (not ./demo)."""
    ref, tok = ufb_ref.load("demo")
    model, _ = ufb_mlx.load("demo")
    assert ref.args == model.args
    batch = tok(["The river runs to the [MASK]."])
    want = np.array(model(batch["input_ids"], attention_mask=batch["attention_mask"]))
    got = ref(np.array(batch["input_ids"]), np.array(batch["attention_mask"]))
    # float32 both; the demo's 4-layer forward differs by summation order only
    np.testing.assert_allclose(got, want, atol=1e-3 * np.abs(want).max(), rtol=0)


def test_force_onto_a_training_run_says_what_it_is(tmp_path, train_jsonl):
    out = tmp_path / "ft"
    (out / "checkpoints").mkdir(parents=True)
    (out / "log.jsonl").write_text("{}\n")
    shutil.copy(MLM / "config.json", out)
    assert_one_line_error(run_convert("--hf-path", MLM, "--mlx-path", out, "--force"),
                          "holds a training run (ufb-finetune or ufb-pretrain", "not a converted model")


# ---------------------------------------------------------------------------- reading weights


def test_mlx_load_reads_weights_with_mx_load_only(monkeypatch, mlm_cases):
    """ufb_mlx.load validates the header with the hardened reader, then reads the tensors
    with mx.load (one call, lazy): the NumPy reader never reads a tensor for MLX."""
    from ufb_ref import checkpoint

    read, loads = [], []
    real_read, real_load = checkpoint.SafetensorsFile.read, mx.load
    monkeypatch.setattr(checkpoint.SafetensorsFile, "read", lambda self, k: read.append(k) or real_read(self, k))
    monkeypatch.setattr(mx, "load", lambda *a, **k: loads.append(a[0]) or real_load(*a, **k))
    model, _ = ufb_mlx.load(MLM)
    assert read == [] and loads == [str(MLM / "model.safetensors")]
    logits = model(mlm_cases["input_ids"], attention_mask=mlm_cases["attention_mask"])
    np.testing.assert_allclose(np.array(logits), mlm_cases["mlm_logits"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("golden", [MLM, CLS], ids=["mlm", "cls"])
def test_sanitize_matches_the_reference(golden):
    """Model.sanitize on the raw Hub tensors (mx.load) keeps exactly what the reference's
    sanitize keeps (decoder copy and norm_factor buffers dropped), with the same values;
    each FFF's linear_out.weight holds the same values in its column-major layout."""
    from ufb_ref.checkpoint import sanitize

    model, _ = ufb_mlx.load(golden)
    raw = mx.load(str(golden / "model.safetensors"))
    got = model.sanitize(raw)
    want = sanitize(read_safetensors(golden / "model.safetensors")[0], model.args)
    assert set(got) == set(want) and len(got) < len(raw)
    for k, v in want.items():
        np.testing.assert_array_equal(np.array(got[k]), v, err_msg=k)


def test_count_nonfinite_in_slices():
    """count_nonfinite counts in slices of COUNT_CHUNK elements along the first axis (the
    released model's embedding is 25 slices): the same count as NumPy's for a tensor of
    several slices, NaN and Inf in the first, a middle and the last one, in a transposed
    (column-major) layout as load() makes for linear_out."""
    from ufb_mlx.loading import COUNT_CHUNK, count_nonfinite

    rows, cols = 3 * COUNT_CHUNK // 512 + 7, 512
    w = np.random.default_rng(0).standard_normal((cols, rows)).astype(np.float32)
    for r, c, v in [(0, 0, np.nan), (5, rows // 2, np.inf), (cols - 1, rows - 1, -np.inf), (7, rows - 2, np.nan)]:
        w[r, c] = v
    t = mx.contiguous(mx.array(w).T)                    # (rows, cols), several slices
    assert int(count_nonfinite(t)) == int(count_nonfinite(mx.contiguous(t.T).T)) == 4
    assert int(count_nonfinite(mx.array(w[:3, :3]))) == 1  # one slice
    assert int(count_nonfinite(mx.array(np.float32(np.nan)))) == 1  # a scalar


def test_load_holds_about_one_copy_of_the_weights(tmp_path):
    """Peak resident memory of load() in a fresh process, over its peak after loading the
    demo model, is at most 1.25x the weights file (55 MB): mx.load reads each tensor once
    into its own MLX buffer. Measured: 0.5x (memory the demo's load freed is reused); the
    NumPy round trip load used before (a NumPy and an MLX copy of every tensor) 1.85x."""
    import mlx.nn as nn

    from ufb_ref.config import ModelArgs

    args = ModelArgs.from_dict(dict(hidden_size=256, num_layers=4, num_heads=4, vocab_size=32768,
                                    max_seq_length=128, intermed_type="fff", fff_trees=1, fff_depth=10,
                                    head_dim=256, task="mlm", pad_token_id=6))
    model = ufb_mlx.Model(args)
    model.update(nn.utils.tree_map(lambda p: mx.random.normal(p.shape), model.parameters()))
    folder = ufb_mlx.save_model(tmp_path / "m", model, args, tokenizer_folder=ufb_mlx.DEMO_MODEL)
    size = (folder / "model.safetensors").stat().st_size
    # The demo model first, so that what any first load costs (imports, MLX's threads and
    # kernels, the tokenizer library) is in the baseline.
    script = ("import sys, ufb_mlx\n"
              "hwm = lambda: next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM'))\n"
              "ufb_mlx.load('demo'); before = hwm(); ufb_mlx.load(sys.argv[1]); print(before, hwm())")
    if not Path("/proc/self/status").is_file():
        pytest.skip("needs /proc (Linux) to read the peak resident memory")
    here = str(Path(ufb_mlx.__file__).resolve().parents[1])  # the ufb_mlx under test
    proc = subprocess.run([sys.executable, "-c", script, str(folder)], capture_output=True, text=True,
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": here})
    assert proc.returncode == 0, proc.stderr
    before, after = (int(x) * 1024 for x in proc.stdout.split())
    assert size > 40e6
    assert after - before <= 1.25 * size, (after - before) / size


def test_finite_screen_overflow_is_not_a_refusal(tmp_path):
    """load() screens each tensor by a sum (fast) and counts only when the sum is not
    finite: a float16 column whose sum overflows float16 (899 x 1000 > 65504) holds no
    NaN or Inf and loads; one Inf in it is refused, counted exactly."""
    from ufb_mlx.loading import finite_screen

    out = convert(str(MLM), tmp_path / "f16", dtype="float16")
    key = "encoder.embedding.word_embedding.weight"

    def big_column(t):
        t[key] = t[key].astype(np.float16)
        t[key][:, 0] = 1000.0

    edit_weights(out, big_column)
    weights = mx.load(str(out / "model.safetensors"))
    assert weights[key].dtype == mx.float16 and not mx.isfinite(finite_screen(weights[key])).item()
    model, _ = ufb_mlx.load(out)
    assert float(model.encoder.embedding.word_embedding.weight[5, 0]) == 1000.0

    def one_inf(t):
        t[key] = t[key].astype(np.float16)
        t[key][7, 3] = np.inf

    edit_weights(out, one_inf)
    with pytest.raises(UFBError, match=f"tensor '{key}' holds 1 non-finite value "):
        ufb_mlx.load(out)
