"""The build: fetch every source, read it into documents of clean sentences, cap and
select, de-duplicate across sources, split train/heldout per document, write the outputs."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Sequence

from ufb_ref.fsio import atomic_file

from .allocate import compute_caps, counts, is_heldout, merge_counts, select_docs, text_mb
from .fetch import Fetched
from .notices import render_data_sources
from .sources import Source, default_sources, fetch_source
from .text import dedup, text_to_sentences

LOG = logging.getLogger(__name__)


@dataclasses.dataclass
class Settings:
    """What decides the corpus's content besides the sources (all recorded in stats.json)."""

    source_caps: dict[str, float]  # MB per source name; math.inf: no cap
    group_caps: dict[str, float]  # MB per group; a group not named here has no cap
    seed: int = 1234
    heldout_fraction: float = 0.01
    min_words: int = 5
    max_words: int = 60


@dataclasses.dataclass
class Parsed:
    """A source read into documents: (document id, its clean sentences), in reading order."""

    docs: list[tuple[str, list[str]]]
    raw_docs: int
    raw_chars: int
    seconds: float


def parse_source(src: Source, root: Path, min_words: int, max_words: int) -> Parsed:
    """Read a fetched source into documents of clean, source-deduplicated sentences."""
    t0 = time.time()
    seen: set[int] = set()
    docs = []
    raw_docs = raw_chars = 0
    for doc_id, text in src.reader(root):
        raw_docs += 1
        raw_chars += len(text)
        sents = dedup(text_to_sentences(text, min_words, max_words), seen)
        if sents:
            docs.append((doc_id, sents))
    return Parsed(docs, raw_docs, raw_chars, time.time() - t0)


def _parse_worker(args):
    # Some readers are lambdas, which do not pickle: a worker finds its source again by name.
    name, root, min_words, max_words = args
    src = {s.name: s for s in default_sources()}[name]
    return parse_source(src, Path(root), min_words, max_words)


def fetch_all(registry: Sequence[Source], work: Path,
              refresh: bool) -> tuple[dict[str, Fetched], dict[str, dict]]:
    """Fetch each source (one at a time: apt and npm), reading its licence notice; a source
    that fails is recorded as failed in the results, never raised."""
    fetched: dict[str, Fetched] = {}
    results: dict[str, dict] = {}
    for src in registry:
        t0 = time.time()
        try:
            f = fetch_source(src, work, refresh)
            fetched[src.name] = f
            notice = ""
            if src.notice is not None:
                try:
                    notice = src.notice(f.root)
                except Exception as e:  # notice problems never drop a source
                    LOG.warning("%s: could not read licence notice: %s", src.name, e)
            results[src.name] = {"status": "fetched", "notice": notice, "fetch_s": time.time() - t0}
            LOG.info("fetched %-18s %s %s (%.1fs)", src.name, f.package, f.version, time.time() - t0)
        except Exception as e:
            LOG.warning("SKIPPING %s: fetch failed: %s", src.name, e)
            results[src.name] = {"status": "failed", "error": f"fetch: {e}"}
    return fetched, results


def _parse_failed(results: dict[str, dict], name: str, e: Exception) -> None:
    LOG.warning("SKIPPING %s: parse failed: %s: %s", name, type(e).__name__, e)
    results[name].update(status="failed", error=f"parse: {type(e).__name__}: {e}")


def parse_all(todo: Sequence[Source], fetched: dict[str, Fetched], results: dict[str, dict],
              settings: Settings, jobs: int = 1) -> dict[str, Parsed]:
    """Read every fetched source; ``jobs`` > 1 reads in worker processes, which find their
    source by name in default_sources(), so only sources from there may be given then."""
    parsed: dict[str, Parsed] = {}
    words = settings.min_words, settings.max_words
    if jobs > 1 and len(todo) > 1:
        order = sorted(todo, key=lambda s: s.group != "technical")  # largest jobs first
        with ProcessPoolExecutor(max_workers=jobs) as ex:
            futs = {s.name: ex.submit(_parse_worker, (s.name, str(fetched[s.name].root), *words))
                    for s in order}
            for name, fut in futs.items():
                try:
                    parsed[name] = fut.result()
                except Exception as e:
                    _parse_failed(results, name, e)
    else:
        for s in todo:
            try:
                parsed[s.name] = parse_source(s, fetched[s.name].root, *words)
            except Exception as e:
                _parse_failed(results, s.name, e)
    for name, p in parsed.items():
        n = sum(len(d) for _, d in p.docs)
        LOG.info("parsed  %-18s %6d docs -> %7d sentences, %.2f MB (%.1fs)", name, len(p.docs), n,
                 sum(text_mb(d) for _, d in p.docs), p.seconds)
        if n == 0:
            results[name].update(status="failed", error="no clean sentences extracted")
    return parsed


def split_corpus(ok: Sequence[Source], parsed: dict[str, Parsed], caps: dict[str, float],
                 settings: Settings) -> tuple[list[str], list[str], dict[str, dict]]:
    """Select each source's documents within its cap, drop sentences an earlier document
    (of any source) already had, and send each document to train or heldout."""
    seen: set[int] = set()
    train_lines: list[str] = []
    heldout_lines: list[str] = []
    per_source: dict[str, dict] = {}
    for s in ok:
        chosen = select_docs(s.name, parsed[s.name].docs, caps[s.name], settings.seed)
        tr: list[str] = []
        ho: list[str] = []
        for doc_id, sents in chosen:
            sents = dedup(sents, seen)
            heldout = is_heldout(settings.seed, s.name, doc_id, settings.heldout_fraction)
            (ho if heldout else tr).extend(sents)
        train_lines.extend(tr)
        heldout_lines.extend(ho)
        per_source[s.name] = {"train": counts(tr), "heldout": counts(ho), "docs_selected": len(chosen)}
    return train_lines, heldout_lines, per_source


