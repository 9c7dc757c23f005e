"""SWORD zText/zCom(4) modules (Bible text and commentaries): a mods.d/*.conf, a block
index, a verse index and zlib/bzip2/xz blocks; OSIS/ThML/GBF markup is stripped."""

from __future__ import annotations

import bz2
import html
import lzma
import os
import re
import struct
import zlib
from pathlib import Path
from typing import Callable, Iterator


class UnsupportedModule(Exception):
    """A module this reader cannot read (driver, cipher, compression or missing files)."""


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
# A verse record: block number, offset in the block, size (uint16 in zVerse, uint32 in zVerse4).
_VERSE_RECORDS = {10: struct.Struct("<IIH"), 12: struct.Struct("<III")}


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
    rec = _VERSE_RECORDS[size]
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
    rec = _VERSE_RECORDS[verse_record_size]
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
