"""Adaptive tokenization: give a masked-language model the word pieces of a new domain.

    python -m ufb_mlx.extend_vocab --model demo --corpus emails.txt --add 1024 --out OUT
    python -m ufb_mlx.pretrain --model OUT --corpus emails.txt more.txt --out RUN ...

A vocabulary learnt on one kind of text splits another kind into many short pieces, or
into <unk>: the demo's, learnt on books, speeches and manuals, has no '@', '<', '=' or '_'
at all, so 2.6 % of the tokens of an email are <unk> and a word costs 2.1 tokens against
1.3 in the corpus. Here a WordPiece vocabulary is learnt on the new text (as pretraining
learns one, ``data.train_wordpiece``), and its first ``--add`` tokens that the model lacks
(characters first, then pieces in the order their merges were learnt, i.e. by frequency)
are appended after the model's last id. Each new embedding row starts as the mean of the
rows of the pieces the old vocabulary split it into (<unk>'s row for a piece it could not
spell), after Sachidananda et al. 2021, "Efficient Domain Adaptation of Language Models via
Adaptive Tokenization". The decoder is tied, so the new tokens can be predicted at once;
continued pretraining on the new text (``ufb_mlx.pretrain --model OUT``) then learns them.

The old tokens keep their ids and rows, so a text with none of the new pieces is encoded
and scored exactly as before; a text that has them is encoded into fewer tokens.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from ufb_ref.checkpoint import resolve
from ufb_ref.errors import ArgumentParser, UFBError, command_name

from . import data
from .entry import console
from .loading import check_new_folder, save_derived, load, model_location
from .model import ModelArgs

EMBEDDING = "encoder.embedding.word_embedding.weight"


def domain_pieces(vocab: dict[str, int], lines: list[str], count: int, trial_size: int = 8192) -> list[str]:
    """The first ``count`` tokens of a WordPiece vocabulary of ``trial_size`` learnt on
    ``lines`` that ``vocab`` lacks, in the order they were learnt. Control characters are
    left out: the normaliser keeps them, but they are noise in text, not a domain's words."""
    learnt = data.train_wordpiece(lines, trial_size).get_vocab()
    new = [t for t, _ in sorted(learnt.items(), key=lambda kv: kv[1])
           if t not in vocab and not any(ord(c) < 32 or ord(c) == 127 for c in t)]
    return new[:count]


def old_pieces(vocab: dict[str, int], piece: str, unk_id: int) -> list[int]:
    """The ids WordPiece gives ``piece`` with ``vocab``: longest match first, a piece that
    starts with ``##`` spelt as the inside of a word; ``[unk_id]`` if it cannot be spelt."""
    inside = piece.startswith("##") and len(piece) > 2
    word = piece[2:] if inside else piece
    ids, start = [], 0
    while start < len(word):
        for end in range(len(word), start, -1):
            sub = ("##" if inside or start > 0 else "") + word[start:end]
            if sub in vocab:
                ids.append(vocab[sub])
                break
        else:
            return [unk_id]
        start = end
    return ids


def new_rows(table: np.ndarray, vocab: dict[str, int], pieces: list[str], unk_id: int) -> np.ndarray:
    """One row per new piece (at least one): the mean of the rows of its old pieces."""
    return np.stack([table[old_pieces(vocab, p, unk_id)].mean(axis=0) for p in pieces])


def extend(model, tokenizer_json: dict, lines: list[str], count: int) -> tuple[dict, ModelArgs, dict, list[str]]:
    """The weights, config and tokenizer.json of ``model`` with up to ``count`` pieces of
    ``lines`` added (new ids from the model's vocab_size up)."""
    args = model.args
    if args.task != "mlm":
        raise UFBError("--model is a classifier; extend the vocabulary of the masked-language model it came from")
    wp = tokenizer_json.get("model", {})
    if wp.get("type") != "WordPiece" or not isinstance(wp.get("vocab"), dict):
        raise UFBError("the model's tokenizer.json is not a WordPiece tokenizer; only WordPiece vocabularies can grow")
    vocab = wp["vocab"]
    unk = wp.get("unk_token")
    if unk not in vocab:
        raise UFBError(f"the model's tokenizer has no unk_token {unk!r} in its vocabulary")
    pieces = domain_pieces(vocab, lines, count)
    if not pieces:
        raise UFBError("the corpus brings no word piece the model's vocabulary lacks; nothing to add")
    weights = dict(tree_flatten(model.parameters()))
    table = np.array(weights[EMBEDDING].astype(mx.float32))
    rows = new_rows(table, vocab, pieces, vocab[unk])
    weights[EMBEDDING] = mx.array(np.concatenate([table, rows])).astype(weights[EMBEDDING].dtype)
    out_json = copy.deepcopy(tokenizer_json)
    out_vocab = out_json["model"]["vocab"]
    for i, p in enumerate(pieces):
        out_vocab[p] = args.vocab_size + i
    cfg = dict(args.to_dict(), vocab_size=args.vocab_size + len(pieces))
    return weights, ModelArgs.from_dict(cfg), out_json, pieces


def main(argv=None) -> int:
    p = ArgumentParser(prog=command_name("ufb_mlx.extend_vocab"), description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="masked-language model: folder, Hub id or 'demo'")
    p.add_argument("--corpus", nargs="+", required=True, help="text of the new domain: files and/or folders")
    p.add_argument("--add", type=int, default=1024, help="most pieces to add (default %(default)s)")
    p.add_argument("--out", required=True, help="new model folder")
    p.add_argument("--force", action="store_true", help="replace --out if it is a model folder this project wrote")
    a = p.parse_args(argv)
    if a.add < 1:
        raise UFBError(f"--add must be at least 1, got {a.add}")
    files = data.corpus_files(a.corpus)
    lines = data.read_corpus(files)
    out = Path(a.out)
    check_new_folder(out, a.force, [resolve(model_location(a.model)), *files])
    model, tok = load(a.model, fff_mode="dense")
    tokenizer_json = json.loads(Path(tok.path).read_text())
    weights, args, new_json, pieces = extend(model, tokenizer_json, lines, a.add)
    # load() inside save_derived checks the new tokenizer's ids fit the new vocabulary.
    save_derived(out, weights, args, Path(tok.path).parent, a.force,
                 files={"tokenizer.json": json.dumps(new_json, ensure_ascii=False) + "\n"},
                 extended_from=str(a.model), pieces_added=len(pieces), pieces_from=[str(f) for f in a.corpus])
    print(f"added {len(pieces)} pieces (vocabulary {args.vocab_size - len(pieces)} -> {args.vocab_size}); "
          f"first: {' '.join(pieces[:20])}")
    print(f"wrote {out}")
    return 0


cli = console(main)  # the console script (pyproject.toml)

if __name__ == "__main__":
    cli()
