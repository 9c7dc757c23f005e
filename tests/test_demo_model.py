"""The demo model that ships in ufb_mlx/demo_model: it loads with no network, answers
fill-mask prompts as the default model of the generate CLI, the name "demo" means it in
load() and in every tool, and its held-out figures in the model card are reproducible from
the sample that ships with it."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np

import ufb_mlx
from ufb_mlx.generate import build_parser
from ufb_mlx.evaluate import evaluate_mlm

from conftest import MLM, REPO
from train_utils import keyword_task, run_module, toy_corpus, write_jsonl

DEMO = REPO / "ufb_mlx" / "demo_model"


def test_demo_model_is_the_generate_default_and_small():
    assert build_parser().parse_args(["--prompt", "a [MASK]"]).model == "demo" == ufb_mlx.DEMO
    assert ufb_mlx.DEMO_MODEL == DEMO
    weights = DEMO / "model.safetensors"
    assert weights.is_file() and weights.stat().st_size <= 25 * 2**20
    cfg = json.loads((DEMO / "config.json").read_text())
    assert cfg["intermed_type"] == "fff" and cfg["task"] == "mlm"
    for name in ("README.md", "DATA_SOURCES.md", "tokenizer.json", "heldout_sample.npz", "metrics.json"):
        assert (DEMO / name).is_file(), name


def test_sample_figures_reproduce_the_model_card():
    """The card's sample row was measured at export on these float16 weights (widened to
    float32 on CPU, as here): recomputing it differs by summation order only, so a
    masked-token accuracy within 0.002 (4 of ~2000 tokens changing their argmax near a
    tie) and a loss within 1e-3. The sample against the full held-out split: the 64
    blocks are spread evenly over it (its sources come one after another), and such a
    sample's accuracy has a standard error of about sqrt(p(1-p)/n) ~ 0.011 if tokens were
    independent; they cluster by block (spread samples at other offsets differ from the
    full split by up to 2 points), so the check allows 4 of them."""
    metrics = json.loads((DEMO / "metrics.json").read_text())
    sample = np.load(DEMO / "heldout_sample.npz")
    model, _ = ufb_mlx.load(DEMO)
    got = evaluate_mlm(model, sample["input_ids"].astype(np.int32), sample["labels"].astype(np.int32), 32)
    want = metrics["heldout_sample"]
    assert got["masked_tokens"] == want["masked_tokens"]
    assert abs(got["mlm_accuracy"] - want["mlm_accuracy"]) <= 0.002
    assert abs(got["mlm_loss"] - want["mlm_loss"]) <= 1e-3
    full = metrics["heldout"]
    p, n = full["mlm_accuracy"], got["masked_tokens"]
    assert abs(got["mlm_accuracy"] - p) <= 4 * np.sqrt(p * (1 - p) / n)

    card = (DEMO / "README.md").read_text()
    row = re.search(r"\| full held-out split \| (\d+) \| ([\d.]+) \| ([\d.]+) \|", card)
    assert row, "the model card has no full held-out row"
    assert int(row.group(1)) == full["masked_tokens"]
    assert abs(float(row.group(2)) - full["mlm_loss"]) < 1e-4
    assert abs(float(row.group(3)) - full["mlm_accuracy"]) < 1e-4


def test_generate_without_model_uses_the_demo_offline():
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "ufb_mlx.generate", "--prompt", "The [MASK] of the river.",
                           "--json", "--top-k", "3"], capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["model"] == "demo"
    (result,) = out["results"]
    (mask,) = result["masks"]
    assert len(mask["candidates"]) == 3
    assert result["completed"] == f"The {mask['chosen']['token']} of the river."


def test_demo_names_the_shipped_model_everywhere(tmp_path):
    """load("demo") and --model demo (--hf-path demo) in every tool; finetune's --model
    defaults to it. A folder called demo is reached as ./demo."""
    model, tok = ufb_mlx.load("demo")
    assert model.args.vocab_size == tok.vocab_size == json.loads((DEMO / "config.json").read_text())["vocab_size"]
    assert tok.path == DEMO / "tokenizer.json"

    proc = run_module("ufb_mlx.generate", "--model", "demo", "--prompt", "The [MASK] of the river.", "--json")
    assert json.loads(proc.stdout)["model"] == "demo"
    train = write_jsonl(tmp_path / "t.jsonl", keyword_task(24, 0))
    run_module("ufb_mlx.finetune", "--train", train, "--out", tmp_path / "ft", "--max-steps", "2", "--batch-size", "4")
    ft, _ = ufb_mlx.load(tmp_path / "ft")
    assert ft.args.source["finetuned_from"] == "demo" and ft.args.hidden_size == model.args.hidden_size
    proc = run_module("ufb_mlx.classify", "--model", "demo", "--prompt", "a text", check=False)
    assert proc.returncode == 2 and "'demo' is a masked-language model, not a classifier" in proc.stderr
    corpus = toy_corpus(tmp_path / "c.txt", 400, 0)
    run_module("ufb_mlx.pretrain", "--model", "demo", "--corpus", corpus, "--out", tmp_path / "pt", "--steps", "1",
               "--batch-size", "2", "--eval-every", "1")
    assert ufb_mlx.load(tmp_path / "pt")[0].args.source["pretrained_from"] == "demo"
    run_module("convert", "--hf-path", "demo", "--mlx-path", tmp_path / "conv")
    assert (tmp_path / "conv" / "model.safetensors").is_file()
    proc = run_module("ufb_mlx.benchmark", "model", "--model", "demo", "--tiny", "--json")
    assert json.loads(proc.stdout)["config"]["model"] == "demo"


def test_model_card_records_the_finetuning_grids():
    """Each table of the card is the measurements shipped beside it (finetune_grid.json for
    the 5-class corpus task, finetune_grid_NAME.json for another task, written by
    scripts/finetune_grid.py --card), and finetune's "small" recipe is the cell with the
    best validation accuracy averaged over the tasks (cells measured on every task)."""
    from ufb_mlx.finetune import RECIPES

    sys.path.insert(0, str(REPO / "scripts"))
    from finetune_grid import card_markers, card_sections

    sections = card_sections((DEMO / "README.md").read_text())
    assert "" in sections
    assert {card_markers(name)[2] for name in sections} == {p.name for p in DEMO.glob("finetune_grid*.json")}
    mean_valid = {}
    for name, section in sections.items():
        grid = json.loads((DEMO / card_markers(name)[2]).read_text())
        cells = [r for r in grid["runs"] if r["init"] == "pretrained" and not r.get("extra")]
        assert len(cells) >= 4 and len({r["lr"] for r in cells}) >= 2 and len({r["epochs"] for r in cells}) >= 2
        for r in grid["runs"]:
            shown = f"{r['test']['accuracy']:.3f} ({r['test']['macro_f1']:.3f})"
            if r in cells:
                (row,) = [line for line in section.splitlines() if line.startswith(f"| {r['lr']:g} |")]
                assert shown in row, (r, row)
            else:
                assert f"lr {r['lr']:g}, {r['epochs']} epochs: {shown}" in section, r
        assert f"{grid['naive_bayes']['accuracy']:.3f}" in section
        for r in cells:
            mean_valid.setdefault((r["lr"], r["epochs"]), []).append(r["valid_accuracy"])
    on_all = {k: sum(v) / len(v) for k, v in mean_valid.items() if len(v) == len(sections)}
    best = max(on_all, key=on_all.get)
    assert best == (RECIPES["small"]["lr"], RECIPES["small"]["epochs"]), on_all
