"""Each reader of ufb_corpus on its small fixture under tests/data/corpus (offline)."""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import pytest

import corpus_fixtures as fx
from ufb_corpus.dictd import dictd_b64, read_dictd, read_dictd_package, split_dict_headword
from ufb_corpus.htmldocs import html_to_text, read_html_tree
from ufb_corpus.pod import pod_to_sections, read_pod_dir
from ufb_corpus.rdata import (RList, ROpaque, RUnserializer, lines_to_chapters, read_janeaustenr,
                              read_lazyload_db, read_rda, read_rds)
from ufb_corpus.stdlib_json import read_stdlib_json
from ufb_corpus.sword import (UnsupportedModule, parse_sword_conf, read_sword_module,
                              read_sword_package, read_zverse, strip_sword_markup)
from ufb_corpus.text import PARA_SPLIT_RE, collapse_ws, text_to_sentences
from ufb_corpus.wordnet import read_wordnet, wordnet_gloss_parts

F = fx.FIXTURES


def sentences(docs) -> dict[str, list[str]]:
    return {doc_id: text_to_sentences(text) for doc_id, text in docs}


def test_generated_fixtures_match_their_generator(tmp_path):
    # Compressed bytes may differ between zlib builds, so compare what the readers see.
    fx.write_all(tmp_path)
    assert list(read_sword_package(tmp_path / "sword")) == list(read_sword_package(F / "sword"))
    assert list(read_dictd_package(tmp_path / "dictd")) == list(read_dictd_package(F / "dictd"))
    assert list(read_janeaustenr(tmp_path / "rdata")) == list(read_janeaustenr(F / "rdata"))
    generated = {p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()}
    assert generated <= {p.relative_to(F) for p in F.rglob("*") if p.is_file()}


# --------------------------------------------------------------------------
# SWORD
# --------------------------------------------------------------------------


def test_sword_package(tmp_path):
    docs = list(read_sword_package(F / "sword"))
    assert [d for d, _ in docs] == ["TestBible:ot:0", "TestComm:ot:0"]
    text = "\n\n".join(t for _, t in docs)
    assert "footnote" not in text and "<" not in text and "strong" not in text
    assert sentences(docs) == {
        "TestBible:ot:0": [
            "In the beginning God made the world.",
            "The earth was & empty and dark, and the deep was still.",
            "Then he spoke \"Let there be light,\" and there was light.",
            "It was good in every way that mattered.",
        ],
        # zCom4, 12-byte records, ThML; the linked (repeated) first entry is read once
        "TestComm:ot:0": [
            "The first verse opens the whole book with a plain statement of faith.",
            "Here the second verse describes the waters of the deep.",
            "Light is the first thing that is named in the account of creation.",
        ],
    }
    with pytest.raises(FileNotFoundError, match="no mods.d"):
        list(read_sword_package(tmp_path))


def test_sword_conf_and_record_size_disagreeing_with_the_driver(tmp_path):
    conf_text = (F / "sword" / "usr/share/sword/mods.d/testcomm.conf").read_text()
    name, conf = parse_sword_conf(conf_text)
    assert name == "TestComm" and conf["About"] == "A test module \nspanning two lines"
    assert conf["ModDrv"] == "zCom4"
    # a conf saying zCom4 over 10-byte records (as sword-comm-mhcc ships) still parses
    root = fx.write_sword_module(tmp_path, "Mhcc", "zCom4", "b", 10, fx.VERSES)
    _, conf = parse_sword_conf((root / "mods.d" / "mhcc.conf").read_text())
    got = [t for _, t in read_sword_module(root, conf)]
    assert len(text_to_sentences("\n\n".join(got))) == 4
    with pytest.raises(UnsupportedModule, match="ModDrv=RawText"):
        list(read_sword_module(root, {**conf, "ModDrv": "RawText"}))
    with pytest.raises(UnsupportedModule, match="enciphered"):
        list(read_sword_module(root, {**conf, "CipherKey": "x"}))


def test_read_zverse_records():
    raw = b"alpha beta gamma"
    comp = zlib.compress(raw)
    bzs = struct.pack("<III", 0, len(comp), len(raw))
    bzv = struct.pack("<IIH", 0, 0, 5) + struct.pack("<IIH", 0, 6, 4) + struct.pack("<IIH", 0, 0, 5) \
        + struct.pack("<IIH", 0, 11, 0)
    assert [(n, r) for n, _, r in read_zverse(bzs, bzv, comp, 10)] == [(0, b"alpha"), (1, b"beta")]


def test_strip_sword_markup_variants():
    assert strip_sword_markup("A<RF>note<Rf> b<CM>C", "GBF").split() == ["A", "b", "C"]
    out = strip_sword_markup('<p>One.</p><scripRef passage="Ge 1:1">Ge 1:1</scripRef> two', "ThML")
    assert out.split() == ["One.", "Ge", "1:1", "two"]


# --------------------------------------------------------------------------
# HTML, POD
# --------------------------------------------------------------------------


