"""Fast, offline tests of scripts/build_corpus.py (no apt, no npm, no network)."""

from __future__ import annotations

import gzip
import importlib.util
import json
import struct
import sys
import zlib
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "scripts" / "build_corpus.py"
_spec = importlib.util.spec_from_file_location("build_corpus", _PATH)
bc = importlib.util.module_from_spec(_spec)
sys.modules["build_corpus"] = bc
_spec.loader.exec_module(bc)


# --------------------------------------------------------------------------
# cleaning / splitting / dedup / split
# --------------------------------------------------------------------------


def test_ascii_normalize():
    s = "\u201cCaf\u00e9\u201d \u2014 it\u2019s na\u00efve \ufb01ne \u00e6ther \u2013 \u4e2d ok"
    assert bc.ascii_normalize(s) == "\"Cafe\"  -  it's naive fine aether -  ok"
    assert bc.collapse_ws(" a \n\t b  ") == "a b"


def test_split_sentences_handles_abbreviations_and_quotes():
    para = ('Mr. Smith met Dr. J. Watson at 5 p.m. on Baker St. in London. '
            '"Is it you?" he asked. It was! Then e.g. apples came. The end.')
    assert bc.split_sentences(para) == [
        "Mr. Smith met Dr. J. Watson at 5 p.m. on Baker St. in London.",
        '"Is it you?" he asked.',
        "It was!",
        "Then e.g. apples came.",
        "The end.",
    ]
    assert bc.split_sentences("no terminal punctuation here") == ["no terminal punctuation here"]


@pytest.mark.parametrize("sentence,ok", [
    ("The quick brown fox jumps over the lazy dog.", True),
    ('"Where are you going?" she asked him quietly.', True),
    ("In 1790 the nation had about four million people.", True),
    ("Too short to keep.", False),                              # < 5 words
    (" ".join(["word"] * 61) + ".", False),                     # > 60 words
    ("the sentence starts with a lowercase letter.", False),
    ("This sentence has no terminal punctuation at all", False),
    ("Call foo_bar(x) with the value of x = 5 here.", False),   # code-ish
    ("See https://example.org for all of the details.", False),
    ("THIS IS ALL SHOUTING AND NOT A NORMAL SENTENCE.", False),
    ("Numbers 12 34 56 78 90 11 22 33 dominate this one.", False),
    ("It has an (unbalanced parenthesis in the text.", False),
])
def test_is_clean_sentence(sentence, ok):
    assert bc.is_clean_sentence(sentence) is ok


def test_text_to_sentences_paragraphs():
    text = ("A heading without a full stop\n\n"
            "This paragraph is wrapped\nover two lines and it continues here. "
            "Here is a second sentence in it!\n\n"
            "<b>markup</b> never reaches here because it is rejected.")
    assert bc.text_to_sentences(text) == [
        "This paragraph is wrapped over two lines and it continues here.",
        "Here is a second sentence in it!",
    ]


def test_dedup_is_case_and_punctuation_insensitive():
    seen: set[int] = set()
    out = bc.dedup(["The cat sat on the mat.", "the cat sat, on the mat!", "A dog sat on the mat."], seen)
    assert out == ["The cat sat on the mat.", "A dog sat on the mat."]
    assert bc.dedup(["THE CAT SAT ON THE MAT."], seen) == []


def test_heldout_split_is_deterministic_and_seeded():
    ids = [f"doc{i}" for i in range(20000)]
    a = [bc.is_heldout(7, "src", d, 0.1) for d in ids]
    assert a == [bc.is_heldout(7, "src", d, 0.1) for d in ids]
    assert 0.08 < sum(a) / len(a) < 0.12
    b = [bc.is_heldout(8, "src", d, 0.1) for d in ids]
    assert a != b
    assert not any(bc.is_heldout(7, "src", d, 0.0) for d in ids[:100])


