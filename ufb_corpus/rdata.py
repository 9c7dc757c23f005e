"""R data: a minimal reader of R's XDR serialization (versions 2 and 3) for .rds, .rda
and lazy-load databases (.rdx/.rdb), and the janeaustenr package's novels read with it."""

from __future__ import annotations

import bz2
import dataclasses
import gzip
import lzma
import re
import struct
import zlib
from pathlib import Path
from typing import Iterator, Sequence


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


# SEXP type codes (R's serialize.c) grouped by how they are stored.
_SINGLETONS = frozenset({241, 242, 250, 251, 252, 253, 254})  # R_NilValue, the base/empty/global
# environments, unbound value, missing argument, base namespace: no payload
_PAIRLISTS = frozenset({2, 3, 5, 6, 17, 239, 240})  # LIST CLO PROM LANG DOT, ATTRLANG, ATTRLIST
_NAMED_REFS = {247: "persist", 248: "namespace", 249: "namespace"}  # PERSIST, PACKAGE, NAMESPACE
_NA_INTEGER = -2**31
_INT = struct.Struct(">i")


def tagged(pairlist: RList | None) -> dict:
    """The tagged elements of a pairlist by tag (attributes, the objects of an .rda file)."""
    if pairlist is None:
        return {}
    return {k: v for k, v in zip(pairlist.attrs.get("tags", []), pairlist) if k}


class RUnserializer:
    """Reads the subset of R's serialization needed for data objects."""

    def __init__(self, data: bytes):
        self.d = data
        self.p = 0
        self.refs: list = []

    def _numbers(self, code: str, n: int) -> tuple:
        vals = struct.unpack_from(f">{n}{code}", self.d, self.p)
        self.p += n * struct.calcsize(code)
        return vals

    def _int(self) -> int:
        v = _INT.unpack_from(self.d, self.p)[0]
        self.p += 4
        return v

    def _bytes(self, n: int) -> bytes:
        raw = self.d[self.p:self.p + n]
        self.p += n
        return raw

    def _len(self) -> int:
        n = self._int()
        if n == -1:  # a long vector: the length follows as two 32-bit halves
            hi, lo = self._int(), self._int()
            n = (hi << 32) + lo
        return n

    def _attrs(self) -> dict:
        return tagged(self._item())

    def parse(self):
        if self.d[:2] != b"X\n":
            raise ValueError("only XDR ('X') R serialization is supported")
        self.p = 2
        version = self._int()
        self._int()  # writer's R version
        self._int()  # oldest R version that can read it
        if version == 3:
            self._bytes(self._int())  # native encoding name
        elif version != 2:
            raise ValueError(f"unsupported R serialization version {version}")
        return self._item()

    def _pairlist(self, flags: int):
        items: list[tuple[str | None, object]] = []
        attrs = None
        while True:
            t = flags & 0xFF
            if t not in _PAIRLISTS:
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

    def _item(self):
        flags = self._int()
        t = flags & 0xFF
        has_attr = bool(flags & (1 << 9))
        if t in _SINGLETONS:
            return None
        if t == 255:  # REFSXP
            idx = flags >> 8
            if idx == 0:
                idx = self._int()
            return self.refs[idx - 1]
        if t in _NAMED_REFS:
            self._int()
            n = self._int()
            obj = ROpaque(_NAMED_REFS[t], [self._item() for _ in range(n)])
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
        if t in _PAIRLISTS:
            lst, attrs = self._pairlist(flags)
            lst.attrs.update(tagged(attrs))
            return lst
        if t == 9:  # CHARSXP
            n = self._int()
            if n == -1:
                return None
            raw = self._bytes(n)
            levels = flags >> 12
            if levels & (1 << 2):
                return raw.decode("latin-1")
            return raw.decode("utf-8", "replace")
        if t in (7, 8):  # SPECIALSXP / BUILTINSXP
            return ROpaque("builtin", self._bytes(self._int()).decode("latin-1"))
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
            if isinstance(val, RList):
                val.attrs.update(tagged(attr))
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
                obj.value = self._attrs()
            return obj
        if t == 24:  # RAWSXP
            val = self._bytes(self._len())
            if has_attr:
                self._item()
            return val
        if t in (10, 13):  # LGLSXP / INTSXP
            val = RList(None if v == _NA_INTEGER else v for v in self._numbers("i", self._len()))
        elif t == 14:  # REALSXP
            val = RList(self._numbers("d", self._len()))
        elif t == 15:  # CPLXSXP: (real, imaginary) pairs
            raw = self._numbers("d", 2 * self._len())
            val = RList(complex(re_, im) for re_, im in zip(raw[0::2], raw[1::2]))
        elif t in (16, 19, 20):  # STRSXP / VECSXP / EXPRSXP
            val = RList(self._item() for _ in range(self._len()))
        else:
            raise ValueError(f"unsupported R SEXP type {t}")
        if has_attr:
            val.attrs.update(self._attrs())
        return val


_MAGIC = ((b"\x1f\x8b", gzip.decompress), (b"BZh", bz2.decompress), (b"\xfd7zXZ\x00", lzma.decompress))
# A lazy-load blob of compression type 2 or 3 names its codec in its fifth byte ('0': stored).
_LAZYLOAD_CODECS = {b"Z": lzma.decompress, b"2": bz2.decompress, b"1": zlib.decompress}


def _decompress_by_magic(data: bytes) -> bytes:
    for magic, decompress in _MAGIC:
        if data.startswith(magic):
            return decompress(data)
    return data


def read_rds(data: bytes):
    """Unserialize an .rds payload (possibly gzip/bzip2/xz compressed)."""
    return RUnserializer(_decompress_by_magic(data)).parse()


def read_rda(data: bytes) -> dict[str, object]:
    """Objects of an .rda/.RData file (``RDX2``/``RDX3`` header) by name."""
    data = _decompress_by_magic(data)
    if data[:5] not in (b"RDX2\n", b"RDX3\n"):
        raise ValueError("not an RDX2/RDX3 .rda file")
    return tagged(RUnserializer(data[5:]).parse())


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
        blob = rdb[off:off + length]  # 4 bytes of uncompressed length, then the payload
        if ctype == 1:
            payload = zlib.decompress(blob[4:])
        else:
            payload = _LAZYLOAD_CODECS.get(blob[4:5], bytes)(blob[5:])
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
