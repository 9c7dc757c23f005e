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
the models here often are.
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
from finetune_grid import finetune  # noqa: E402
from ufb_ref.errors import ArgumentParser, UFBError  # noqa: E402


def table(task: Path, sizes: dict, runs: dict, baselines: dict) -> str:
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
        baselines = run_baselines(a.task)  # first: fails early without scikit-learn
        print(json.dumps({"baselines": baselines}), flush=True)
        runs = {}
        # Seed 0's folder keeps the name it had before --seeds, so earlier outputs are reused.
        jobs = [(f"pretrained-seed{s}" if s else "pretrained", "pretrained", s) for s in range(a.seeds)]
        jobs += [] if a.no_random else [("random", "random", 0)]
        for name, init, seed in jobs:
            runs[name] = finetune(a.task.resolve(), (a.out / "runs" / name).resolve(), None, None, init, a.model,
                                  a.max_steps, seed)
            print(json.dumps({name: runs[name]}), flush=True)
    except UFBError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    md = table(a.task, sizes, runs, baselines)
    (a.out / "compare.json").write_text(json.dumps({"task": str(a.task), "model": a.model, "sizes": sizes,
                                                    "runs": runs, "baselines": baselines}, indent=2) + "\n")
    (a.out / "compare.md").write_text(md)
    print(md, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