def test_select_docs_and_caps():
    docs = [(f"d{i}", [f"Sentence number {i} is right here."] * 10) for i in range(50)]
    total = sum(bc.text_mb(s) for _, s in docs)
    assert bc.select_docs("x", docs, total + 1, 1) == docs
    cap = total / 5
    sel = bc.select_docs("x", docs, cap, 1)
    assert sel == bc.select_docs("x", docs, cap, 1)
    assert sum(bc.text_mb(s) for _, s in sel) <= cap + 1e-9
    assert sum(bc.text_mb(s) for _, s in sel) > cap * 0.9
    idx = [int(d[1:]) for d, _ in sel]
    assert idx == sorted(idx)  # original order kept
    assert sel != bc.select_docs("x", docs, cap, 2)

    caps = bc.compute_caps({"a": 1.0, "b": 10.0, "c": 10.0, "t": 3.0},
                           {"a": "g", "b": "g", "c": "g", "t": "h"},
                           {"a": 5.0, "b": 5.0, "c": 5.0, "t": 5.0}, {"g": 7.0})
    assert caps == pytest.approx({"a": 1.0, "b": 3.0, "c": 3.0, "t": 3.0})


# --------------------------------------------------------------------------
# SWORD zText / zCom
# --------------------------------------------------------------------------


def _write_zverse(mod_dir: Path, testament: str, prefix: str, blocks: list[list[bytes]],
                  record: int, extra_records=()):
    """Write <testament>.<prefix>zs/zv/zz for blocks of entries."""
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
    (mod_dir / f"{testament}.{prefix}zs").write_bytes(bzs)
    (mod_dir / f"{testament}.{prefix}zv").write_bytes(bzv)
    (mod_dir / f"{testament}.{prefix}zz").write_bytes(bzz)


def _make_module(tmp_path: Path, name: str, drv: str, prefix: str, record: int, blocks, extra=()):
    root = tmp_path / "usr" / "share" / "sword"
    (root / "mods.d").mkdir(parents=True, exist_ok=True)
    mod_dir = root / "modules" / "texts" / "ztext" / name.lower()
    mod_dir.mkdir(parents=True)
    block_type = {"b": "BOOK", "c": "CHAPTER"}[prefix]
    (root / "mods.d" / f"{name.lower()}.conf").write_text(
        f"[{name}]\nDataPath=./modules/texts/ztext/{name.lower()}/\nModDrv={drv}\n"
        f"SourceType=OSIS\nCompressType=ZIP\nBlockType={block_type}\nEncoding=UTF-8\n"
        "About=A test module \\\n  spanning two lines\nDistributionLicense=Public Domain\n")
    _write_zverse(mod_dir, "ot", prefix, blocks, record, extra)
    return root


VERSES = [
    [b'<title type="main">Chapter One</title><w lemma="strong:H1">In</w> the beginning God'
     b'<note placement="foot">A footnote that must vanish.</note> made the world. ',
     b"The earth was &amp; empty and dark, and the deep was still. "],
    [b'<div sID="p1" type="x-p"/>Then he spoke \xe2\x80\x9cLet there be light,\xe2\x80\x9d and there was light. ',
     b"It was good in every way that mattered. "],
]


def test_sword_ztext_module(tmp_path):
    _make_module(tmp_path, "TestBible", "zText", "b", 10, VERSES)
    docs = list(bc.read_sword_package(tmp_path))
    text = "\n\n".join(t for _, t in docs)
    assert "footnote" not in text and "<" not in text and "strong" not in text
    sents = bc.text_to_sentences(text)
    assert sents == [
        "In the beginning God made the world.",
        "The earth was & empty and dark, and the deep was still.",
        "Then he spoke \"Let there be light,\" and there was light.",
        "It was good in every way that mattered.",
    ]
    assert all(doc_id.startswith("TestBible:ot:") for doc_id, _ in docs)


