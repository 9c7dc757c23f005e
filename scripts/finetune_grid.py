"""Measure fine-tuning of the demo model over a grid of learning rates and epochs, on a
real labelled task built from the openly licensed corpus: which group of sources a
sentence comes from (bible, speeches, literature, reference, technical; 5 classes).

    python scripts/build_corpus.py --sources web,tdavid,mhcc,scofield --out data/groups/bible
    ... (one folder per group: see GROUPS; the corpus builder's --list-sources names them)
    python scripts/finetune_grid.py --groups data/groups --out runs/ft-grid

The task: per class, 600 training and 100 validation sentences from the corpus's training
split (the demo model saw this text when it was pretrained, never its labels) and 200 test
sentences from its held-out split (never seen); a sentence found in two groups is dropped.
Every run is ``ufb_mlx.finetune`` of --model (default: the demo model) with the given
--lr and --epochs and every other option at its default; the model it keeps (best
validation accuracy) is scored on the test set. Rows for a random-weight baseline
(``--init random``) and the classical baselines of scripts/baselines.py (char n-gram and
word TF-IDF + logistic regression, naive Bayes; scikit-learn, ``pip install -e ".[dev]"``)
put the numbers in context. Writes OUT/task/*.jsonl, OUT/runs/*, and OUT/grid.json with
OUT/grid.md (the table of the demo model card). A finished run is not run again (a new
--model needs a new OUT). --task-only builds OUT/task and stops.

    python scripts/finetune_grid.py --task data/tasks/spam --out runs/ft-grid-spam

runs the same grid on another task folder (train, valid and test.jsonl), such as the spam
task of scripts/build_spam_task.py.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import resource
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from baselines import run_baselines, scores  # noqa: E402
from ufb_ref.errors import UFBError  # noqa: E402

GROUPS = {
    "bible": "web,tdavid,mhcc,scofield",
    "speeches": "sotu",
    "literature": "moby-dick,austen,devil",
    "reference": "jargon,wordnet",
    "technical": "python-docs,postgresql-docs,rust-docs,libreoffice-help,perl-docs",
}


def build_task(groups: Path, out: Path, n_train: int, n_valid: int, n_test: int, seed: int) -> dict:
    """OUT/{train,valid,test}.jsonl; returns their sizes."""
    sentences = {g: {split: (groups / g / f"{split}.txt").read_text().splitlines() for split in ("train", "heldout")}
                 for g in GROUPS}
    seen = Counter(s for g in GROUPS for split in sentences[g].values() for s in set(split))
    rng = random.Random(seed)
    rows = {"train": [], "valid": [], "test": []}
    for g in GROUPS:
        pool = sorted({s for s in sentences[g]["train"] if seen[s] == 1})
        test = sorted({s for s in sentences[g]["heldout"] if seen[s] == 1})
        picked = rng.sample(pool, n_train + n_valid)
        rows["train"] += [{"text": s, "label": g} for s in picked[:n_train]]
        rows["valid"] += [{"text": s, "label": g} for s in picked[n_train:]]
        rows["test"] += [{"text": s, "label": g} for s in rng.sample(test, n_test)]
    out.mkdir(parents=True, exist_ok=True)
    for split, r in rows.items():
        rng.shuffle(r)
        (out / f"{split}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in r))
    return {k: len(v) for k, v in rows.items()}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _predict_test(model_dir: Path, test: list[dict]):
    """(the model's label names, the index it predicts for each test row, how many rows were cut)."""
    import ufb_mlx
    from ufb_mlx import data
    from ufb_mlx.evaluate import label_names, predict

    model, tok = ufb_mlx.load(model_dir)
    examples = [data.Example(r["text"], None, r["label"], "test") for r in test]
    seqs, cut = data.TextEncoder(tok, model.args.max_seq_length)(examples)
    return label_names(model), predict(model, seqs, tok.pad_token_id).argmax(1), cut


def test_scores(model_dir: Path, test: list[dict]) -> dict:
    from ufb_mlx import data

    names, pred, cut = _predict_test(model_dir, test)
    y = data.encode_labels([data.Example(r["text"], None, r["label"], "test") for r in test], names)
    # "truncated": test texts longer than the model's sequence (it saw their start only).
    return {**scores(y, pred, len(names)), "truncated": cut}


def test_predictions(model_dir: Path, test: list[dict]) -> list[str]:
    """The label the fine-tuned model in MODEL_DIR predicts for each test row."""
    names, pred, _ = _predict_test(model_dir, test)
    return [names[i] for i in pred]


def model_digest(model: str) -> str:
    """sha256 of the model's weights: a finished run is reused only for the same model
    ("demo" names whichever model the package ships)."""
    import hashlib

    from ufb_mlx.loading import model_location
    from ufb_ref.checkpoint import resolve

    h = hashlib.sha256()
    with open(resolve(model_location(model)) / "model.safetensors", "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def finetune(task: Path, out: Path, lr: float | None, epochs: int | None, init: str, model: str = "demo",
             max_steps: int | None = None, seed: int = 0) -> dict:
    """One run (skipped when its result exists); returns its result record. ``lr`` or
    ``epochs`` None: ufb-finetune's default (its --recipe auto), recorded as it resolved it."""
    # The runs start in the repository root: every path is made absolute first.
    task, out = task.resolve(), out.resolve()
    if model != "demo" and Path(model).exists():  # "demo" is the packaged model, not ./demo
        model = str(Path(model).resolve())
    weights = model_digest(model)
    result = out / "grid_result.json"
    if result.is_file():
        rec = json.loads(result.read_text())
        if rec.get("model_sha256", weights) != weights:
            raise UFBError(f"{out} was fine-tuned from other weights than --model {model}'s: give a new --out")
        done = rec.get("seed", 0)  # a record from before the seed was recorded: run with seed 0
        if done != seed:
            raise UFBError(f"{out} was fine-tuned with --seed {done}, not {seed}: give a new --out")
        return rec
    cmd = [sys.executable, "-m", "ufb_mlx.finetune", "--model", model, "--train", task / "train.jsonl",
           "--valid", task / "valid.jsonl", "--out", out, "--init", init, "--force", "--quiet"]
    cmd += ["--lr", repr(lr)] if lr is not None else []
    cmd += ["--epochs", str(epochs)] if epochs is not None else []
    cmd += ["--max-steps", str(max_steps)] if max_steps else []
    cmd += ["--seed", str(seed)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    rc = subprocess.run([str(c) for c in cmd], cwd=ROOT).returncode
    if rc:
        raise UFBError(f"ufb_mlx.finetune exited with {rc} for {out} (its message is above)")
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    best = json.loads((out / "train_results.json").read_text())
    start = next(r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if r.get("event") == "start")
    rec = {"lr": start["lr"], "epochs": start["epochs"], "seed": start["seed"], "init": init, "model": model,
           "model_sha256": weights,
           "steps": start["total_steps"], "valid_accuracy": best["value"], "best_epoch": best["epoch"],
           "test": test_scores(out, read_jsonl(task / "test.jsonl")), "wall_s": wall,
           "cpu_s": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)}
    result.write_text(json.dumps(rec, indent=2) + "\n")
    return rec


BASELINE_ROWS = {"char_tfidf_lr": "Character n-gram TF-IDF (2-5) + logistic regression",
                 "word_tfidf_lr": "Word TF-IDF (unigrams, bigrams) + logistic regression",
                 "naive_bayes": "Bag-of-words naive Bayes (unigrams and bigrams)"}


def score(m: dict) -> str:
    """A table's cell: "accuracy (macro F1)", the header's order, for the runs and the baselines alike."""
    return f"{m['accuracy']:.3f} ({m['macro_f1']:.3f})"


def table(records: list[dict], baselines: dict, sizes: dict) -> str:
    grid = [r for r in records if r["init"] == "pretrained" and not r.get("extra")]
    lrs, eps = sorted({r["lr"] for r in grid}), sorted({r["epochs"] for r in grid})
    by = {(r["lr"], r["epochs"]): r for r in grid}
    lines = [f"Test accuracy (macro F1) on {sizes['test']} test examples, {sizes['classes']} classes; fine-tuned on "
             f"{sizes['train']} (best of the epochs on {sizes['valid']} validation examples). "
             "Rows: --lr; columns: --epochs; every other option at its default.", "",
             "| lr | " + " | ".join(f"{e} epoch{'s' if e > 1 else ''}" for e in eps) + " |",
             "| --- |" + " --- |" * len(eps)]
    for lr in lrs:
        cells = []
        for e in eps:
            r = by.get((lr, e))
            cells.append(score(r["test"]) if r else "-")
        lines.append(f"| {lr:g} | " + " | ".join(cells) + " |")
    lines += [""]
    for r in records:
        if r.get("extra") or r["init"] == "random":
            what = "`--init random` (same architecture, fresh weights)" if r["init"] == "random" else "pretrained"
            lines.append(f"- {what}, lr {r['lr']:g}, {r['epochs']} epochs: {score(r['test'])}.")
    for name, what in BASELINE_ROWS.items():
        b = baselines[name]
        hp = "C" if "C" in b else "alpha"
        lines.append(f"- {what}, {hp} {b[hp]:g} chosen on validation: {score(b)}.")
    best = max(grid, key=lambda r: r["valid_accuracy"])
    acc = best["test"]["accuracy"]
    lines.append(f"- Best grid cell by validation accuracy: lr {best['lr']:g}, {best['epochs']} epochs (validation "
                 f"{best['valid_accuracy']:.3f}, test {acc:.3f}). One seed per run: a test accuracy on "
                 f"{sizes['test']} examples has a standard error of about {np.sqrt(acc * (1 - acc) / sizes['test']):.3f}.")
    cpu = sum(r["cpu_s"] for r in records)
    lines.append(f"- CPU time of the {len(records)} runs: {cpu / 60:.0f} min "
                 f"(a 1-epoch run: {min(r['cpu_s'] / r['epochs'] for r in records):.0f} s of CPU).")
    return "\n".join(lines) + "\n"


MARKER_TAG = "finetune-grid"


def card_markers(name: str) -> tuple[str, str, str]:
    """The card's start and end markers and the JSON file of the grid of task ``name``
    ("" for the 5-class corpus task, whose grid the card had first)."""
    tag = f"{MARKER_TAG}:{name}" if name else MARKER_TAG
    return f"<!-- {tag} -->", f"<!-- /{tag} -->", f"finetune_grid{'_' + name if name else ''}.json"


def card_sections(text: str) -> dict[str, str]:
    """Every task's section of a card, markers included, by task name (``card_markers``)."""
    sections = {}
    for m in re.finditer(rf"<!-- {MARKER_TAG}(?::([\w.-]+))? -->", text):
        name = m.group(1) or ""
        end = card_markers(name)[1]
        stop = text.find(end, m.end())
        if stop < 0:
            raise ValueError(f"the card's {name or '5-class'} fine-tuning section has no end marker {end}")
        sections[name] = text[m.start():stop + len(end)]
    return sections


def describe_task(name: str, command: str) -> list[str]:
    """The opening of a task's card section: what the task is and the command that measured it."""
    if not name:
        return ["## Fine-tuning this model (measured)", "",
                "A real task built from the corpus: which group of sources a sentence comes from (bible,",
                "speeches, literature, reference, technical); training sentences from the corpus's training",
                "split, test sentences from its held-out split. Each group is built by",
                "`python scripts/build_corpus.py --sources SOURCES --out data/groups/GROUP` (the groups and",
                "their sources are listed in scripts/finetune_grid.py), then measured by",
                "", "```", command, "```", ""]
    return [f"## Fine-tuning this model on the {name} task (measured)", "",
            f"The task in the folder `{name}` (the spam task: SpamAssassin emails, spam or ham, built by",
            "`python scripts/build_spam_task.py --out data/tasks/spam`), measured by", "", "```", command, "```", ""]


def update_card(card: Path, grid: dict, table_md: str, command: str, name: str = "") -> None:
    """Put the table into the demo model card (between the task's markers, before the
    licence), and the measurements beside it (finetune_grid[_NAME].json)."""
    start, end, json_name = card_markers(name)
    section = "\n".join([start, *describe_task(name, command), table_md.rstrip(), end])
    text = card.read_text()
    if start in text:
        head, rest = text.split(start, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        head, licence = text.split("## Licence", 1)
        text = head + section + "\n\n## Licence" + licence
    card.write_text(text)
    (card.parent / json_name).write_text(json.dumps(grid, indent=2) + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--groups", type=Path, help="folder with one corpus build per group (the 5-class task)")
    src.add_argument("--task", type=Path, help="another task: a folder with train, valid and test.jsonl "
                                               "(e.g. data/tasks/spam of scripts/build_spam_task.py)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--model", default="demo", help="the pretrained model to fine-tune (default: the demo model)")
    p.add_argument("--task-only", action="store_true", help="build OUT/task and stop")
    p.add_argument("--max-steps", type=int, help="cut every run to this many steps (a quick check of the script)")
    p.add_argument("--lrs", default="4e-5,1e-4,2e-4,5e-4,1e-3")
    p.add_argument("--epochs", default="1,2,4")
    p.add_argument("--extra", default="", help="more runs from the pretrained weights, lr:epochs,... (e.g. the "
                                                "paper's recipe, 4e-5:5)")
    p.add_argument("--random-baseline", default="", help="lr:epochs of an --init random run (e.g. 5e-4:4)")
    p.add_argument("--per-class", type=int, nargs=3, default=(600, 100, 200), metavar=("TRAIN", "VALID", "TEST"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--card", type=Path, help="also record the table in this model card (the demo model's README.md; "
                                             "one section per task, named by the --task folder)")
    a = p.parse_args(argv)

    if a.task:
        if a.task_only:
            p.error("--task-only goes with --groups (it builds the 5-class task)")
        task = a.task
        missing = [f for f in ("train.jsonl", "valid.jsonl", "test.jsonl") if not (task / f).is_file()]
        if missing:
            raise UFBError(f"--task {task}: no {missing[0]}")
        sizes = {s: len(read_jsonl(task / f"{s}.jsonl")) for s in ("train", "valid", "test")}
    else:
        task = a.out / "task"
        sizes = build_task(a.groups, task, *a.per_class, a.seed)
        print(f"task: {sizes} in {task}", flush=True)
        if a.task_only:
            return
    sizes["classes"] = len({r["label"] for r in read_jsonl(task / "train.jsonl")})
    baselines = run_baselines(task)  # first: fails early without scikit-learn
    records = []
    for lr in (float(x) for x in a.lrs.split(",")):
        for ep in (int(x) for x in a.epochs.split(",")):
            records.append(finetune(task, a.out / "runs" / f"lr{lr:g}-ep{ep}", lr, ep, "pretrained", a.model,
                                    a.max_steps))
            print(json.dumps(records[-1]), flush=True)
    extra = [(spec, "pretrained") for spec in a.extra.split(",") if spec]
    extra += [(a.random_baseline, "random")] if a.random_baseline else []
    for spec, init in extra:
        lr, ep = float(spec.split(":")[0]), int(spec.split(":")[1])
        name = f"{'random-' if init == 'random' else ''}lr{lr:g}-ep{ep}"
        records.append(dict(finetune(task, a.out / "runs" / name, lr, ep, init, a.model, a.max_steps), extra=True))
        print(json.dumps(records[-1]), flush=True)
    grid = {"task": sizes, "task_folder": str(task), "runs": records, "baselines": baselines, "naive_bayes": baselines["naive_bayes"]}
    (a.out / "grid.json").write_text(json.dumps(grid, indent=2) + "\n")
    (a.out / "grid.md").write_text(table(records, baselines, sizes))
    print((a.out / "grid.md").read_text())
    if a.card:
        update_card(a.card, grid, table(records, baselines, sizes), "python scripts/finetune_grid.py " + " ".join(
            argv if argv is not None else sys.argv[1:]), a.task.resolve().name if a.task else "")


if __name__ == "__main__":
    try:
        main()
    except UFBError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
