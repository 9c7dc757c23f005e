"""Ship a pretrained run as the package's demo model, with its model card.

    python scripts/export_demo.py --run runs/demo-fff --twin runs/demo-ffn \
        --corpus-stats data/corpus/stats.json --data-sources data/corpus/DATA_SOURCES.md \
        --heldout data/corpus/heldout.txt --command "python -m ufb_mlx.pretrain ..."

Writes ufb_mlx/demo_model/ (float16 safetensors, config, tokenizer, model card README.md,
DATA_SOURCES.md, heldout_sample.npz, metrics.json) atomically. With --continues the run
continued the shipped model (`ufb-pretrain --model demo`): the stages recorded in the
shipped metrics.json stay in the card, and this run is added as the next stage. The held-out numbers in the card are
measured here on the float16 weights that ship: the full held-out split, masked exactly
as pretraining masked it (seed, rate, 80/10/10), and a 64-block sample of it (spread evenly
over the split) that ships
too, so a test can recompute the sample's figures on a fresh clone.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ufb_mlx  # noqa: E402  (loads OpenBLAS before mlx)
import mlx.core as mx  # noqa: E402

from ufb_mlx.convert import convert  # noqa: E402
from ufb_ref.fsio import MARKER  # noqa: E402
from ufb_mlx import data  # noqa: E402
from ufb_mlx.evaluate import evaluate_mlm  # noqa: E402
from ufb_mlx.train import read_log  # noqa: E402
from finetune_grid import card_sections  # noqa: E402  (beside this script)

DEMO = Path(ufb_mlx.__file__).resolve().parent / "demo_model"
ROOT = Path(__file__).resolve().parents[1]
SAMPLE_BLOCKS = 64


def run_summary(run: Path) -> dict:
    log = read_log(run)
    start = next(r for r in log if r["event"] == "start")
    train = [r for r in log if r["event"] == "train"]
    evals = [r for r in log if r["event"] == "eval"]
    cfg = json.loads((run / "config.json").read_text())
    return {"config": cfg, "steps": train[-1]["step"], "blocks": start["blocks"],
            "median_tokens_per_s": float(np.median([r["tokens_per_s"] for r in train])),
            "final_eval": evals[-1], "first_eval": evals[0], "peak_memory_gb": max(r["peak_memory_gb"] for r in train)}


def run_options(run: Path) -> dict:
    """The options of the run (its newest checkpoint's fingerprint, or, when a finished run
    kept none, the one its log's start record holds): the recipe the card states."""
    from ufb_mlx.train import STATE_FILE, list_checkpoints

    ckpts = list_checkpoints(run)
    if not ckpts:
        return next(r for r in read_log(run) if r["event"] == "start")["run"]
    return json.loads((ckpts[-1][1] / STATE_FILE).read_text())["run"]


def shown_path(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def showcase_rows(model_dir: Path, prompts_file: Path) -> list[dict]:
    """Each showcase prompt with the model's top 3 (token, probability) for its mask."""
    from ufb_mlx.generate import fill_mask

    model, tok = ufb_mlx.load(model_dir)
    prompts = [line for line in prompts_file.read_text().splitlines() if line.strip()]
    return [{"prompt": r["prompt"], "top3": [(c["token"], round(c["prob"], 3))
                                             for c in r["masks"][0]["candidates"]]}
            for r in fill_mask(model, tok, prompts, top_k=3)]


def heldout_set(model_dir: Path, heldout: Path, seed: int, mask_rate: float):
    model, tok = ufb_mlx.load(model_dir)
    blocks = data.pack(tok, data.read_corpus([heldout]), model.args.max_seq_length, what="held-out corpus")
    masker = data.Masker(tok, model.args.vocab_size, mask_rate)
    inputs, labels = masker(blocks, np.random.default_rng([seed, 2**31 - 1]))  # as pretrain.py
    return model, inputs, labels


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="pretraining output folder of the FFF model")
    p.add_argument("--twin", type=Path, help="pretraining output folder of the dense-FFN twin")
    p.add_argument("--heldout", type=Path, required=True)
    p.add_argument("--corpus-stats", type=Path, required=True)
    p.add_argument("--data-sources", type=Path, nargs="+", required=True,
                   help="DATA_SOURCES.md of every text the model was trained on (concatenated into the card's)")
    p.add_argument("--trained-on", nargs="+", required=True, help="the run's --corpus files, as the card names them")
    p.add_argument("--data-note", default="", help="what the card's Data section says about this stage's text "
                                                    "beyond the corpus (kept in the stage record)")
    p.add_argument("--continues", action="store_true",
                   help="the run continued the shipped model: keep its stages (metrics.json) and add this one")
    p.add_argument("--date", required=True, help="the day the run ended (YYYY-MM-DD), for the card")
    p.add_argument("--command", required=True, help="the exact pretraining command, for the card")
    p.add_argument("--twin-command", default="", help="the twin's pretraining command")
    p.add_argument("--wall-clock", default="", help="training wall-clock(s), for the card")
    p.add_argument("--batch-size", type=int, required=True, help="the runs' batch size (blocks per step)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mask-rate", type=float, default=0.25)
    p.add_argument("--tokenizer-command", default="",
                   help="the command that trained the tokenizer, when the run was given one (--tokenizer)")
    p.add_argument("--extend-command", default="",
                   help="the ufb_mlx.extend_vocab command whose folder the run continued (--continues)")
    p.add_argument("--history", type=Path,
                   help="a Markdown file of earlier measurements to keep in the card (e.g. an earlier "
                        "model's FFF-versus-dense-twin comparison, labelled with its budget)")
    p.add_argument("--showcase", type=Path, default=ROOT / "demo" / "showcase.txt",
                   help="fill-mask prompts whose top-3 answers the card shows")
    p.add_argument("--out", type=Path, default=DEMO)
    a = p.parse_args(argv)
    earlier = []
    a.previous_vocab_size = None
    if a.extend_command and not a.continues:
        p.error("--extend-command: an extended vocabulary continues the shipped model; give --continues")
    if a.continues:
        shipped = a.out / "metrics.json"
        earlier = json.loads(shipped.read_text()).get("stages") if shipped.is_file() else None
        if not earlier:
            p.error(f"--continues: {shipped} records no stages")
        a.previous_vocab_size = json.loads((a.out / "config.json").read_text())["vocab_size"]

    tmp = Path(tempfile.mkdtemp(prefix=".demo_model.", dir=a.out.parent))
    try:
        model_dir = convert(str(a.run), tmp / "m", dtype="float16")
        for f in model_dir.iterdir():
            f.rename(tmp / f.name)
        model_dir.rmdir()
        # convert's marker lets --force replace a folder it wrote; the package's folder is not one.
        (tmp / MARKER).unlink(missing_ok=True)
        cfg = json.loads((tmp / "config.json").read_text())
        cfg["source"] = {"trained_by": "ufb_mlx.pretrain (this repository)", "dtype": "float16"}
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")

        model, inputs, labels = heldout_set(tmp, a.heldout, a.seed, a.mask_rate)
        full = evaluate_mlm(model, inputs, labels, 64)
        # Spread over the split: its blocks come source by source, and the first 64 are all Bible.
        pick = np.linspace(0, len(inputs) - 1, SAMPLE_BLOCKS).round().astype(np.int64)
        sample = evaluate_mlm(model, inputs[pick], labels[pick], 64)
        np.savez_compressed(tmp / "heldout_sample.npz", input_ids=inputs[pick].astype(np.int16),
                            labels=labels[pick].astype(np.int16), blocks=pick)
        (tmp / "DATA_SOURCES.md").write_text("\n\n".join(f.read_text().rstrip() for f in a.data_sources) + "\n")
        stats = json.loads(a.corpus_stats.read_text())
        fff = run_summary(a.run)
        twin = run_summary(a.twin) if a.twin else None
        # float32 from the run folder, on the same masked held-out set: what float16 cost.
        for summary, run in ((fff, a.run), (twin, a.twin)) if twin else ((fff, a.run),):
            m, i, l = heldout_set(run, a.heldout, a.seed, a.mask_rate)
            summary["heldout_float32"] = evaluate_mlm(m, i, l, 64)
        fff["options"] = run_options(a.run)
        stages = earlier + [stage_record(fff, full, a)]
        showcase = showcase_rows(tmp, a.showcase)
        card = keep_measured_sections(model_card(cfg, fff, twin, full, sample, stats, a, showcase, stages),
                                      a.out / "README.md")
        for grid in a.out.glob("finetune_grid*.json"):
            shutil.copyfile(grid, tmp / grid.name)
        (tmp / "README.md").write_text(card)
        (tmp / "metrics.json").write_text(json.dumps({"heldout": full, "heldout_sample": sample,
                                                      "sample_blocks": SAMPLE_BLOCKS, "showcase": showcase,
                                                      "fff_run": fff, "twin_run": twin, "stages": stages}, indent=2) + "\n")
        tmp.chmod(0o755)
        if a.out.exists():
            shutil.rmtree(a.out)
        tmp.rename(a.out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {a.out}")
    print(json.dumps({"heldout": full, "heldout_sample": sample}, indent=2))


RECIPE_KEYS = ("lr", "betas", "eps", "weight_decay", "grad_clip", "schedule", "warmup", "dropout", "seed",
               "mask_rate", "freeze_position_scale")


def stage_record(fff: dict, full: dict, a) -> dict:
    """One training stage as the card and the next --continues export read it."""
    seq = fff["config"]["max_seq_length"]
    added = fff["config"]["vocab_size"] - (a.previous_vocab_size or fff["config"]["vocab_size"])
    started = ("random initialisation" if not a.continues else
               f"the shipped demo model with {added} word pieces added, fresh optimizer state" if a.extend_command
               else "the shipped demo model, fresh optimizer state")
    first = a.tokenizer_command or a.extend_command
    note = ("The first command trains the WordPiece tokenizer (a 1-step run whose folder keeps it); the second "
            "pretrains on it." if a.tokenizer_command else
            "The first command adds word pieces of the new text to the shipped model's vocabulary "
            "(`ufb_mlx.extend_vocab`); the second pretrains from that folder." if a.extend_command else "")
    return {"started_from": started, "commands": ([first] if first else []) + [a.command], "command_note": note,
            "trained_on": a.trained_on, "steps": fff["steps"], "batch_size": a.batch_size, "seq_length": seq,
            "tokens": fff["steps"] * a.batch_size * seq, "blocks": fff["blocks"],
            "median_tokens_per_s": fff["median_tokens_per_s"], "peak_memory_gb": fff["peak_memory_gb"],
            "wall_clock": a.wall_clock, "recipe": {k: fff["options"][k] for k in RECIPE_KEYS},
            "heldout": full, "date": a.date, "data_note": a.data_note}


def stage_lines(n: int, st: dict) -> list[str]:
    r = st["recipe"]
    return [
        f"### Stage {n} ({st['date']}): from {st['started_from']}",
        "",
        "```",
        *st["commands"],
        "```",
        "",
        *([st["command_note"], ""] if st["command_note"] else []),
        f"- Text: {', '.join(f'`{t}`' for t in st['trained_on'])}, {st['blocks']} training blocks.",
        f"- {st['steps']} steps of {st['batch_size']} blocks of {st['seq_length']} tokens: {st['tokens']:,} tokens "
        f"({st['steps'] * st['batch_size'] / st['blocks']:.2f} epochs of the blocks).",
        f"- Median training throughput {st['median_tokens_per_s']:.0f} tokens/s, peak memory "
        f"{st['peak_memory_gb']:.2f} GB. Wall-clock: {st['wall_clock'] or 'not recorded'}.",
        f"- Recipe: AdamW lr {r['lr']:g}, betas {r['betas'][0]:g}/{r['betas'][1]:g}, eps {r['eps']:g}, weight decay "
        f"{r['weight_decay']:g} (not on biases and norms), mask rate {r['mask_rate']:g} with 80/10/10, gradient "
        f"clipping {r['grad_clip']:g}, {r['schedule']} schedule peaking at {r['warmup']:g} of the steps, dropout "
        f"{r['dropout']:g}, seed {r['seed']}"
        + (", positions' scale frozen (`--freeze-position-scale`)." if r.get("freeze_position_scale") else "."),
        "",
    ]


def keep_measured_sections(card: str, old_card: Path) -> str:
    """The fine-tuning tables that scripts/finetune_grid.py wrote into the current card
    (each between its task's markers) stay in the new one, before the licence."""
    if not old_card.is_file():
        return card
    old = old_card.read_text()
    sections = list(card_sections(old).values())
    if not sections:
        return card
    head, licence = card.split("## Licence", 1)
    return head + "\n\n".join(sections) + "\n\n## Licence" + licence


def model_card(cfg, fff, twin, full, sample, stats, a, showcase, stages) -> str:
    train_stats = stats["total"]["train"]
    lines = [
        "# UltraFastBERT demo model (ufb-demo-4x256-fff1x8)",
        "",
        "A small UltraFastBERT pretrained from scratch by this repository on openly licensed English",
        f"text, on a 2-core CPU ({len(stages)} stage{'s' if len(stages) > 1 else ''}, below), so that `python -m ufb_mlx.generate` works offline on a fresh clone.",
        "It is small and saw little text: it fills in common words and phrases of its corpus",
        "(the table below shows what it answers), not facts.",
        "",
        "## Architecture",
        "",
        f"- crammedBERT encoder, pre-LayerNorm: {cfg['num_layers']} layers, hidden {cfg['hidden_size']}, "
        f"{cfg['num_heads']} heads, sequence {cfg['max_seq_length']}, WordPiece vocabulary {cfg['vocab_size']}.",
        f"- Every feedforward block is a fast feedforward tree: {cfg['fff_trees']} tree of depth {cfg['fff_depth']} "
        f"({cfg['fff_trees'] * (2 ** (cfg['fff_depth'] + 1) - 1)} neurons, {cfg['fff_depth'] + 1} visited per token).",
        "- Tied MLM decoder, scaled sinusoidal positions, exact GELU: the released model's semantics.",
        "- Weights shipped in float16 (`model.safetensors`).",
        "",
        "## Data",
        "",
        "Built by `python scripts/build_corpus.py` (see DATA_SOURCES.md for every package, version and",
        "licence; public domain, PDDL, PSF, PostgreSQL, MIT, MPL-2.0, Artistic and the WordNet licence).",
        f"Training split: {train_stats.get('sentences', '?')} sentences, {train_stats.get('words', '?')} words.",
        *[line for n, st in enumerate(stages, 1) if st.get("data_note") for line in ("", f"Stage {n}: {st['data_note']}")],
        "",
        "## Training",
        "",
        *(["Each stage after the first continued from the weights the stage before shipped (`--model demo`),",
           "with a fresh optimizer state and a short warm-up.", "",
           "| stage | started from | tokens | median tokens/s | held-out loss / accuracy after (float16) |",
           "| --- | --- | --- | --- | --- |",
           *(f"| {n} | {st['started_from']} | {st['tokens']:,} | {st['median_tokens_per_s']:.0f} | "
             f"{st['heldout']['mlm_loss']:.4f} / {st['heldout']['mlm_accuracy']:.4f} |"
             for n, st in enumerate(stages, 1)),
           "",
           f"In all {sum(st['tokens'] for st in stages):,} tokens seen.", ""] if len(stages) > 1 else []),
        *[line for n, st in enumerate(stages, 1) for line in stage_lines(n, st)],
        "## Held-out results (the float16 weights that ship, and the float32 ones they came from)",
        "",
        "| split | masked tokens | MLM loss | masked-token accuracy |",
        "| --- | --- | --- | --- |",
        f"| full held-out split | {full['masked_tokens']} | {full['mlm_loss']:.4f} | {full['mlm_accuracy']:.4f} |",
        f"| full held-out split, float32 (the run's weights before the float16 export) | "
        f"{fff['heldout_float32']['masked_tokens']} | {fff['heldout_float32']['mlm_loss']:.4f} | "
        f"{fff['heldout_float32']['mlm_accuracy']:.4f} |",
        f"| heldout_sample.npz ({SAMPLE_BLOCKS} blocks spread evenly over the split, shipped) | {sample['masked_tokens']} | "
        f"{sample['mlm_loss']:.4f} | {sample['mlm_accuracy']:.4f} |",
        "",
        f"During training (float32; the held-out split masked with the run's seed, {fff['options']['seed']}, so "
        f"other positions) the last evaluation gave loss {fff['final_eval']['mlm_loss']:.4f}, "
        f"accuracy {fff['final_eval']['mlm_accuracy']:.4f}.",
        "",
        f"## Fill-mask showcase (`python -m ufb_mlx.generate --prompts-file {shown_path(a.showcase)} --top-k 3`)",
        "",
        "| prompt | top-3 (probability) |",
        "| --- | --- |",
        *(f"| {r['prompt']} | {', '.join(f'{t} ({p:.3f})' for t, p in r['top3'])} |" for r in showcase),
        "",
    ]
    if twin:
        lines += [
            "## Against a dense-feedforward twin",
            "",
            "Same corpus, tokenizer, token budget and recipe; the twin's feedforward blocks are dense",
            f"(width {twin['config'].get('ffn_width')}, equal to the tree's node count).",
            "",
            "Both evaluated in float32 from their run folders on the same masked held-out set.",
            "",
            "| model | held-out MLM loss | masked-token accuracy | median train tokens/s |",
            "| --- | --- | --- | --- |",
            *(f"| {name} | {r['heldout_float32']['mlm_loss']:.4f} | {r['heldout_float32']['mlm_accuracy']:.4f} | "
              f"{r['median_tokens_per_s']:.0f} |" for name, r in (("FFF (this model)", fff), ("dense twin", twin))),
            "",
            "```",
            a.twin_command,
            "```",
            "",
        ]
    if a.history:
        lines += [a.history.read_text().rstrip(), ""]
    lines += ["## Licence", "", "The weights are released under the MIT licence of this repository; the",
              "training text keeps its own licences (DATA_SOURCES.md).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
