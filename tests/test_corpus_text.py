"""ufb_corpus.text (cleaning, splitting, de-duplication) and ufb_corpus.allocate (caps,
document selection, the train/heldout split)."""

from __future__ import annotations

import pytest

from ufb_corpus.allocate import compute_caps, is_heldout, select_docs, text_mb
from ufb_corpus.text import (ascii_normalize, collapse_ws, dedup, is_clean_sentence,
                             split_sentences, text_to_sentences)


def test_ascii_normalize():
    s = "\u201cCaf\u00e9\u201d \u2014 it\u2019s na\u00efve \ufb01ne \u00e6ther \u2013 \u4e2d ok"
    assert ascii_normalize(s) == "\"Cafe\"  -  it's naive fine aether -  ok"
    assert collapse_ws(" a \n\t b  ") == "a b"


def test_split_sentences_handles_abbreviations_and_quotes():
    para = ('Mr. Smith met Dr. J. Watson at 5 p.m. on Baker St. in London. '
            '"Is it you?" he asked. It was! Then e.g. apples came. The end.')
    assert split_sentences(para) == [
        "Mr. Smith met Dr. J. Watson at 5 p.m. on Baker St. in London.",
        '"Is it you?" he asked.',
        "It was!",
        "Then e.g. apples came.",
        "The end.",
    ]
    assert split_sentences("no terminal punctuation here") == ["no terminal punctuation here"]


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
    assert is_clean_sentence(sentence) is ok


def test_text_to_sentences_paragraphs():
    text = ("A heading without a full stop\n\n"
            "This paragraph is wrapped\nover two lines and it continues here. "
            "Here is a second sentence in it!\n\n"
            "<b>markup</b> never reaches here because it is rejected.")
    assert text_to_sentences(text) == [
        "This paragraph is wrapped over two lines and it continues here.",
        "Here is a second sentence in it!",
    ]


def test_dedup_is_case_and_punctuation_insensitive():
    seen: set[int] = set()
    out = dedup(["The cat sat on the mat.", "the cat sat, on the mat!", "A dog sat on the mat."], seen)
    assert out == ["The cat sat on the mat.", "A dog sat on the mat."]
    assert dedup(["THE CAT SAT ON THE MAT."], seen) == []


def test_heldout_split_is_deterministic_and_seeded():
    ids = [f"doc{i}" for i in range(20000)]
    a = [is_heldout(7, "src", d, 0.1) for d in ids]
    assert a == [is_heldout(7, "src", d, 0.1) for d in ids]
    assert 0.08 < sum(a) / len(a) < 0.12
    b = [is_heldout(8, "src", d, 0.1) for d in ids]
    assert a != b
    assert not any(is_heldout(7, "src", d, 0.0) for d in ids[:100])


def test_select_docs_and_caps():
    docs = [(f"d{i}", [f"Sentence number {i} is right here."] * 10) for i in range(50)]
    total = sum(text_mb(s) for _, s in docs)
    assert select_docs("x", docs, total + 1, 1) == docs
    cap = total / 5
    sel = select_docs("x", docs, cap, 1)
    assert sel == select_docs("x", docs, cap, 1)
    assert sum(text_mb(s) for _, s in sel) <= cap + 1e-9
    assert sum(text_mb(s) for _, s in sel) > cap * 0.9
    idx = [int(d[1:]) for d, _ in sel]
    assert idx == sorted(idx)  # original order kept
    assert sel != select_docs("x", docs, cap, 2)

    caps = compute_caps({"a": 1.0, "b": 10.0, "c": 10.0, "t": 3.0},
                           {"a": "g", "b": "g", "c": "g", "t": "h"},
                           {"a": 5.0, "b": 5.0, "c": 5.0, "t": 5.0}, {"g": 7.0})
    assert caps == pytest.approx({"a": 1.0, "b": 3.0, "c": 3.0, "t": 3.0})
