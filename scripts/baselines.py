#!/usr/bin/env python3
"""Classical text-classification baselines for a fine-tuning task folder
(TASK/train.jsonl, valid.jsonl, test.jsonl, one {"text", "label"} object a line):

    python scripts/baselines.py TASK [--json OUT.json]

- char n-gram TF-IDF + logistic regression (character 2-5-grams within word boundaries,
  sublinear tf);
- word TF-IDF + logistic regression (lower-cased word unigrams and bigrams, sublinear tf);
- multinomial naive Bayes on word unigram and bigram counts.

Each is fitted on train only (as ufb-finetune is); its one hyperparameter (C of the
logistic regression, alpha of naive Bayes) is the best of a small grid by validation
accuracy, the smallest of a tie; the test split is scored once: accuracy and macro F1
(``scores``, which scripts/finetune_grid.py uses for the fine-tuned models too; the JSON
also has ufb_mlx.metrics's "f1", for two classes the F1 of the second label in sorted
order). Prints a markdown table and, with --json, writes the numbers. Needs scikit-learn: pip install -e ".[dev]".
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ufb_ref.errors import ArgumentParser, UFBError  # noqa: E402

C_GRID = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
ALPHA_GRID = (0.01, 0.03, 0.1, 0.3, 1.0)
NAMES = {"char_tfidf_lr": "char n-gram TF-IDF + logistic regression",
         "word_tfidf_lr": "word TF-IDF + logistic regression",
         "naive_bayes": "multinomial naive Bayes (word unigrams and bigrams)"}


def read_split(task: Path, split: str) -> list[dict]:
    path = task / f"{split}.jsonl"
    if not path.is_file():
        raise UFBError(f"{path} not found (a task folder holds train.jsonl, valid.jsonl and test.jsonl)")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            rows.append({"text": str(r["text"]), "label": str(r["label"])})
        except (ValueError, KeyError, TypeError):
            raise UFBError(f"{path}:{n}: not a JSON object with 'text' and 'label'") from None
    if not rows:
        raise UFBError(f"{path} has no examples")
    return rows


def scores(y_true, y_pred, num_labels: int) -> dict:
    """Accuracy, macro F1 (the unweighted mean of the per-class F1, for two classes too:
    ufb_mlx.metrics.f1 is then the F1 of class 1) and Matthews correlation."""
    import numpy as np
    from ufb_mlx import metrics

    c = metrics.confusion_matrix(y_true, y_pred, num_labels).astype(np.float64)
    tp = np.diag(c)
    denom = 2 * tp + (c.sum(0) - tp) + (c.sum(1) - tp)
    per_class = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    return {**metrics.classification_metrics(y_true, y_pred, num_labels), "macro_f1": float(per_class.mean())}


def _models():
    from sklearn.feature_extraction.text import CountVectorizer, TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.naive_bayes import MultinomialNB

    def lr(c):
        return LogisticRegression(C=c, max_iter=2000)

    return {
        "char_tfidf_lr": (lambda: TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True,
                                                  min_df=2), lr, "C", C_GRID),
        "word_tfidf_lr": (lambda: TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1), lr, "C", C_GRID),
        "naive_bayes": (lambda: CountVectorizer(ngram_range=(1, 2)), lambda a: MultinomialNB(alpha=a), "alpha",
                        ALPHA_GRID),
    }


def run_baselines(task: Path, predictions: bool = False) -> dict:
    """{name: {"accuracy", "f1", "macro_f1", "mcc", "valid_accuracy", hyperparameter: value}} on TASK;
    with ``predictions``, also "test_predictions": the label predicted for each test example."""
    try:
        import sklearn  # noqa: F401
    except ImportError:
        raise UFBError('the baselines need scikit-learn: pip install -e ".[dev]"') from None
    import numpy as np
    from ufb_mlx import metrics

    train, valid, test = (read_split(task, s) for s in ("train", "valid", "test"))
    labels = sorted({r["label"] for r in train})
    unknown = sorted({r["label"] for r in valid + test} - set(labels))
    if unknown:
        raise UFBError(f"{task}: label '{unknown[0]}' of valid/test never occurs in train")

    def y(rows):
        return np.array([labels.index(r["label"]) for r in rows])

    out = {}
    for name, (vectorizer, model, hp, grid) in _models().items():
        vec = vectorizer()
        x_train = vec.fit_transform([r["text"] for r in train])
        x_valid, x_test = (vec.transform([r["text"] for r in rows]) for rows in (valid, test))
        best = None
        for value in grid:  # ascending: a tie keeps the smaller (more regularised) value
            clf = model(value).fit(x_train, y(train))
            acc = metrics.accuracy(y(valid), clf.predict(x_valid))
            if best is None or acc > best[0]:
                best = (acc, value, clf)
        acc, value, clf = best
        pred = clf.predict(x_test)
        out[name] = {**scores(y(test), pred, len(labels)), "valid_accuracy": acc, hp: value}
        if predictions:
            out[name]["test_predictions"] = [labels[i] for i in pred]
    return out


def table(results: dict) -> str:
    lines = ["| baseline | test accuracy | test macro F1 | chosen on valid |", "| --- | --- | --- | --- |"]
    for name, r in results.items():
        hp = "C" if "C" in r else "alpha"
        lines.append(f"| {NAMES[name]} | {r['accuracy']:.3f} | {r['macro_f1']:.3f} | {hp} {r[hp]:g} "
                     f"(valid {r['valid_accuracy']:.3f}) |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = ArgumentParser(prog="python scripts/baselines.py", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("task", type=Path, help="folder with train.jsonl, valid.jsonl, test.jsonl")
    p.add_argument("--json", type=Path, help="also write the numbers here")
    try:
        a = p.parse_args(argv)
        results = run_baselines(a.task)
    except UFBError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.json:
        from ufb_ref.fsio import atomic_write_text
        atomic_write_text(a.json, json.dumps(results, indent=2) + "\n")
    print(table(results), end="")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
