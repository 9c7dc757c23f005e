"""WordNet data.* files: each synset's gloss split into definitions and quoted examples."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator


_WN_QUOTE_RE = re.compile(r'"([^"]*)"')


def _as_sentence(fragment: str) -> str:
    fragment = fragment.strip().strip(";:,").strip()
    if not fragment:
        return ""
    fragment = fragment[0].upper() + fragment[1:]
    if fragment[-1] not in ".!?":
        fragment += "."
    return fragment


def wordnet_gloss_parts(gloss: str) -> list[str]:
    """Split a WordNet gloss into the definition(s) and quoted example sentences."""
    examples = [_as_sentence(q) for q in _WN_QUOTE_RE.findall(gloss)]
    definition = _WN_QUOTE_RE.sub("", gloss)
    defs = [_as_sentence(d) for d in definition.split(";")]
    return [p for p in defs + examples if p]


def read_wordnet(root: Path) -> Iterator[tuple[str, str]]:
    files = sorted(root.glob("usr/share/wordnet/data.*"))
    if not files:
        raise FileNotFoundError("no WordNet data.* files")
    for path in files:
        pos = path.name.split(".", 1)[1]
        with path.open("r", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("  ") or "|" not in line:
                    continue  # licence header lines
                offset = line.split(" ", 1)[0]
                gloss = line.split("|", 1)[1]
                parts = wordnet_gloss_parts(gloss)
                if parts:
                    yield f"{pos}:{offset}", "\n\n".join(parts)