def test_sword_zcom4_and_wrong_record_size_and_linked_entries(tmp_path):
    # a zCom4 module with 12-byte records, plus a linked (repeated) entry
    root = _make_module(tmp_path / "a", "Comm", "zCom4", "c", 12, VERSES, extra=[(1, 0, 20)])
    name, conf = bc.parse_sword_conf((root / "mods.d" / "comm.conf").read_text())
    assert name == "Comm" and conf["About"].startswith("A test module")
    got = [t for _, t in bc.read_sword_module(root, conf)]
    assert len(bc.text_to_sentences("\n\n".join(got))) == 4
    # a conf saying zCom4 over 10-byte records (as sword-comm-mhcc ships) still parses
    root = _make_module(tmp_path / "b", "Mhcc", "zCom4", "b", 10, VERSES)
    _, conf = bc.parse_sword_conf((root / "mods.d" / "mhcc.conf").read_text())
    got = [t for _, t in bc.read_sword_module(root, conf)]
    assert len(bc.text_to_sentences("\n\n".join(got))) == 4


def test_read_zverse_records():
    raw = b"alpha beta gamma"
    comp = zlib.compress(raw)
    bzs = struct.pack("<III", 0, len(comp), len(raw))
    bzv = struct.pack("<IIH", 0, 0, 5) + struct.pack("<IIH", 0, 6, 4) + struct.pack("<IIH", 0, 0, 5) \
        + struct.pack("<IIH", 0, 11, 0)
    assert [(n, r) for n, _, r in bc.read_zverse(bzs, bzv, comp, 10)] == [(0, b"alpha"), (1, b"beta")]


def test_strip_sword_markup_variants():
    assert bc.strip_sword_markup("A<RF>note<Rf> b<CM>C", "GBF").split() == ["A", "b", "C"]
    out = bc.strip_sword_markup('<p>One.</p><scripRef passage="Ge 1:1">Ge 1:1</scripRef> two', "ThML")
    assert out.split() == ["One.", "Ge", "1:1", "two"]


# --------------------------------------------------------------------------
# other formats
# --------------------------------------------------------------------------


def test_html_to_text_drops_code_and_navigation():
    page = ("<html><head><title>T</title><script>var x = 1;</script></head><body>"
            "<div class='navheader'>Prev Next</div><h1>Title</h1>"
            "<p>Use the <code>open</code> function to read files.</p>"
            "<pre>print('hello')</pre><div class='highlight'><pre>x=1</pre></div>"
            "<p>Second&nbsp;para.<br/>Line</p><div class='footer'>(c) 2023</div></body></html>")
    text = bc.html_to_text(page)
    assert "var x" not in text and "Prev" not in text and "print" not in text
    assert "x=1" not in text and "(c)" not in text
    assert "Use the open function to read files." in text
    paras = [bc.collapse_ws(p) for p in bc._PARA_SPLIT_RE.split(text) if p.strip()]
    assert paras == ["Title", "Use the open function to read files.", "Second para.", "Line"]


def test_pod_to_sections():
    pod = ("=head1 NAME\n\nperlfoo - B<bold> and I<italic>\n\n"
           "=head2 Usage\n\nCall C<< $x->y >> or L<perlfunc/open> and L<text|perlop> E<lt>hiE<gt>.\n\n"
           "    my $code = 1;\n\n=over\n\n=item * An item\n\n=back\n\n"
           "=begin html\n\n<p>skip</p>\n\n=end html\n\n=cut\n\nsub not_pod {}\n")
    secs = bc.pod_to_sections(pod)
    assert secs == [
        ("NAME", "perlfoo - bold and italic"),
        ("Usage", "Call $x->y or open in perlfunc and text <hi>.\n\nAn item"),
    ]


def _xdr_int(v):
    return struct.pack(">i", v)


def _xdr_charsxp(s: str):
    b = s.encode()
    return _xdr_int(9 | ((1 << 3) << 12)) + _xdr_int(len(b)) + b


def _xdr_strsxp(items):
    return _xdr_int(16) + _xdr_int(len(items)) + b"".join(_xdr_charsxp(s) for s in items)


