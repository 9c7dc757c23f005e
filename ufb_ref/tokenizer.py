"""The WordPiece tokenizer of a model folder (``tokenizer.json``), with special tokens
found by name and padding to a batch with an attention mask."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from .errors import UFBError

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<cls>", "<sep>", "<mask>")
# Users type BERT's spelling as often as the model's own.
_MASK_ALIASES = re.compile(r"\[MASK\]")


class Tokenizer:
    def __init__(self, path: str | Path, max_length: int | None = None):
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise UFBError(f"{path}: no tokenizer.json in the model folder")
        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on bad files
            raise UFBError(f"{path}: not a valid tokenizer.json ({str(e).splitlines()[0]})") from e
        self._tok.no_padding()
        self._tok.no_truncation()
        self.path = path
        self.max_length = max_length
        ids = {name: self._tok.token_to_id(name) for name in SPECIAL_TOKENS}
        missing = [n for n in ("<pad>", "<mask>", "<sep>") if ids[n] is None]
        if missing:
            raise UFBError(f"{path}: tokenizer has no '{missing[0]}' token")
        self.special_ids = {n: i for n, i in ids.items() if i is not None}

    pad_token_id = property(lambda self: self.special_ids["<pad>"])
    mask_token_id = property(lambda self: self.special_ids["<mask>"])
    sep_token_id = property(lambda self: self.special_ids["<sep>"])
    cls_token_id = property(lambda self: self.special_ids.get("<cls>"))
    unk_token_id = property(lambda self: self.special_ids.get("<unk>"))
    mask_token = "<mask>"

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str, text_pair: str | None = None) -> list[int]:
        """Token ids with the model's template: ``A <sep>`` or ``<cls> A <sep> B <sep>``."""
        for t in (text, text_pair):
            if t is not None and not isinstance(t, str):
                raise UFBError(f"text must be a string, got {type(t).__name__}")
        if not text or not text.strip():
            raise UFBError("empty text: nothing to tokenize")
        text = _MASK_ALIASES.sub(self.mask_token, text)
        if text_pair is not None:
            text_pair = _MASK_ALIASES.sub(self.mask_token, text_pair)
        ids = self._tok.encode(text, text_pair).ids
        if self.max_length is not None and len(ids) > self.max_length:
            raise UFBError(f"text is {len(ids)} tokens long, more than the model's max_seq_length "
                           f"{self.max_length}: {text[:40]!r}...")
        return ids

    def __call__(self, texts, text_pairs=None) -> dict[str, np.ndarray]:
        """Batch encode, right-padded with ``<pad>``: {input_ids, attention_mask} (int64)."""
        if isinstance(texts, str):
            texts = [texts]
        if text_pairs is not None and isinstance(text_pairs, str):
            text_pairs = [text_pairs]
        if not len(texts):
            raise UFBError("no texts to tokenize")
        pairs = text_pairs if text_pairs is not None else [None] * len(texts)
        if len(pairs) != len(texts):
            raise UFBError(f"{len(texts)} texts but {len(pairs)} text pairs")
        encoded = [self.encode(t, p) for t, p in zip(texts, pairs)]
        return pad_batch(encoded, self.pad_token_id)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def offsets(self, text: str) -> list[tuple[int, int]]:
        """The character span (start, end) in ``text`` of each token that ``encode(text)``
        returns ((0, 0) for the template's <sep>). Spans point into the text as the user
        wrote it, whatever the normaliser changes; [MASK] and <mask> have the same length,
        so replacing one by the other moves nothing."""
        enc = self._tok.encode(_MASK_ALIASES.sub(self.mask_token, text))
        return [(int(a), int(b)) for a, b in enc.offsets]

    def id_to_token(self, i: int) -> str:
        return self._tok.id_to_token(int(i))

    def tokens(self, text: str) -> list[str]:
        return [self.id_to_token(i) for i in self.encode(text)]


def pad_batch(sequences: list[list[int]], pad_id: int, length: int | None = None) -> dict[str, np.ndarray]:
    """Right-pad to ``length`` (default: the longest sequence); the mask is 1 on real
    tokens."""
    length = max(len(s) for s in sequences) if length is None else length
    ids = np.full((len(sequences), length), pad_id, dtype=np.int64)
    mask = np.zeros((len(sequences), length), dtype=np.int64)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = seq
        mask[row, : len(seq)] = 1
    return {"input_ids": ids, "attention_mask": mask}
