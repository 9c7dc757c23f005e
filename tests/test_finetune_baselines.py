"""The parts of scripts/baselines.py that need no scikit-learn (it is a dev extra, not a
test dependency): the scores every row of the fine-tuning tables uses, reading a task,
and the one-line error without scikit-learn; and scripts/finetune_compare.py's seeds (its
table, and the --seed its runs get) and its paired test (McNemar's p by hand, the paired
table, the predictions it is made from). The baselines themselves are measured, not
tested: see docs/demo_model.md."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from ufb_ref.errors import UFBError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import baselines  # noqa: E402


def test_macro_f1_is_the_mean_of_per_class_f1_for_two_classes_too():
    # class 0: tp 1, fp 1, fn 1 -> F1 1/2; class 1: tp 2, fp 1, fn 1 -> F1 2/3
    s = baselines.scores([0, 0, 1, 1, 1], [0, 1, 1, 1, 0], 2)
    assert s["macro_f1"] == pytest.approx((1 / 2 + 2 / 3) / 2, abs=1e-12)
    assert s["f1"] == pytest.approx(2 / 3, abs=1e-12)  # ufb_mlx.metrics: class 1's F1
    assert s["accuracy"] == pytest.approx(3 / 5)
    # a class never predicted nor true scores 0 (it still counts in the mean)
    assert baselines.scores(np.array([0, 1]), np.array([0, 1]), 3)["macro_f1"] == pytest.approx(2 / 3)


def test_reading_a_task_names_the_bad_line(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"text": "a", "label": "x"}\n\n{"text": "b"}\n')
    with pytest.raises(UFBError, match=r"train.jsonl:3: not a JSON object with 'text' and 'label'"):
        baselines.read_split(tmp_path, "train")
    with pytest.raises(UFBError, match="valid.jsonl not found"):
        baselines.read_split(tmp_path, "valid")


def test_without_scikit_learn_one_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn -> ImportError
    assert baselines.main([str(tmp_path)]) == 2
    assert capsys.readouterr().err == 'error: the baselines need scikit-learn: pip install -e ".[dev]"\n'


def test_compare_table_gives_each_seed_and_their_mean_and_spread():
    import finetune_compare

    def run(acc, f1, seed):
        return {"lr": 5e-4, "epochs": 3, "steps": 9, "best_epoch": 3, "cpu_s": 60.0, "seed": seed,
                "test": {"accuracy": acc, "macro_f1": f1, "truncated": 0}}

    runs = {"pretrained": run(0.97, 0.96, 0), "pretrained-seed1": run(0.98, 0.95, 1),
            "pretrained-seed2": run(0.96, 0.91, 2), "random": run(0.5, 0.4, 0)}
    md = finetune_compare.table(Path("t"), {"train": 9, "valid": 3, "test": 1000, "labels": 2}, runs, {})
    rows = [line for line in md.splitlines() if line.startswith("| fine-tuned") or line.startswith("| `--init")]
    assert [r.split(" | ")[0] for r in rows] == [
        "| fine-tuned, defaults, --seed 0", "| fine-tuned, defaults, --seed 1", "| fine-tuned, defaults, --seed 2",
        "| fine-tuned, defaults: mean of the 3 seeds (sample standard deviation)", "| `--init random`, defaults"]
    # mean 0.97, sample standard deviation 0.01; macro F1 mean 0.94, sd sqrt((4 + 1 + 9) / 2) / 100
    assert "| 0.970 (0.010) | 0.940 (0.026) |" in rows[3]
    # one seed: no mean row, no seed in the label (the table as it was before --seeds)
    one = finetune_compare.table(Path("t"), {"train": 9, "valid": 3, "test": 1000, "labels": 2},
                                 {"pretrained": runs["pretrained"]}, {})
    assert "| fine-tuned, defaults | 0.970 | 0.960 |" in one and "mean of" not in one


def test_grid_run_passes_its_seed_and_refuses_another_seeds_folder(tmp_path):
    """finetune_grid.finetune (used by finetune_compare --seeds) runs ufb_mlx.finetune with
    --seed and records it; a finished folder is reused only for the same seed."""
    import finetune_grid
    from conftest import MLM
    from train_utils import keyword_task, write_jsonl

    task = tmp_path / "task"
    task.mkdir()
    for split, n, seed in (("train", 32, 0), ("valid", 16, 1), ("test", 16, 2)):
        write_jsonl(task / f"{split}.jsonl", keyword_task(n, seed))
    out = tmp_path / "run"
    rec = finetune_grid.finetune(task, out, 1e-3, 1, "pretrained", str(MLM), max_steps=2, seed=3)
    start = next(r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if r["event"] == "start")
    assert rec["seed"] == start["seed"] == 3 and rec["steps"] == 2
    assert 0 <= rec["test"]["accuracy"] <= 1
    # the paired table's predictions are the labels the recorded accuracy was scored from
    test = finetune_grid.read_jsonl(task / "test.jsonl")
    pred = finetune_grid.test_predictions(out, test)
    assert set(pred) <= {r["label"] for r in test}
    assert sum(p == r["label"] for p, r in zip(pred, test)) / len(test) == pytest.approx(rec["test"]["accuracy"])
    assert finetune_grid.finetune(task, out, 1e-3, 1, "pretrained", str(MLM), max_steps=2, seed=3) == rec
    with pytest.raises(UFBError, match="fine-tuned with --seed 3, not 0: give a new --out"):
        finetune_grid.finetune(task, out, 1e-3, 1, "pretrained", str(MLM), max_steps=2, seed=0)


def test_mcnemar_exact_p_values_by_hand():
    import finetune_compare

    p = finetune_compare.mcnemar_p
    assert p(0, 0) == 1.0 and p(15, 15) == 1.0  # nothing to tell apart; an even split
    assert p(10, 0) == pytest.approx(2 / 2 ** 10) == p(0, 10)  # all ten disagreements one way
    assert p(3, 1) == pytest.approx(2 * (1 + 4) / 16)  # P(X <= 1), X ~ Binomial(4, 1/2), both tails
    assert p(1, 2) == 1.0  # the doubled tail is capped


def test_compare_table_pairs_each_run_with_each_baseline():
    import finetune_compare

    truth = ["a"] * 6 + ["b"] * 4
    # seed 0 gets examples 0-8 right; the baseline 2-9: only seed 0 has 0 and 1, only the baseline 9
    preds = {"pretrained": ["a"] * 6 + ["b"] * 3 + ["a"],
             "char_tfidf_lr": ["b", "b"] + ["a"] * 4 + ["b"] * 4}
    base = {"char_tfidf_lr": {"accuracy": 0.8, "macro_f1": 0.8, "C": 1.0}}
    run = {"lr": 5e-4, "epochs": 3, "steps": 9, "best_epoch": 3, "cpu_s": 60.0, "seed": 0,
           "test": {"accuracy": 0.9, "macro_f1": 0.9, "truncated": 0}}
    md = finetune_compare.table(Path("t"), {"train": 9, "valid": 3, "test": 10, "labels": 2}, {"pretrained": run},
                                base, truth, preds)
    assert f"| --seed 0 | 2 / 1 (p {finetune_compare.mcnemar_p(2, 1):.2g}) |" in md.splitlines()
    assert finetune_compare.paired(truth, preds["pretrained"], preds["char_tfidf_lr"]) == (2, 1, 1.0)
    # without predictions, the table is as before: no paired part
    assert "Paired" not in finetune_compare.table(Path("t"), {"train": 9, "valid": 3, "test": 10, "labels": 2},
                                                  {"pretrained": run}, base)