def _xdr_names_attr(names):
    # pairlist(names = <STRSXP>): LISTSXP with tag, SYMSXP tag, car, NILVALUE cdr
    return (_xdr_int(2 | (1 << 10)) + _xdr_int(1) + _xdr_charsxp("names")
            + _xdr_strsxp(names) + _xdr_int(254))


def _xdr_named_list(named_items):
    body = b"".join(v for _, v in named_items)
    return (_xdr_int(19 | (1 << 9)) + _xdr_int(len(named_items)) + body
            + _xdr_names_attr([k for k, _ in named_items]))


def _xdr(obj: bytes, version=3):
    head = b"X\n" + _xdr_int(version) + _xdr_int(0x040201) + _xdr_int(0x030500)
    if version == 3:
        head += _xdr_int(5) + b"UTF-8"
    return head + obj


def test_r_lazyload_db_and_chapters():
    book = ["EMMA", "", "CHAPTER I", "", "Emma Woodhouse, handsome, clever, and rich, had lived.",
            "She was the youngest of the two daughters.", "", "CHAPTER II", "", "Mr. Weston was a native."]
    payload = _xdr(_xdr_strsxp(book))
    blob = _xdr_int(len(payload)) + zlib.compress(payload)
    index = _xdr(_xdr_named_list([
        ("variables", _xdr_named_list([("emma", _xdr_int(13) + _xdr_int(2) + _xdr_int(0) + _xdr_int(len(blob)))])),
        ("references", _xdr_int(19) + _xdr_int(0)),
        ("compressed", _xdr_int(10) + _xdr_int(1) + _xdr_int(1)),
    ]), version=2)
    objs = bc.read_lazyload_db(gzip.compress(index), blob)
    assert list(objs) == ["emma"] and list(objs["emma"]) == book
    chapters = bc.lines_to_chapters(objs["emma"])
    assert len(chapters) == 3
    assert bc.text_to_sentences(chapters[1]) == [
        "Emma Woodhouse, handsome, clever, and rich, had lived.",
        "She was the youngest of the two daughters."]
    rda = gzip.compress(b"RDX3\n" + _xdr(_xdr_int(2 | (1 << 10)) + _xdr_int(1) + _xdr_charsxp("x")
                                        + _xdr_strsxp(["a", "b"]) + _xdr_int(254)))
    assert {k: list(v) for k, v in bc.read_rda(rda).items()} == {"x": ["a", "b"]}


def test_dictd_and_wordnet(tmp_path):
    body1 = "FOO, n.  A _thing_ that is {bar} in every way possible.\n\n"
    body2 = "BAZ, v.  To do the thing that one always does.\n\n"
    data = ("00-database-info\nheader\n" + body1 + body2).encode()
    o1 = data.index(b"FOO")
    o2 = data.index(b"BAZ")

    def b64(n):
        s = ""
        while True:
            s = bc._B64[n % 64] + s
            n //= 64
            if not n:
                return s

    assert bc.dictd_b64(b64(123456)) == 123456
    (tmp_path / "t.index").write_text(f"00-database-info\tA\tW\nfoo\t{b64(o1)}\t{b64(len(body1))}\n"
                                      f"baz\t{b64(o2)}\t{b64(len(body2))}\n")
    (tmp_path / "t.dict.dz").write_bytes(gzip.compress(data))
    entries = list(bc.read_dictd(tmp_path / "t.index", tmp_path / "t.dict.dz"))
    assert [k for k, _ in entries] == ["foo", "baz"]
    assert bc.text_to_sentences(entries[0][1]) == ["A thing that is bar in every way possible."]
    jargon = bc.split_dict_headword("All software sucks, really.",
                                    "All software sucks, really.\n prov.\n\n    A saying about\n    all computer programs.")
    assert jargon.split("\n\n")[0] == "All software sucks, really."
    assert "prov." not in jargon and bc.text_to_sentences(jargon)[-1] == "A saying about all computer programs."
    assert bc.split_dict_headword("cat", "CAT, n.  A small pet.") == "CAT\n\n  A small pet."
    assert bc.split_dict_headword("dog", "DOG\n\n  A loyal pet.") == "DOG\n\nA loyal pet."
    parts = bc.wordnet_gloss_parts('draw air into, and expel out of, the lungs; "I can breathe better now"  ')
    assert parts == ["Draw air into, and expel out of, the lungs.", "I can breathe better now."]


