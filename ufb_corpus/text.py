"""Text cleaning shared by every reader's output: ASCII normalisation, a regex sentence
splitter, the sentence filter and de-duplication."""

from __future__ import annotations

import hashlib
import re
import unicodedata
from typing import Iterable

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


# A blank line (possibly holding spaces): the paragraph break every reader emits.
PARA_SPLIT_RE = re.compile(r"\n[ \t\r\f\v]*\n")
_DOUBLE_PERIOD_RE = re.compile(r"(?<!\.)\.\.(?!\.)")


def text_to_sentences(text: str, min_words: int = 5, max_words: int = 60) -> list[str]:
    """Blank lines are hard boundaries; single newlines are just whitespace."""
    text = ascii_normalize(text)
    out = []
    for para in PARA_SPLIT_RE.split(text):
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