def test_html_tree():
    docs = list(read_html_tree(F, "html", exclude=("_static/*",)))
    assert sentences(docs) == {
        "guide/intro.htm": [
            "In the beginning God made the world.",  # also in the SWORD fixture
            "A guide explains the ideas behind the tool before it shows any of the commands.",
            "Readers who know the ideas already may skip this chapter.",
        ],
        "index.html": [
            "Use the open function to read a file that is stored on the disk.",
            "The function returns an object that can be read line by line.",
            "Second paragraph of the page, which explains what happens when the file is missing.",
            "An error is raised and nothing is read.",
            "Each item of a list becomes a paragraph of its own here.",
        ],
    }
    text = "".join(t for _, t in docs)
    for dropped in ("var x", "color", "Prev", "print", "x = 1", "Copyright", "sidebar"):
        assert dropped not in text
    assert "_static/skipped.html" in dict(read_html_tree(F, "html"))
    with pytest.raises(FileNotFoundError):
        list(read_html_tree(F, "no-such-folder"))


def test_html_to_text_blocks_become_paragraphs():
    page = ("<html><head><title>T</title><script>var x = 1;</script></head><body>"
            "<div class='navheader'>Prev Next</div><h1>Title</h1>"
            "<p>Use the <code>open</code> function to read files.</p>"
            "<pre>print('hello')</pre><div class='highlight'><pre>x=1</pre></div>"
            "<p>Second&nbsp;para.<br/>Line</p><div class='footer'>(c) 2023</div></body></html>")
    text = html_to_text(page)
    paras = [collapse_ws(p) for p in PARA_SPLIT_RE.split(text) if p.strip()]
    assert paras == ["Title", "Use the open function to read files.", "Second para.", "Line"]


def test_pod_dir():
    docs = list(read_pod_dir(F / "pod", "*.pod", exclude=("perl5*delta.pod",)))
    assert dict(docs) == {
        "perlfoo.pod#0": "perlfoo - bold and italic words in a test document",
        "perlfoo.pod#1": ("This document tests the POD reader with a few short paragraphs of prose.\n"
                          "It has <angle brackets> and a link to open in perlfunc in it."),
        "perlfoo.pod#2": ("Call $x->y or read the manual before you start writing the program.\n\n"
                          "An item of a list is kept as its own short paragraph."),
    }
    assert [d for d, _ in read_pod_dir(F / "pod", "*.pod")][:1] == ["perl5100delta.pod#0"]
    with pytest.raises(FileNotFoundError, match="no files match"):
        list(read_pod_dir(F / "pod", "*.pm"))


def test_pod_to_sections():
    pod = ("=head1 NAME\n\nperlfoo - B<bold> and I<italic>\n\n"
           "=head2 Usage\n\nCall C<< $x->y >> or L<perlfunc/open> and L<text|perlop> E<lt>hiE<gt>.\n\n"
           "    my $code = 1;\n\n=over\n\n=item * An item\n\n=back\n\n"
           "=begin html\n\n<p>skip</p>\n\n=end html\n\n=cut\n\nsub not_pod {}\n")
    assert pod_to_sections(pod) == [
        ("NAME", "perlfoo - bold and italic"),
        ("Usage", "Call $x->y or open in perlfunc and text <hi>.\n\nAn item"),
    ]


# --------------------------------------------------------------------------
# R data
# --------------------------------------------------------------------------


def test_janeaustenr_lazyload_db():
    docs = list(read_janeaustenr(F / "rdata"))
    # the integer vector "year" is not a book; NA lines read as empty lines
    assert [d for d, _ in docs] == ["emma:0", "emma:1", "emma:2", "persuasion:0", "persuasion:1"]
    assert sentences(docs)["emma:1"] == ["Emma Woodhouse, handsome, clever, and rich, had lived.",
                                        "She was the youngest of the two daughters."]
    assert sentences(docs)["persuasion:1"] == ["Sir Walter Elliot never took up any book but one.",
                                              "He found in it occupation for an idle hour."]
    rdata = F / "rdata" / "usr/lib/R/site-library/janeaustenr/data"
    objs = read_lazyload_db((rdata / "Rdata.rdx").read_bytes(), (rdata / "Rdata.rdb").read_bytes())
    assert list(objs["emma"]) == fx.EMMA and list(objs["year"]) == [1815]
    assert len(lines_to_chapters(objs["emma"])) == 3


@pytest.mark.parametrize("codec", [b"Z", b"2", b"1", b"0"])
def test_lazyload_codecs(codec):
    rdx, rdb = fx.lazyload_db({"x": fx.xdr_strsxp(["a", None])}, codec)
    assert list(read_lazyload_db(rdx, rdb)["x"]) == ["a", None]


