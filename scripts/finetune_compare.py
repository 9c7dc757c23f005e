#!/usr/bin/env python3
"""Fine-tuning a pretrained model with the defaults, against the baselines, on one task:

    python scripts/finetune_compare.py --model MODEL --task TASK --out OUT

TASK is a folder with train.jsonl, valid.jsonl and test.jsonl ({"text", "label"} a line),
e.g. what scripts/build_spam_task.py or `scripts/finetune_grid.py --task-only` writes.
Runs ``ufb_mlx.finetune`` twice with every option at its default (--recipe auto): from
MODEL's weights and with --init random (the same architecture and tokenizer, nothing
learnt); scores each kept model (best validation accuracy) on the test split; fits the
classical baselines of scripts/baselines.py (char n-gram and word TF-IDF + logistic
regression, naive Bayes: scikit-learn, ``pip install -e ".[dev]"``); writes OUT/runs/*,
OUT/compare.json and the table OUT/compare.md. A finished run is not run again (a new
MODEL needs a new OUT). --max-steps cuts both runs short (a quick check of the commands).
--seeds N fine-tunes MODEL N times, with ``--seed`` 0 to N-1 (data order, dropout and the
new head's initialisation), and adds their mean and spread to the table: one run's test
accuracy moves by about a standard error from seed to seed, more than the margins between
the models here often are. Each run is also paired with each baseline on the test
examples (which examples only one of the two gets right, and McNemar's exact test): the
paired view says whether a gap of a few examples is a difference at all.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from baselines import NAMES, read_split, run_baselines  # noqa: E402
from finetune_grid import finetune, test_predictions  # noqa: E402
from ufb_ref.errors import ArgumentParser, UFBError  # noqa: E402


def mcnemar_p(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: of the b + c examples that exactly one of two
    classifiers gets right, how unlikely a split this uneven is if each were equally
    likely to be the one (a binomial test at 1/2). Paired, so it sees what two accuracies
    on the same test examples cannot: 23 errors each may be the same 23 or 46 different."""
    n = b + c
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired(truth: list[str], ours: list[str], theirs: list[str]) -> tuple[int, int, float]:
    """(examples only OURS gets right, examples only THEIRS gets right, McNemar's p)."""
    b = sum(o == t != h for t, o, h in zip(truth, ours, theirs, strict=True))
    c = sum(h == t != o for t, o, h in zip(truth, ours, theirs, strict=True))
    return b, c, mcnemar_p(b, c)


def paired_table(truth: list[str], runs: dict, baselines: dict, predictions: dict) -> list[str]:
    lines = ["", f"Paired on the {len(truth)} test examples: how many only the fine-tuned run gets right / only the "
                 "baseline gets right, and the two-sided exact McNemar p-value of that split (a small p: the two "
                 "really differ; near 1: a tie).", "",
             "| fine-tuned run | " + " | ".join(NAMES[b] for b in baselines) + " |",
             "| --- |" + " --- |" * len(baselines)]
    for name, r in runs.items():
        what = "`--init random`" if name == "random" else f"--seed {r.get('seed', 0)}"
        cells = [paired(truth, predictions[name], predictions[b]) for b in baselines]
        lines.append(f"| {what} | " + " | ".join(f"{b} / {c} (p {p:.2g})" for b, c, p in cells) + " |")
    return lines


