"""dictd dictionaries (.index + .dict[.dz]): one document per entry, headword apart."""

from __future__ import annotations

import gzip
import re
from pathlib import Path
from typing import Iterator


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
