"""Writers of the small binary corpus fixtures (SWORD modules, an R lazy-load database, a
dictd dictionary) and the XDR helpers the R-data tests build objects with.

    python tests/corpus_fixtures.py      # rewrites the binary files under tests/data/corpus

The text fixtures next to them (HTML, POD, WordNet, JSON, copyright files) are written by
hand. test_corpus_readers.py checks that what this script writes reads back as the
committed files do.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent / "data" / "corpus"

# --------------------------------------------------------------------------
# SWORD zVerse modules
# --------------------------------------------------------------------------


def write_zverse(mod_dir: Path, testament: str, prefix: str, blocks: list[list[bytes]],
                 record: int, extra_records=()) -> None:
    """Write <testament>.<prefix>z{s,v,z}: one zlib block per list of entries, then one
    verse record (of ``record`` bytes) per entry, then ``extra_records`` as given."""
    bzs, bzv, bzz = b"", b"", b""
    fmt = "<IIH" if record == 10 else "<III"
    bzv += struct.pack(fmt, 0, 0, 0)  # an empty leading entry, as in real modules
    for bno, entries in enumerate(blocks):
        raw = b"".join(entries)
        comp = zlib.compress(raw)
        bzs += struct.pack("<III", len(bzz), len(comp), len(raw))
        bzz += comp
        off = 0
        for e in entries:
            bzv += struct.pack(fmt, bno, off, len(e))
            off += len(e)
    for rec in extra_records:
        bzv += struct.pack(fmt, *rec)
    mod_dir.mkdir(parents=True, exist_ok=True)
    (mod_dir / f"{testament}.{prefix}zs").write_bytes(bzs)
    (mod_dir / f"{testament}.{prefix}zv").write_bytes(bzv)
    (mod_dir / f"{testament}.{prefix}zz").write_bytes(bzz)


def write_sword_module(root: Path, name: str, drv: str, prefix: str, record: int, blocks,
                       extra=(), source_type: str = "OSIS") -> Path:
    """A module (mods.d/<name>.conf and its data) under <root>/usr/share/sword."""
    sword = root / "usr" / "share" / "sword"
    (sword / "mods.d").mkdir(parents=True, exist_ok=True)
    kind = "comments" if drv.lower().startswith("zcom") else "texts"
    data_path = f"./modules/{kind}/{drv.lower()}/{name.lower()}/"
    block_type = {"b": "BOOK", "c": "CHAPTER"}[prefix]
    (sword / "mods.d" / f"{name.lower()}.conf").write_text(
        f"[{name}]\nDataPath={data_path}\nModDrv={drv}\n"
        f"SourceType={source_type}\nCompressType=ZIP\nBlockType={block_type}\nEncoding=UTF-8\n"
        "About=A test module \\\n  spanning two lines\nDistributionLicense=Public Domain\n")
    write_zverse(sword / data_path, "ot", prefix, blocks, record, extra)
    return sword


VERSES = [
    [b'<title type="main">Chapter One</title><w lemma="strong:H1">In</w> the beginning God'
     b'<note placement="foot">A footnote that must vanish.</note> made the world. ',
     b"The earth was &amp; empty and dark, and the deep was still. "],
    [b'<div sID="p1" type="x-p"/>Then he spoke \xe2\x80\x9cLet there be light,\xe2\x80\x9d and there was light. ',
     b"It was good in every way that mattered. "],
]

COMMENTARY = [
    [b"<p>The first verse opens the whole book with a plain statement of faith.</p>",
     b'<p>Here the <scripRef passage="Ge 1:2">second verse</scripRef> describes the waters of the deep.</p>'],
    [b"<p>Light is the first thing that is named in the account of creation.</p>"],
]

# --------------------------------------------------------------------------
# R serialization (XDR)
# --------------------------------------------------------------------------


def xdr_int(v: int) -> bytes:
    return struct.pack(">i", v)


def xdr_charsxp(s: str | None) -> bytes:
    if s is None:  # NA_character_
        return xdr_int(9) + xdr_int(-1)
    b = s.encode()
    return xdr_int(9 | ((1 << 3) << 12)) + xdr_int(len(b)) + b  # UTF-8 flag in the levels


def xdr_strsxp(items) -> bytes:
    return xdr_int(16) + xdr_int(len(items)) + b"".join(xdr_charsxp(s) for s in items)


def xdr_names_attr(names) -> bytes:
    # pairlist(names = <STRSXP>): LISTSXP with tag, SYMSXP tag, car, NILVALUE cdr
    return (xdr_int(2 | (1 << 10)) + xdr_int(1) + xdr_charsxp("names")
            + xdr_strsxp(names) + xdr_int(254))


def xdr_named_list(named_items) -> bytes:
    body = b"".join(v for _, v in named_items)
    return (xdr_int(19 | (1 << 9)) + xdr_int(len(named_items)) + body
            + xdr_names_attr([k for k, _ in named_items]))


def xdr(obj: bytes, version: int = 3) -> bytes:
    head = b"X\n" + xdr_int(version) + xdr_int(0x040201) + xdr_int(0x030500)
    if version == 3:
        head += xdr_int(5) + b"UTF-8"
    return head + obj


def lazyload_db(objects: dict[str, bytes], codec: bytes | None = None) -> tuple[bytes, bytes]:
    """(.rdx, .rdb) of a lazy-load database holding serialized ``objects``; ``codec`` None
    writes compression type 1 (zlib), else type 3 with that codec byte (b"Z", b"2", b"1")."""
    import bz2
    import lzma
    rdb = b""
    variables = []
    for name, obj in objects.items():
        payload = xdr(obj)
        if codec is None:
            blob = xdr_int(len(payload)) + zlib.compress(payload)
        else:
            compress = {b"Z": lzma.compress, b"2": bz2.compress, b"1": zlib.compress, b"0": bytes}[codec]
            blob = xdr_int(len(payload)) + codec + compress(payload)
        variables.append((name, xdr_int(13) + xdr_int(2) + xdr_int(len(rdb)) + xdr_int(len(blob))))
        rdb += blob
    index = xdr(xdr_named_list([
        ("variables", xdr_named_list(variables)),
        ("references", xdr_int(19) + xdr_int(0)),
        ("compressed", xdr_int(10) + xdr_int(1) + xdr_int(1 if codec is None else 3)),
    ]), version=2)
    return gzip.compress(index, mtime=0), rdb


EMMA = ["EMMA", "", "CHAPTER I", "", "Emma Woodhouse, handsome, clever, and rich, had lived.",
        "She was the youngest of the two daughters.", None, "", "CHAPTER II", "",
        "Mr. Weston was a native of Highbury, and born of a respectable family."]
PERSUASION = ["PERSUASION", "", "Chapter 1", "", "Sir Walter Elliot never took up any book but one.",
              "He found in it occupation for an idle hour."]

# --------------------------------------------------------------------------
# dictd
# --------------------------------------------------------------------------

_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def dictd_b64(n: int) -> str:
    s = ""
    while True:
        s = _B64[n % 64] + s
        n //= 64
        if not n:
            return s


DICT_ENTRIES = [
    ("foo", "FOO, n.  A _thing_ that is {bar} in every way possible.\n\n"),
    ("baz", "BAZ, v.  To do the thing that one always does.\n\n"),
    ("all software sucks", "All software sucks\n prov.\n\n    A saying about\n    all computer programs.\n\n"),
]


def write_dictd(folder: Path, stem: str) -> None:
    """<stem>.index and <stem>.dict.dz (gzip; dictzip's random-access header is not needed)."""
    data = "00-database-info\nA test dictionary.\n\n"
    index = [f"00-database-info\t{dictd_b64(0)}\t{dictd_b64(len(data))}"]
    for head, body in DICT_ENTRIES:
        index.append(f"{head}\t{dictd_b64(len(data.encode()))}\t{dictd_b64(len(body.encode()))}")
        data += body
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}.index").write_text("\n".join(index) + "\n")
    (folder / f"{stem}.dict.dz").write_bytes(gzip.compress(data.encode(), mtime=0))


# --------------------------------------------------------------------------


def write_all(dest: Path) -> None:
    """Every generated fixture, under ``dest`` as under tests/data/corpus."""
    write_sword_module(dest / "sword", "TestBible", "zText", "b", 10, VERSES)
    # a commentary with 12-byte records, ThML markup and a linked (repeated) entry
    write_sword_module(dest / "sword", "TestComm", "zCom4", "c", 12, COMMENTARY,
                       extra=[(0, 0, len(COMMENTARY[0][0]))], source_type="ThML")
    data = dest / "rdata" / "usr" / "lib" / "R" / "site-library" / "janeaustenr" / "data"
    data.mkdir(parents=True, exist_ok=True)
    rdx, rdb = lazyload_db({"emma": xdr_strsxp(EMMA), "persuasion": xdr_strsxp(PERSUASION),
                            "year": xdr_int(13) + xdr_int(1) + xdr_int(1815)})
    (data / "Rdata.rdx").write_bytes(rdx)
    (data / "Rdata.rdb").write_bytes(rdb)
    write_dictd(dest / "dictd" / "usr" / "share" / "dictd", "test")


if __name__ == "__main__":
    write_all(FIXTURES)
    print(f"wrote the generated fixtures under {FIXTURES}")