# --------------------------------------------------------------------------
# CLI: end to end with an injected source, atomic outputs
# --------------------------------------------------------------------------


def _fake_source(tmp_path: Path, name="fake", fail=False):
    root = tmp_path / f"root_{name}"
    root.mkdir(exist_ok=True)

    def fetch(work, refresh):
        if fail:
            raise bc.FetchError("registry unreachable")
        return bc.Fetched(name, "1.0", f"{name}.deb", "0" * 64, root)

    def spell(n):
        return "".join("abcdefghij"[int(c)] for c in str(n))

    def reader(r):
        for d in range(300):
            yield f"doc{d}", " ".join(f"Document {spell(d)} has a sentence numbered {spell(i)} in it."
                                      for i in range(5))

    return bc.Source(name, "test", "custom", name, "Public domain", "synthetic", reader,
                     notice=lambda r: "Notice text.", fetch=fetch)


def test_cli_builds_outputs(tmp_path):
    out = tmp_path / "out"
    rc = bc.main(["--out", str(out), "--work", str(tmp_path / "w"), "--heldout-fraction", "0.1",
                  "--seed", "3"], sources=[_fake_source(tmp_path), _fake_source(tmp_path, "broken", fail=True)])
    assert rc == 0
    train = (out / "train.txt").read_text().splitlines()
    held = (out / "heldout.txt").read_text().splitlines()
    assert train and held and not set(train) & set(held)
    assert len(train) + len(held) == 1500
    stats = json.loads((out / "stats.json").read_text())
    assert stats["sources"]["fake"]["status"] == "ok"
    assert stats["sources"]["broken"]["status"] == "failed"
    assert stats["failed_sources"][0]["source"] == "broken"
    assert stats["total"]["train"]["sentences"] == len(train)
    md = (out / "DATA_SOURCES.md").read_text()
    assert "Notice text." in md and "broken" in md
    assert sorted(p.name for p in out.iterdir()) == ["DATA_SOURCES.md", "heldout.txt", "stats.json", "train.txt"]
    # same seed -> identical output
    out2 = tmp_path / "out2"
    bc.main(["--out", str(out2), "--work", str(tmp_path / "w"), "--heldout-fraction", "0.1", "--seed", "3"],
            sources=[_fake_source(tmp_path)])
    assert (out2 / "train.txt").read_bytes() == (out / "train.txt").read_bytes()


def test_cli_writes_atomically(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "train.txt").write_text("old\n")

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(bc, "render_data_sources", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        bc.main(["--out", str(out), "--work", str(tmp_path / "w")], sources=[_fake_source(tmp_path)])
    # nothing partial: old file untouched, no new outputs, no temporaries left
    assert sorted(p.name for p in out.iterdir()) == ["train.txt"]
    assert (out / "train.txt").read_text() == "old\n"


def test_cli_fails_cleanly_when_nothing_fetched(tmp_path):
    out = tmp_path / "out"
    rc = bc.main(["--out", str(out), "--work", str(tmp_path / "w")],
                 sources=[_fake_source(tmp_path, "broken", fail=True)])
    assert rc == 1
    assert not out.exists() or not any(out.iterdir())


def test_cli_help_and_sources(capsys):
    with pytest.raises(SystemExit) as e:
        bc.main(["--help"])
    assert e.value.code == 0
    assert "--max-mb-per-source" in capsys.readouterr().out
    assert bc.main(["--list-sources"]) == 0
    listed = capsys.readouterr().out
    for name in ("web", "tdavid", "mhcc", "scofield", "sotu", "moby-dick", "wordnet", "austen",
                 "jargon", "devil", "python-docs", "postgresql-docs", "rust-docs", "libreoffice-help",
                 "perl-docs"):
        assert name in listed
