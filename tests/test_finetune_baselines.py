"""The parts of scripts/baselines.py that need no scikit-learn (it is a dev extra, not a
test dependency): the scores every row of the fine-tuning tables uses, reading a task,
and the one-line error without scikit-learn. The baselines themselves are measured, not
tested: see docs/demo_model.md."""

from __future__ import annotations

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
