"""The WordPiece tokenizer of a model folder (``tokenizer.json``), with special tokens
found by name and padding to a batch with an attention mask."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from .errors import UFBError

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<cls>", "<sep>", "<mask>")
# Characters one token can stand for (WordPiece reads words up to 100 characters, longer
# ones become one <unk>; plus a separator): a text longer than max_length times this is
# refused before tokenising, which for a huge text would cost seconds and gigabytes.
CHARS_PER_TOKEN = 101
# Users type BERT's spelling as often as the model's own.
_MASK_ALIASES = re.compile(r"\[MASK\]")


class Tokenizer:
    """``max_length``: the model's max_seq_length (longer texts are refused); ``vocab_size``:
    the model's vocabulary, which every id the tokenizer can emit must fit."""

    def __init__(self, path: str | Path, max_length: int | None = None, vocab_size: int | None = None):
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise UFBError(f"{path}: no tokenizer.json in the model folder")
        _check_template(path)
        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on bad files
            first = (str(e).splitlines() or [type(e).__name__])[0][:200]
            raise UFBError(f"{path}: not a valid tokenizer.json ({first})") from None
        self._tok.no_padding()
        self._tok.no_truncation()
        self.path = path
        self.max_length = max_length
        ids = {name: self._tok.token_to_id(name) for name in SPECIAL_TOKENS}
        missing = [n for n in ("<pad>", "<mask>", "<sep>") if ids[n] is None]
        if missing:
            raise UFBError(f"{path}: tokenizer has no '{missing[0]}' token")
        self.special_ids = {n: i for n, i in ids.items() if i is not None}
        # WordPiece maps an unknown word to its unk_token; one missing from the vocabulary
        # makes every text with such a word fail deep inside `tokenizers` (fast paths that
        # call it directly, as fine-tuning's and pretraining's batch encoding, included).
        unk = getattr(self._tok.model, "unk_token", None)
        if isinstance(unk, str) and self._tok.token_to_id(unk) is None:
            raise UFBError(f"{path}: the tokenizer's unk_token {unk[:40]!r} is not in its vocabulary")
        self.model_vocab_size = vocab_size
        self._encode("a", "b")  # a template naming tokens it does not define fails here, not later
        if vocab_size is not None:
            vocab = self._tok.get_vocab(with_added_tokens=True)
            token, top = max(vocab.items(), key=lambda kv: kv[1], default=("", -1))
            if top >= vocab_size:
                raise UFBError(f"{path}: token {token[:40]!r} has id {top}, outside the model's vocabulary "
                               f"(vocab_size {vocab_size})")

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
            if t is not None and not t.isascii():
                try:  # lone surrogates: undecodable bytes of argv or a file read with surrogateescape
                    t.encode("utf-8")
                except UnicodeEncodeError as e:
                    raise UFBError(f"text is not valid UTF-8 (character {e.start}): {t[:40]!r}") from None
        if not text or not text.strip():
            raise UFBError("empty text: nothing to tokenize")
        chars = len(text) + len(text_pair or "")
        if self.max_length is not None and chars > self.max_length * CHARS_PER_TOKEN:
            raise UFBError(f"text is {chars} characters long, more than the model's max_seq_length "
                           f"{self.max_length} tokens can hold: {text[:40]!r}...")
        text = _MASK_ALIASES.sub(self.mask_token, text)
        if text_pair is not None:
            text_pair = _MASK_ALIASES.sub(self.mask_token, text_pair)
        ids = self._encode(text, text_pair)
        if self.max_length is not None and len(ids) > self.max_length:
            raise UFBError(f"text is {len(ids)} tokens long, more than the model's max_seq_length "
                           f"{self.max_length}: {text[:40]!r}...")
        if self.model_vocab_size is not None and ids and max(ids) >= self.model_vocab_size:
            # The template's special tokens carry their own ids, outside get_vocab's view.
            raise UFBError(f"{self.path}: the tokenizer emitted id {max(ids)}, outside the model's "
                           f"vocabulary (vocab_size {self.model_vocab_size})")
        return ids

    def _encode(self, text: str, text_pair: str | None = None) -> list[int]:
        try:
            return self._tok.encode(text, text_pair).ids
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # a broken tokenizer.json makes the Rust side panic (PanicException)
            first = (str(e).splitlines() or [type(e).__name__])[0][:120]
            raise UFBError(f"{self.path}: the tokenizer failed ({first}); its tokenizer.json is broken") from None

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


def _check_template(path: Path) -> None:
    """A TemplateProcessing post-processor must define every special token its templates
    use: `tokenizers` loads one that does not, then panics (printing a Rust backtrace) on the
    first text it encodes."""
    from .checkpoint import read_json_object

    proc = read_json_object(path).get("post_processor")
    procs = proc.get("processors", []) if isinstance(proc, dict) and proc.get("type") == "Sequence" else [proc]
    for proc in procs:
        if not isinstance(proc, dict) or proc.get("type") != "TemplateProcessing":
            continue
        defined = proc.get("special_tokens")
        defined = defined if isinstance(defined, dict) else {}
        for which in ("single", "pair"):
            for piece in proc.get(which) or []:
                special = piece.get("SpecialToken") if isinstance(piece, dict) else None
                name = special.get("id") if isinstance(special, dict) else None
                entry = defined.get(name) if isinstance(name, str) else None
                if special is not None and not (isinstance(entry, dict) and isinstance(entry.get("ids"), list)
                                                and entry["ids"]):
                    raise UFBError(f"{path}: the post-processor's {which} template uses special token "
                                   f"{str(name)[:40]!r}, which it does not define")


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
