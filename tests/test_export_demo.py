"""scripts/export_demo.py, on a tiny run: the model card and metrics.json of a model trained
from scratch, then continued (`ufb-pretrain --model <exported>`) and exported again with
--continues, which keeps the first stage and adds the second."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

import ufb_mlx

from conftest import REPO
from train_utils import env, run_module, toy_corpus

TINY = ["--config", "tiny", "--seq-length", "32", "--vocab-size", "200"]


def export(tmp_path, run, out, *extra):
    showcase = tmp_path / "showcase.txt"
    showcase.write_text("anna sees the red [MASK] in the park .\nbob likes a [MASK] dog at home .\n")
    return subprocess.run([sys.executable, str(REPO / "scripts" / "export_demo.py"), "--run", str(run),
                           "--out", str(out), "--heldout", str(tmp_path / "heldout.txt"),
                           "--corpus-stats", str(tmp_path / "stats.json"), "--batch-size", "8",
                           "--showcase", str(showcase), *map(str, extra)],
                          capture_output=True, text=True, env=env(), timeout=300)


def test_export_then_continue_and_export_again_keeps_both_stages(tmp_path):
    corpus = toy_corpus(tmp_path / "train.txt", 600, 0)
    toy_corpus(tmp_path / "heldout.txt", 100, 1)
    (tmp_path / "stats.json").write_text(json.dumps({"total": {"train": {"sentences": 600, "words": 3600}}}))
    (tmp_path / "corpus.md").write_text("# the toy corpus\n")
    (tmp_path / "extra.md").write_text("# the extra text\n")
    extra = toy_corpus(tmp_path / "extra.txt", 300, 2)
    out = tmp_path / "demo"

    run_module("ufb_mlx.pretrain", "--corpus", corpus, "--out", tmp_path / "r1", *TINY, "--steps", "4",
               "--batch-size", "8", "--eval-every", "4")
    proc = export(tmp_path, tmp_path / "r1", out, "--data-sources", tmp_path / "corpus.md",
                  "--trained-on", "train.txt", "--date", "2026-12-01", "--command", "first command",
                  "--wall-clock", "1 s")
    assert proc.returncode == 0, proc.stderr
    first = json.loads((out / "metrics.json").read_text())
    (stage1,) = first["stages"]
    assert stage1["started_from"] == "random initialisation" and stage1["tokens"] == 4 * 8 * 32
    assert stage1["heldout"] == first["heldout"] and stage1["commands"] == ["first command"]

    # The fine-tuning grids that scripts/finetune_grid.py put into the card, one per task, stay.
    sys.path.insert(0, str(REPO / "scripts"))
    from finetune_grid import card_markers, card_sections, update_card

    update_card(out / "README.md", {"runs": ["5-class"]}, "| the 5-class table |", "grid --groups")
    update_card(out / "README.md", {"runs": ["spam"]}, "| the spam table |", "grid --task", "spam")
    assert set(card_sections((out / "README.md").read_text())) == {"", "spam"}
    with pytest.raises(ValueError, match="spam fine-tuning section has no end marker"):
        card_sections(card_markers("spam")[0] + "| a table |")

    # Continuing needs the stages of the shipped model.
    run_module("ufb_mlx.pretrain", "--model", out, "--corpus", corpus, extra, "--out", tmp_path / "r2",
               "--steps", "2", "--batch-size", "8", "--eval-every", "2", "--lr", "5e-4", "--warmup", "0.5")
    args = ("--data-sources", tmp_path / "corpus.md", tmp_path / "extra.md", "--trained-on", "train.txt",
            "tasks/spam/pretrain.txt", "--data-note", "added the emails.", "--date", "2026-12-02", "--command", "second command", "--continues")
    bare = tmp_path / "bare"
    bare.mkdir()
    proc = export(tmp_path, tmp_path / "r2", bare, *args)
    assert proc.returncode == 2 and "records no stages" in proc.stderr.splitlines()[-1], proc.stderr
    proc = export(tmp_path, tmp_path / "r2", out, *args)
    assert proc.returncode == 0, proc.stderr

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["stages"][0] == stage1
    stage2 = metrics["stages"][1]
    assert stage2["started_from"].startswith("the shipped demo model") and stage2["tokens"] == 2 * 8 * 32
    assert "full held-out split, float32" in (out / "README.md").read_text()
    assert metrics["fff_run"]["heldout_float32"]["masked_tokens"] == metrics["heldout"]["masked_tokens"]
    assert stage2["recipe"]["lr"] == 5e-4 and stage2["heldout"] == metrics["heldout"]
    card = (out / "README.md").read_text()
    assert "### Stage 1 (2026-12-01): from random initialisation" in card and "first command" in card
    assert "### Stage 2 (2026-12-02): from the shipped demo model" in card and "second command" in card
    assert "Stage 2: added the emails." in card and stage2["data_note"] == "added the emails." and not stage1["data_note"]
    assert f"In all {(4 + 2) * 8 * 32:,} tokens seen." in card
    for n, st in enumerate(metrics["stages"], 1):
        assert re.search(rf"\| {n} \| {re.escape(st['started_from'])} \| {st['tokens']:,} \| \d+ \| "
                         rf"{st['heldout']['mlm_loss']:.4f} / {st['heldout']['mlm_accuracy']:.4f} \|", card), n
    for name, table in (("", "| the 5-class table |"), ("_spam", "| the spam table |")):
        assert table in card.split("## Licence")[0]
        assert json.loads((out / f"finetune_grid{name}.json").read_text())["runs"] == [name.strip("_") or "5-class"]
    assert card.index("<!-- /finetune-grid -->") < card.index("<!-- finetune-grid:spam -->")
    assert (out / "DATA_SOURCES.md").read_text() == "# the toy corpus\n\n# the extra text\n"
    assert not (out / ".ultrafastbert.json").exists()  # convert's marker: the package's folder is not its output
    model, _ = ufb_mlx.load(out)
    assert model.args.source["dtype"] == "float16"

    # A stage that starts from the shipped model with pieces added (ufb_mlx.extend_vocab).
    emails = tmp_path / "emails.txt"
    emails.write_text("write to anna@example.com <bob> = [carl] #1 ~ dora_x | *\n" * 50)
    run_module("ufb_mlx.extend_vocab", "--model", out, "--corpus", emails, "--add", "8", "--out", tmp_path / "x3")
    run_module("ufb_mlx.pretrain", "--model", tmp_path / "x3", "--corpus", corpus, emails, "--out", tmp_path / "r3",
               "--steps", "2", "--batch-size", "8", "--eval-every", "2", "--lr", "5e-4", "--warmup", "0.5")
    args3 = ("--data-sources", tmp_path / "corpus.md", "--trained-on", "train.txt", "emails.txt", "--date",
             "2026-12-03", "--command", "third command", "--extend-command", "extend command")
    proc = export(tmp_path, tmp_path / "r3", tmp_path / "unused", *args3)
    assert proc.returncode == 2 and "give --continues" in proc.stderr.splitlines()[-1], proc.stderr
    proc = export(tmp_path, tmp_path / "r3", out, *args3, "--continues")
    assert proc.returncode == 0, proc.stderr
    stages = json.loads((out / "metrics.json").read_text())["stages"]
    assert stages[:2] == metrics["stages"]
    assert stages[2]["started_from"] == "the shipped demo model with 8 word pieces added, fresh optimizer state"
    assert stages[2]["commands"] == ["extend command", "third command"]
    card = (out / "README.md").read_text()
    assert "### Stage 3 (2026-12-03): from the shipped demo model with 8 word pieces added" in card
    assert "(`ufb_mlx.extend_vocab`)" in card
    assert ufb_mlx.load(out)[0].args.vocab_size == model.args.vocab_size + 8
