"""How much of each source goes in, and where: per-source and per-group caps shared by
water-filling, seeded whole-document selection, and the per-document train/heldout split."""

from __future__ import annotations

import hashlib
import math
from typing import Iterable, Sequence

MB = 1_000_000  # "MB" in stats and caps means 10**6 bytes of UTF-8/ASCII text.


def unit_hash(seed: int, *parts: str) -> float:
    """Deterministic value in [0, 1) from the seed and string parts."""
    h = hashlib.blake2b(digest_size=8)
    h.update(str(seed).encode())
    for p in parts:
        h.update(b"\x00")
        h.update(p.encode("utf-8", "surrogatepass"))
    return int.from_bytes(h.digest(), "little") / 2.0**64


def is_heldout(seed: int, source: str, doc_id: str, fraction: float) -> bool:
    """Document-level split: the same (seed, source, doc) always goes the same way."""
    return unit_hash(seed, "split", source, doc_id) < fraction


def text_mb(sentences: Iterable[str]) -> float:
    return sum(len(s) + 1 for s in sentences) / MB


def waterfill(demands: dict[str, float], total: float) -> dict[str, float]:
    """Share ``total`` among sources as evenly as possible, never above demand."""
    alloc = {k: 0.0 for k in demands}
    remaining = dict(demands)
    budget = total
    while remaining and budget > 1e-12:
        share = budget / len(remaining)
        small = {k: v for k, v in remaining.items() if v <= share}
        if not small:
            for k in remaining:
                alloc[k] += share
            return alloc
        for k, v in small.items():
            alloc[k] += v
            budget -= v
            del remaining[k]
    return alloc


def compute_caps(available: dict[str, float], groups: dict[str, str],
                 source_caps: dict[str, float], group_caps: dict[str, float]) -> dict[str, float]:
    """Per-source MB budget: min(available, source cap), then group caps by water-filling."""
    demand = {n: min(a, source_caps.get(n, math.inf)) for n, a in available.items()}
    caps = dict(demand)
    for g in sorted(set(groups.values())):
        members = {n: d for n, d in demand.items() if groups[n] == g}
        gcap = group_caps.get(g, math.inf)
        if sum(members.values()) > gcap:
            caps.update(waterfill(members, gcap))
    return caps


def select_docs(name: str, docs: list[tuple[str, list[str]]], cap_mb: float,
                seed: int) -> list[tuple[str, list[str]]]:
    """Keep whole documents, in seeded random order, until cap_mb is reached.

    The document that crosses the cap is truncated; original order is restored.
    """
    total = sum(text_mb(s) for _, s in docs)
    if total <= cap_mb:
        return docs
    order = sorted(range(len(docs)), key=lambda i: unit_hash(seed, "select", name, docs[i][0]))
    budget = cap_mb * MB
    chosen: dict[int, list[str]] = {}
    for i in order:
        if budget <= 0:
            break
        sents = docs[i][1]
        size = sum(len(s) + 1 for s in sents)
        if size > budget:
            keep = []
            for s in sents:
                if budget - (len(s) + 1) < 0:
                    break
                keep.append(s)
                budget -= len(s) + 1
            if keep:
                chosen[i] = keep
            break
        chosen[i] = sents
        budget -= size
    return [(docs[i][0], chosen[i]) for i in sorted(chosen)]


def counts(sentences: Sequence[str]) -> dict:
    """Sentences, words and MB of a list of sentences, as stats.json records them."""
    return {
        "sentences": len(sentences),
        "words": sum(len(s.split()) for s in sentences),
        "mb": round(text_mb(sentences), 3),
    }


def merge_counts(*cs: dict) -> dict:
    return {
        "sentences": sum(c["sentences"] for c in cs),
        "words": sum(c["words"] for c in cs),
        "mb": round(sum(c["mb"] for c in cs), 3),
    }