def table(task: Path, sizes: dict, runs: dict, baselines: dict, truth: list[str] | None = None,
          predictions: dict | None = None) -> str:
    """The markdown table; with the test labels (TRUTH) and every run's and baseline's
    test PREDICTIONS ({name: [label, ...]}), also the paired comparison."""
    n = sizes["test"]
    lines = [f"Task `{task}`: {sizes['train']} training, {sizes['valid']} validation, {n} test examples, "
             f"{sizes['labels']} classes. Test accuracy and macro F1; the fine-tuned rows keep the epoch of best "
             "validation accuracy.", "",
             "| model | test accuracy | test macro F1 | settings | CPU time |", "| --- | --- | --- | --- | --- |"]

    def row(what: str, r: dict) -> str:
        return (f"| {what} | {r['test']['accuracy']:.3f} | {r['test']['macro_f1']:.3f} | lr {r['lr']:g}, "
                f"{r['epochs']} epochs ({r['steps']} steps), best epoch {r['best_epoch']} | {r['cpu_s'] / 60:.1f} min |")

    seeded = [r for name, r in runs.items() if name != "random"]
    if len(seeded) == 1:
        lines.append(row("fine-tuned, defaults", seeded[0]))
    else:
        # a record from before --seeds has no "seed": it was run with seed 0
        lines += [row(f"fine-tuned, defaults, --seed {r.get('seed', 0)}", r) for r in seeded]
        acc = [r["test"]["accuracy"] for r in seeded]
        f1 = [r["test"]["macro_f1"] for r in seeded]
        lines.append(f"| fine-tuned, defaults: mean of the {len(seeded)} seeds (sample standard deviation) | "
                     f"{statistics.mean(acc):.3f} ({statistics.stdev(acc):.3f}) | "
                     f"{statistics.mean(f1):.3f} ({statistics.stdev(f1):.3f}) | | |")
    if "random" in runs:
        lines.append(row("`--init random`, defaults", runs["random"]))
    for name, b in baselines.items():
        hp = "C" if "C" in b else "alpha"
        lines.append(f"| {NAMES[name]} | {b['accuracy']:.3f} | {b['macro_f1']:.3f} | {hp} {b[hp]:g} "
                     f"(chosen on validation) | |")
    acc = runs["pretrained"]["test"]["accuracy"]
    lines += ["", f"A test accuracy near {acc:.3f} on {n} examples has a standard error of "
                  f"about {math.sqrt(acc * (1 - acc) / n):.3f}. The model saw only the start of "
                  f"{runs['pretrained']['test']['truncated']} of the {n} test texts (longer than its sequence); "
                  "the baselines saw them whole."]
    if predictions:
        lines += paired_table(truth, runs, baselines, predictions)
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = ArgumentParser(prog="python scripts/finetune_compare.py", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo", help="model folder, or 'demo' (the packaged demo model; default)")
    p.add_argument("--task", type=Path, required=True, help="folder with train.jsonl, valid.jsonl, test.jsonl")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--max-steps", type=int, help="cut both fine-tuning runs to this many steps")
    p.add_argument("--no-random", action="store_true", help="skip the --init random run")
    p.add_argument("--seeds", type=int, default=1,
                   help="fine-tune MODEL this many times, --seed 0 to N-1 (default 1: seed 0 only)")
    try:
        a = p.parse_args(argv)
        if a.seeds < 1:
            raise UFBError(f"--seeds must be at least 1, got {a.seeds}")
        splits = {s: read_split(a.task, s) for s in ("train", "valid", "test")}
        sizes = {s: len(r) for s, r in splits.items()}
        sizes["labels"] = len({r["label"] for r in splits["train"]})
        baselines = run_baselines(a.task, predictions=True)  # first: fails early without scikit-learn
        predictions = {name: b.pop("test_predictions") for name, b in baselines.items()}
        print(json.dumps({"baselines": baselines}), flush=True)
        runs = {}
        # Seed 0's folder keeps the name it had before --seeds, so earlier outputs are reused.
        jobs = [(f"pretrained-seed{s}" if s else "pretrained", "pretrained", s) for s in range(a.seeds)]
        jobs += [] if a.no_random else [("random", "random", 0)]
        for name, init, seed in jobs:
            folder = (a.out / "runs" / name).resolve()
            runs[name] = finetune(a.task.resolve(), folder, None, None, init, a.model, a.max_steps, seed)
            predictions[name] = test_predictions(folder, splits["test"])
            print(json.dumps({name: runs[name]}), flush=True)
    except UFBError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    truth = [r["label"] for r in splits["test"]]
    md = table(a.task, sizes, runs, baselines, truth, predictions)
    (a.out / "compare.json").write_text(json.dumps({"task": str(a.task), "model": a.model, "sizes": sizes,
                                                    "runs": runs, "baselines": baselines,
                                                    "test_predictions": predictions}, indent=2) + "\n")
    (a.out / "compare.md").write_text(md)
    print(md, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