def test_rda_and_rds():
    rda = gzip.compress(b"RDX3\n" + fx.xdr(fx.xdr_int(2 | (1 << 10)) + fx.xdr_int(1) + fx.xdr_charsxp("x")
                                          + fx.xdr_strsxp(["a", "b"]) + fx.xdr_int(254)))
    assert {k: list(v) for k, v in read_rda(rda).items()} == {"x": ["a", "b"]}
    with pytest.raises(ValueError, match="RDX2/RDX3"):
        read_rda(b"RDX9\n")
    with pytest.raises(ValueError, match="XDR"):
        read_rds(b"A\n")
    with pytest.raises(ValueError, match="version 4"):
        read_rds(fx.xdr(fx.xdr_int(254), version=4))


def test_r_vector_types_and_references():
    i = fx.xdr_int
    na = -2**31
    obj = (i(19) + i(7)  # VECSXP of seven elements
           + i(13) + i(3) + i(1) + i(na) + i(-4)  # INTSXP with an NA
           + i(10) + i(2) + i(1) + i(0)  # LGLSXP
           + i(14) + i(2) + struct.pack(">2d", 0.5, -2.0)  # REALSXP
           + i(15) + i(1) + struct.pack(">2d", 1.0, 2.0)  # CPLXSXP
           + i(24) + i(3) + b"abc"  # RAWSXP
           + i(249) + i(0) + i(1) + fx.xdr_charsxp("stats")  # NAMESPACESXP, first reference
           + i(255 | (1 << 8))  # REFSXP back to it
           + i(254))  # (unused trailing NILVALUE)
    v = read_rds(fx.xdr(obj))
    assert isinstance(v, RList) and len(v) == 7
    assert list(v[0]) == [1, None, -4] and list(v[1]) == [1, 0]
    assert list(v[2]) == [0.5, -2.0] and list(v[3]) == [1 + 2j] and v[4] == b"abc"
    assert v[5] == ROpaque("namespace", ["stats"]) and v[6] is v[5]
    long_ints = i(13) + i(-1) + i(0) + i(2) + i(7) + i(8)  # a "long vector" length
    assert list(RUnserializer(fx.xdr(long_ints)).parse()) == [7, 8]
    with pytest.raises(ValueError, match="SEXP type 99"):
        read_rds(fx.xdr(i(99)))


# --------------------------------------------------------------------------
# dictd, WordNet, @stdlib JSON
# --------------------------------------------------------------------------


def test_dictd_package():
    docs = list(read_dictd_package(F / "dictd"))
    assert [d for d, _ in docs] == ["foo", "baz", "all software sucks"]
    assert sentences(docs) == {
        "foo": ["A thing that is bar in every way possible."],
        "baz": ["To do the thing that one always does."],
        "all software sucks": ["A saying about all computer programs."],
    }
    assert docs[0][1].split("\n\n")[0] == "FOO"  # the headword is a paragraph of its own
    index = F / "dictd/usr/share/dictd/test.index"
    assert list(read_dictd(index, index.with_name("test.dict.dz"))) == docs


def test_dictd_b64_and_headwords():
    assert dictd_b64(fx.dictd_b64(123456)) == 123456
    jargon = split_dict_headword("All software sucks, really.",
                                 "All software sucks, really.\n prov.\n\n    A saying about\n    all computer programs.")
    assert jargon.split("\n\n")[0] == "All software sucks, really."
    assert "prov." not in jargon and text_to_sentences(jargon)[-1] == "A saying about all computer programs."
    assert split_dict_headword("cat", "CAT, n.  A small pet.") == "CAT\n\n  A small pet."
    assert split_dict_headword("dog", "DOG\n\n  A loyal pet.") == "DOG\n\nA loyal pet."


def test_wordnet():
    docs = list(read_wordnet(F / "wordnet"))
    assert sentences(docs) == {
        "noun:00001740": ["That which is perceived or known or inferred to have its own distinct "
                          "existence (living or nonliving)."],
        "noun:00002137": ["A general concept formed by extracting common features from specific examples."],
        "noun:02084071": ["A member of the genus Canis that has been domesticated by man since prehistoric times.",
                          "The dog barked all night."],
        "verb:00004227": ["Draw air into, and expel out of, the lungs.",
                          "I can breathe better when the air is clean."],
    }
    parts = wordnet_gloss_parts('draw air into, and expel out of, the lungs; "I can breathe better now"  ')
    assert parts == ["Draw air into, and expel out of, the lungs.", "I can breathe better now."]


def test_stdlib_json(tmp_path):
    docs = list(read_stdlib_json(F / "stdlib_json"))
    assert sentences(docs) == {
        "chapter_1:0": ["Call me Ishmael, for that is the name my shipmates always used.",
                        "Some years ago I thought I would sail about a little and see the watery part of the world."],
        "speeches:0": ["Fellow citizens, I embrace with great satisfaction the opportunity of this meeting.",
                       "The progress of the nation gives us all a reason to be content with what has been done."],
        "speeches:1": ["In meeting you again I feel much satisfaction in being able to repeat my congratulations."],
    }
    with pytest.raises(FileNotFoundError):
        list(read_stdlib_json(tmp_path))