def corpus_stats(registry: Sequence[Source], settings: Settings, fetched: dict[str, Fetched],
                 results: dict[str, dict], parsed: dict[str, Parsed], available: dict[str, float],
                 caps: dict[str, float], per_source: dict[str, dict],
                 train_lines: list[str], heldout_lines: list[str]) -> dict:
    """The content of stats.json (less runtime_seconds, added when it is written)."""
    empty = {"sentences": 0, "words": 0, "mb": 0.0}
    stats: dict = {
        "format": "one sentence per line, ASCII, UTF-8 compatible; MB = 10**6 bytes incl. newlines",
        "seed": settings.seed,
        "heldout_fraction": settings.heldout_fraction,
        "min_words": settings.min_words,
        "max_words": settings.max_words,
        "group_caps_mb": {g: (None if math.isinf(v) else v) for g, v in settings.group_caps.items()},
        "sources": {},
        "groups": {},
        "failed_sources": [],
    }
    for s in registry:
        f = fetched.get(s.name)
        r = results[s.name]
        ps = per_source.get(s.name, {"train": empty, "heldout": empty, "docs_selected": 0})
        p = parsed.get(s.name)
        source_cap = settings.source_caps[s.name]
        entry = {
            "group": s.group,
            "kind": s.kind,
            "package": f.package if f else s.package,
            "version": f.version if f else None,
            "artifact": f.artifact if f else None,
            "sha256": f.sha256 if f else None,
            "licence": s.licence,
            "status": r["status"],
            "error": r.get("error"),
            "available": {
                "docs": len(p.docs) if p else 0,
                "sentences": sum(len(d) for _, d in p.docs) if p else 0,
                "mb": round(available.get(s.name, 0.0), 3),
            },
            "cap_mb": None if math.isinf(source_cap) else source_cap,
            "budget_mb": round(caps[s.name], 3) if s.name in caps else 0.0,
            "docs_selected": ps["docs_selected"],
            "train": ps["train"],
            "heldout": ps["heldout"],
            "total": merge_counts(ps["train"], ps["heldout"]),
            "parse_seconds": round(p.seconds, 1) if p else None,
        }
        stats["sources"][s.name] = entry
        if r["status"] != "ok":
            stats["failed_sources"].append({"source": s.name, "error": r.get("error")})
    for g in sorted({s.group for s in registry}):
        members = [stats["sources"][s.name] for s in registry if s.group == g]
        stats["groups"][g] = {
            "sources": [s.name for s in registry if s.group == g],
            "train": merge_counts(*[m["train"] for m in members]),
            "heldout": merge_counts(*[m["heldout"] for m in members]),
        }
    stats["total"] = {
        "train": counts(train_lines),
        "heldout": counts(heldout_lines),
    }
    stats["total"]["all"] = merge_counts(stats["total"]["train"], stats["total"]["heldout"])
    return stats


def build_corpus(registry: Sequence[Source], out: Path, work: Path, settings: Settings,
                 jobs: int = 1, refresh: bool = False) -> dict | None:
    """Build the corpus from ``registry`` into ``out`` (train.txt, heldout.txt,
    DATA_SOURCES.md, stats.json, all or none of them replaced); packages are cached in
    ``work``. Returns the stats, or None (writing nothing) if no source gave any text."""
    t_start = time.time()
    work = work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    fetched, results = fetch_all(registry, work, refresh)
    todo = [s for s in registry if s.name in fetched]
    parsed = parse_all(todo, fetched, results, settings, jobs)

    ok = [s for s in registry if s.name in parsed and results[s.name]["status"] != "failed"]
    available = {s.name: sum(text_mb(d) for _, d in parsed[s.name].docs) for s in ok}
    caps = compute_caps(available, {s.name: s.group for s in registry}, settings.source_caps,
                        settings.group_caps)
    train_lines, heldout_lines, per_source = split_corpus(ok, parsed, caps, settings)
    for s in ok:
        results[s.name]["status"] = "ok"
    if not train_lines:
        LOG.error("no text was produced by any source; nothing written")
        return None

    stats = corpus_stats(registry, settings, fetched, results, parsed, available, caps, per_source,
                         train_lines, heldout_lines)
    # The four outputs are replaced together: each is written under a temporary name, and
    # all are renamed into place only once every one is complete (ufb_ref.fsio).
    Path(out).mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as outputs:
        tmp = {name: outputs.enter_context(atomic_file(Path(out) / name))
               for name in ("stats.json", "DATA_SOURCES.md", "heldout.txt", "train.txt")}

        def write(name, text):
            with open(tmp[name], "w", encoding="utf-8", newline="\n") as fh:
                fh.write(text)

        write("train.txt", "".join(line + "\n" for line in train_lines))
        write("heldout.txt", "".join(line + "\n" for line in heldout_lines))
        write("DATA_SOURCES.md", render_data_sources(registry, results, stats))
        stats["runtime_seconds"] = round(time.time() - t_start, 1)
        write("stats.json", json.dumps(stats, indent=2) + "\n")

    t = stats["total"]
    LOG.info("wrote %s: train %d sentences / %d words / %.2f MB, heldout %d / %d / %.2f MB in %.0fs",
             out, t["train"]["sentences"], t["train"]["words"], t["train"]["mb"],
             t["heldout"]["sentences"], t["heldout"]["words"], t["heldout"]["mb"], stats["runtime_seconds"])
    if stats["failed_sources"]:
        LOG.warning("failed sources: %s", ", ".join(x["source"] for x in stats["failed_sources"]))
    return stats
