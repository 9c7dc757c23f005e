"""Apply a fine-tuned classifier or regressor (a folder written by ``ufb_mlx.finetune``,
or any classifier checkpoint) to texts.

    python -m ufb_mlx.classify --model OUT --prompt "a text" [--pair "its pair"]
    python -m ufb_mlx.classify --model OUT --file test.jsonl      # or .csv / .tsv / .txt

Prints one line per text: the predicted label, its probability and the text (regression:
the predicted value and the text); ``--json`` prints one JSON object instead. When the
file has a ``label`` column, the GLUE metrics on it are printed at the end (to stderr).
A .txt file holds one text per line. Inputs longer than the model's max_seq_length are
truncated.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ufb_ref.errors import ArgumentParser, UFBError, command_name

from . import data
from .entry import console
from .evaluate import label_names, label_scores, predict, task_metrics
from .loading import load
from .model import FFF_MODES
from .progress import Progress


def read_inputs(a) -> list[data.Example]:
    if a.prompt:
        pairs = a.pair or []
        if pairs and len(pairs) != len(a.prompt):
            raise UFBError(f"{len(a.prompt)} --prompt but {len(pairs)} --pair; give one --pair per --prompt or none")
        out = []
        for i, text in enumerate(a.prompt):
            where = f"--prompt {i + 1}"
            out.append(data.Example(data.check_text(text, "prompt", where),
                                 data.check_text(pairs[i], "pair", where, optional=True) if pairs else None,
                                 None, where))
        return out
    if a.pair:
        raise UFBError("--pair goes with --prompt; a --file gives pairs in its text_pair column")
    path = Path(a.file)
    if a.format == "auto" and path.suffix.lower() == ".txt":
        lines = data.read_text(path).splitlines()
        ex = [data.Example(line.strip(), None, None, f"{path}:{n}") for n, line in enumerate(lines, 1) if line.strip()]
        if not ex:
            raise UFBError(f"{path}: no texts")
        return ex
    return data.read_examples(path, a.format, a.text_column, a.pair_column, a.label_column, need_label=False)


def main(argv=None) -> int:
    p = ArgumentParser(prog=command_name("ufb_mlx.classify"), description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="classifier folder (e.g. the --out of ufb_mlx.finetune) or Hub id")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="a text to classify (repeatable)")
    src.add_argument("--file", help="texts to classify: .jsonl, .csv, .tsv (text, optional text_pair and label) or .txt")
    p.add_argument("--pair", action="append", help="second text of a pair, one per --prompt")
    p.add_argument("--format", choices=("auto",) + data.FORMATS, default="auto")
    p.add_argument("--text-column", default="text")
    p.add_argument("--pair-column", default="text_pair")
    p.add_argument("--label-column", default="label")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--top-k", type=int, default=1, help="labels shown per text, most probable first")
    p.add_argument("--fff-mode", choices=FFF_MODES, default="conditional")
    p.add_argument("--json", action="store_true", help="one JSON object: results and (with labels) metrics")
    a = p.parse_args(argv)
    if a.batch_size < 1 or a.top_k < 1:
        raise UFBError("--batch-size and --top-k must be at least 1")

    model, tok = load(a.model, fff_mode=a.fff_mode)
    args = model.args
    if args.task != "classification":
        raise UFBError(f"'{a.model}' is a masked-language model, not a classifier; fine-tune it first "
                       "(python -m ufb_mlx.finetune) or use python -m ufb_mlx.generate")
    examples = read_inputs(a)
    seqs, _ = data.TextEncoder(tok, args.max_seq_length)(examples)
    with Progress(len(seqs), "classify", "text") as progress:  # stderr: a bar, or a line every 10 s
        logits = predict(model, seqs, tok.pad_token_id, a.batch_size, on_batch=progress.update)
    regression = args.problem_type == "regression"
    results = [{"text": ex.text, "text_pair": ex.text_pair, **scores}
               for ex, scores in zip(examples, label_scores(model, logits, a.top_k))]

    measured = None
    if all(ex.label is not None for ex in examples):
        targets = (data.regression_targets(examples) if regression
                   else data.encode_labels(examples, label_names(model)))
        measured = task_metrics(model, logits, targets)

    if a.json:
        from .jsonable import clean_tree

        print(json.dumps(clean_tree({"model": str(a.model), "results": results, "metrics": measured})))
    else:
        for r in results:
            text = r["text"] if r["text_pair"] is None else f"{r['text']} ||| {r['text_pair']}"
            if regression:
                print(f"{r['value']:.4f}\t{text}")
            else:
                shown = "  ".join(f"{t['label']} {t['score']:.4f}" for t in r["top"])
                print(f"{shown}\t{text}")
        if measured:
            print(" | ".join(f"{k} {v:.4f}" for k, v in measured.items()) + f" on {len(examples)} labelled examples",
                  file=sys.stderr)
    return 0


cli = console(main)  # the console script (pyproject.toml)

if __name__ == "__main__":
    cli()
