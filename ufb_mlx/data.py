"""Training data: labelled text files for fine-tuning (JSONL, CSV, TSV), label maps,
tokenisation with truncation, padded batches; and for pretraining the text corpus, a
WordPiece tokenizer trained like the released one, packing into blocks and BERT masking.

Every problem with a data file is a ``UFBError`` that names the file and, where there is
one, the line (``train.jsonl:17: not valid JSON (...)``).

Masking (pretraining): each token that is not a special token is selected with probability
``mask_rate`` (0.25, the paper's); a selected token is replaced by ``<mask>`` 80 % of the
time, by a uniformly drawn non-special token 10 % of the time, and left as it is 10 % of
the time (BERT's 80/10/10 rule, as in the original cramming recipe); the labels are the
original ids at the selected positions and -100 everywhere else.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ufb_ref.errors import UFBError
from ufb_ref.tokenizer import SPECIAL_TOKENS, Tokenizer

FORMATS = ("jsonl", "csv", "tsv")
_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv"}
CORPUS_SUFFIXES = (".txt", ".text", ".md")

# ---------------------------------------------------------------------------------------
# Labelled examples


@dataclass
class Example:
    text: str
    text_pair: str | None
    label: object          # as read: str, int or float (None when the file has no labels)
    where: str             # "file:line", for error messages


def detect_format(path: Path, fmt: str = "auto") -> str:
    if fmt != "auto":
        if fmt not in FORMATS:
            raise UFBError(f"data format must be one of auto, {', '.join(FORMATS)}; got {fmt!r}")
        return fmt
    found = _SUFFIXES.get(path.suffix.lower())
    if found is None:
        raise UFBError(f"{path}: cannot tell the format from the file name; use .jsonl, .csv or .tsv "
                       "(or pass --format)")
    return found


def read_text(path: Path) -> str:
    if not path.exists():
        raise UFBError(f"{path}: no such file")
    if not path.is_file():
        raise UFBError(f"{path}: not a file")
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise UFBError(f"{path}:{line}: not valid UTF-8 text") from e


def check_text(value, column: str, where: str, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise UFBError(f"{where}: '{column}' must be a string, got {type(value).__name__}")
    if not value.strip():
        if optional:
            return None
        raise UFBError(f"{where}: '{column}' is empty")
    return value


# A class name is a word or a number; a longer "label" is a mistake (a text in the wrong
# column), and a number of thousands of digits would not even convert.
MAX_LABEL_CHARS = 1000


def _check_label(value, column: str, where: str):
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        shown = "null" if value is None else f"a JSON {'array' if isinstance(value, list) else type(value).__name__}"
        raise UFBError(f"{where}: '{column}' must be a string or a number, got {shown}")
    if isinstance(value, str) and not value.strip():
        raise UFBError(f"{where}: '{column}' is empty")
    if isinstance(value, str) and len(value) > MAX_LABEL_CHARS:
        raise UFBError(f"{where}: '{column}' is {len(value)} characters long (a label has at most {MAX_LABEL_CHARS})")
    if isinstance(value, float) and not math.isfinite(value):
        raise UFBError(f"{where}: '{column}' is {value}")
    return value


def read_examples(path, fmt: str = "auto", text_column: str = "text", pair_column: str = "text_pair",
                  label_column: str = "label", need_label: bool = True) -> list[Example]:
    """Rows of a JSONL (one JSON object a line; blank lines skipped), CSV or TSV (with a
    header row) file. ``text`` is required, ``text_pair`` optional, ``label`` required when
    ``need_label``; other fields are ignored."""
    path = Path(path)
    fmt = detect_format(path, fmt)
    content = read_text(path)
    examples = (_read_jsonl if fmt == "jsonl" else _read_delimited)(
        path, content, fmt, text_column, pair_column, label_column, need_label)
    if not examples:
        raise UFBError(f"{path}: no examples")
    return examples


def _read_jsonl(path, content, fmt, text_col, pair_col, label_col, need_label):
    out = []
    for n, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UFBError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from e
        except RecursionError:
            raise UFBError(f"{where}: not valid JSON (nested too deeply)") from None
        except ValueError as e:  # e.g. an integer of more than 4300 digits
            raise UFBError(f"{where}: not valid JSON ({str(e).splitlines()[0][:100]})") from None
        if not isinstance(row, dict):
            raise UFBError(f"{where}: expected a JSON object with a '{text_col}' field, got {type(row).__name__}")
        if text_col not in row:
            raise UFBError(f"{where}: no '{text_col}' field (fields: {', '.join(map(str, row))[:200]}); "
                           "--text-column names the one to use")
        text = check_text(row[text_col], text_col, where)
        pair = check_text(row.get(pair_col), pair_col, where, optional=True)
        label = None
        if label_col in row:
            label = _check_label(row[label_col], label_col, where)
        elif need_label:
            raise UFBError(f"{where}: no '{label_col}' field (fields: {', '.join(map(str, row))[:200]}); "
                           "--label-column names the one to use")
        out.append(Example(text, pair, label, where))
    return out


def _read_delimited(path, content, fmt, text_col, pair_col, label_col, need_label):
    reader = csv.reader(io.StringIO(content, newline=""), delimiter="," if fmt == "csv" else "\t",
                        strict=True)
    try:
        header = next(reader, None)
        if header is None:
            return []
        header = [h.strip() for h in header]
        twice = sorted({h for h in header if header.count(h) > 1})
        if twice:
            raise UFBError(f"{path}:1: column '{twice[0]}' appears more than once in the header")
        for col, option, needed in ((text_col, "--text-column", True), (label_col, "--label-column", need_label)):
            if needed and col not in header:
                raise UFBError(f"{path}:1: no '{col}' column in the header (columns: {', '.join(header)}); "
                               f"{option} names the one to use")
        ti, pi, li = (header.index(c) if c in header else None for c in (text_col, pair_col, label_col))
        out = []
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if not row or all(not f.strip() for f in row):
                continue
            if len(row) != len(header):
                raise UFBError(f"{where}: {len(row)} fields, but the header has {len(header)}")
            text = check_text(row[ti], text_col, where)
            pair = check_text(row[pi], pair_col, where, optional=True) if pi is not None else None
            label = _check_label(row[li], label_col, where) if li is not None else None
            out.append(Example(text, pair, label, where))
        return out
    except csv.Error as e:
        raise UFBError(f"{path}:{reader.line_num}: malformed {fmt.upper()} ({e})") from e


# ---------------------------------------------------------------------------------------
# Labels

_FLOAT32_MAX = float(np.finfo(np.float32).max)
_INT = re.compile(r"[+-]?\d+")
_INTEGRAL = re.compile(r"[+-]?\d+(\.0*)?")  # "1", "1.", "1.00": the class 1


def label_key(ex: Example) -> str:
    """Class name of an example: strings as written (stripped), numbers in their shortest
    form, so that 1, 1.0 and "1" are the same class."""
    v = ex.label
    if v is None:
        raise UFBError(f"{ex.where}: no label")
    if isinstance(v, str):
        v = v.strip()
        return str(int(v.split(".")[0])) if _INTEGRAL.fullmatch(v) else v
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return repr(v) if isinstance(v, float) else str(v)


def regression_target(ex: Example) -> float:
    v = ex.label
    if v is None:
        raise UFBError(f"{ex.where}: no label")
    shown = repr(ex.label) if len(repr(ex.label)) <= 40 else repr(ex.label)[:37] + "..."
    if isinstance(v, str):
        try:
            v = float(v.strip())
        except ValueError:
            raise UFBError(f"{ex.where}: label {shown} is not a number (the task is regression)") from None
    try:
        v = float(v)
    except OverflowError:  # an integer beyond float64
        v = math.inf
    # Training runs in float32: a label beyond its range would be infinite there.
    if not math.isfinite(v) or abs(v) > _FLOAT32_MAX:
        raise UFBError(f"{ex.where}: label {shown} is not a finite float32 number (|label| <= {_FLOAT32_MAX:.4g})")
    return v


def build_labels(examples: list[Example], source: str) -> list[str]:
    """The class names of a training set, in a fixed order: numerically when every name is
    an integer, else alphabetically. Index i is class i of the model."""
    keys = {label_key(ex) for ex in examples}
    if len(keys) < 2:
        raise UFBError(f"{source}: classification needs at least 2 different labels, found "
                       f"{len(keys)} ({', '.join(map(repr, sorted(keys)))}); use --task regression for numeric targets")
    if all(_INT.fullmatch(k) for k in keys):
        return sorted(keys, key=int)
    return sorted(keys)


def encode_labels(examples: list[Example], labels: list[str]) -> np.ndarray:
    index = {k: i for i, k in enumerate(labels)}
    out = np.empty(len(examples), dtype=np.int64)
    for i, ex in enumerate(examples):
        key = label_key(ex)
        if key not in index:
            shown = ", ".join(map(repr, labels[:10])) + (", ..." if len(labels) > 10 else "")
            raise UFBError(f"{ex.where}: label {key!r} does not occur in the training data (labels: {shown})")
        out[i] = index[key]
    return out


def regression_targets(examples: list[Example]) -> np.ndarray:
    return np.array([regression_target(ex) for ex in examples], dtype=np.float32)


# ---------------------------------------------------------------------------------------
# Tokenisation and batches


class TextEncoder:
    """The model's tokenizer with truncation to ``max_length`` (longest text of a pair
    first); the template's special tokens are always kept."""

    def __init__(self, tokenizer: Tokenizer, max_length: int):
        from tokenizers import Tokenizer as HFTokenizer

        if max_length < 4:
            raise UFBError(f"max length must be at least 4 tokens, got {max_length}")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self._hf = HFTokenizer.from_file(str(tokenizer.path))
        self._hf.no_padding()
        self._hf.enable_truncation(max_length, strategy="longest_first")

    def __call__(self, examples: list[Example]) -> tuple[list[list[int]], int]:
        """Token ids per example, and how many examples were truncated."""
        inputs = [ex.text if ex.text_pair is None else (ex.text, ex.text_pair) for ex in examples]
        encs = self._hf.encode_batch(inputs)
        return [e.ids for e in encs], sum(1 for e in encs if e.overflowing)


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The data order of an epoch: a pure function of (seed, epoch), so that a resumed
    run sees exactly the batches an uninterrupted one sees."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def shard(rows: np.ndarray, rank: int, size: int) -> np.ndarray:
    """This process's part of a global batch: contiguous, as equal as possible."""
    return np.array_split(rows, size)[rank]


# ---------------------------------------------------------------------------------------
# Pretraining corpus


def corpus_files(paths) -> list[Path]:
    """Files given directly, and every *.txt / *.text / *.md file under given folders
    (recursively, sorted), hidden ones skipped."""
    files: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise UFBError(f"corpus path '{p}' does not exist")
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in CORPUS_SUFFIXES
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not found:
                raise UFBError(f"corpus folder '{p}' holds no {'/'.join(CORPUS_SUFFIXES)} files")
            files.extend(found)
        else:
            files.append(p)
    if not files:
        raise UFBError("no corpus files given")
    return files


def read_corpus(files: list[Path]) -> list[str]:
    """Non-blank lines of the corpus files, stripped; each is a document segment."""
    lines: list[str] = []
    for f in files:
        lines.extend(line.strip() for line in read_text(f).splitlines() if line.strip())
    if not lines:
        raise UFBError(f"corpus ({', '.join(map(str, files[:3]))}{', ...' if len(files) > 3 else ''}) "
                       "holds no text")
    return lines


def pack(tokenizer: Tokenizer, lines: list[str], block: int, what: str = "corpus", on_lines=None) -> np.ndarray:
    """Tokenise each line with the model's single-text template (``A <sep>``), concatenate
    everything and cut it into blocks of ``block`` tokens; the incomplete tail is dropped.
    ``on_lines(n)`` is told of every ``n`` lines done (progress)."""
    from tokenizers import Tokenizer as HFTokenizer

    hf = HFTokenizer.from_file(str(tokenizer.path))
    hf.no_padding()
    hf.no_truncation()
    chunks = []
    for i in range(0, len(lines), 20_000):
        part = lines[i:i + 20_000]
        chunks.append(np.fromiter((t for enc in hf.encode_batch(part) for t in enc.ids), dtype=np.int32))
        if on_lines is not None:
            on_lines(len(part))
    ids = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int32)
    n = len(ids) // block
    if n == 0:
        raise UFBError(f"{what} is too small: {len(ids)} tokens, less than one block of {block} (max_seq_length)")
    return ids[: n * block].reshape(n, block)


class Masker:
    """BERT masking of packed blocks (see the module docstring)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, mask_rate: float = 0.25):
        if not 0 < mask_rate < 1:
            raise UFBError(f"mask rate must be in (0, 1), got {mask_rate}")
        self.mask_rate = mask_rate
        self.mask_id = tokenizer.mask_token_id
        self.special = np.array(sorted(tokenizer.special_ids.values()), dtype=np.int32)
        self.replacements = np.setdiff1d(np.arange(vocab_size, dtype=np.int32), self.special)

    def __call__(self, blocks: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        eligible = ~np.isin(blocks, self.special)
        selected = (rng.random(blocks.shape) < self.mask_rate) & eligible
        if not selected.any() and eligible.any():  # never a batch without a prediction
            selected.flat[rng.choice(np.flatnonzero(eligible))] = True
        action = rng.random(blocks.shape)
        inputs = blocks.copy()
        inputs[selected & (action < 0.8)] = self.mask_id
        rand = selected & (action >= 0.8) & (action < 0.9)
        inputs[rand] = rng.choice(self.replacements, size=int(rand.sum()))
        labels = np.where(selected, blocks, -100).astype(np.int32)
        return inputs.astype(np.int32), labels


def label_positions(labels: np.ndarray, multiple: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(flat positions, targets, weights) of the labelled tokens of ``labels`` (B, S), in
    row-major order, padded with position 0, target 0 and weight 0 up to a multiple of
    ``multiple``. A compiled training step is traced once per count; the Masker's count
    varies by a few standard deviations, so a handful of counts occur (a padding of the
    mean plus 8 standard deviations, one shape for every batch, cost 12 % more time a step
    at batch 32 x 128 than the exact count: the MLM head's work grows with the padding).
    """
    flat = labels.reshape(-1)
    positions = np.flatnonzero(flat != -100)
    size = max(-(-len(positions) // multiple), 1) * multiple
    pos = np.zeros(size, dtype=np.int32)
    targets = np.zeros(size, dtype=np.int32)
    weights = np.zeros(size, dtype=np.float32)
    pos[:len(positions)], targets[:len(positions)], weights[:len(positions)] = positions, flat[positions], 1.0
    return pos, targets, weights


# ---------------------------------------------------------------------------------------
# A WordPiece tokenizer like the released model's


# Continuation characters (BERT's "##x") are trained as characters of their own, shifted
# into a private-use plane, so that the plain BPE trainer, whose ids then all come from the
# sorted alphabet, breaks its ties the same way in every run.
_CONTINUATION = 0xF0000


def _continued(word: str) -> str:
    return word[0] + "".join(chr(_CONTINUATION + ord(c)) for c in word[1:])


def _wordpiece_token(token: str) -> str:
    """A trained token back in WordPiece spelling: shifted characters unshifted, "##" in
    front of a token that starts inside a word."""
    plain = "".join(chr(ord(c) - _CONTINUATION) if ord(c) >= _CONTINUATION else c for c in token)
    return "##" + plain if ord(token[0]) >= _CONTINUATION else plain


def train_wordpiece(lines: list[str], vocab_size: int, min_frequency: int = 2):
    """A ``tokenizers`` WordPiece tokenizer with the released model's normaliser
    (`` and '' to ", NFD, lower case, strip accents, squeeze spaces, drop non-ASCII),
    whitespace pre-tokeniser, special tokens (``<unk> <cls> <s> </s> <mask> <sep> <pad>``,
    ids 0-6 in that order) and templates (``A <sep>``, ``<cls> A <sep> B <sep>``).

    The vocabulary is learnt as ``tokenizers``' WordPiece trainer learns it (merges of the
    most frequent pair of pieces, word-initial and continuation pieces kept apart), but
    deterministically: the same lines give the same file in every run. (The library's
    WordPiece trainer numbers the continuation characters in hash order, which changes
    from run to run, and breaks ties between equally frequent pairs by those numbers.) Here
    ties go to the pair of lower code points, and two pieces that spell the same string are
    one token."""
    from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, normalizers, pre_tokenizers
    from tokenizers import processors, trainers

    specials = ["<unk>", "<cls>", "<s>", "</s>", "<mask>", "<sep>", "<pad>"]
    assert sorted(specials) == sorted(SPECIAL_TOKENS)
    if vocab_size <= len(specials):
        raise UFBError(f"vocab size must exceed the {len(specials)} special tokens, got {vocab_size}")
    normalizer = normalizers.Sequence([
        normalizers.Replace("``", '"'), normalizers.Replace("''", '"'), normalizers.NFD(),
        normalizers.Lowercase(), normalizers.StripAccents(), normalizers.Replace(Regex(" {2,}"), " "),
        normalizers.Replace(Regex(r"[^\x00-\x7F]+"), ""),
    ])
    pre_tokenizer = pre_tokenizers.Whitespace()

    # The words the tokenizer will see, counted; then a plain BPE over their characters.
    counts: dict[str, int] = {}
    for line in lines:
        for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(line)):
            counts[word] = counts.get(word, 0) + 1
    words = {_continued(w): c for w, c in counts.items()}
    alphabet = sorted({c for w in words for c in w})
    bpe = HFTokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                  initial_alphabet=alphabet, show_progress=False)
    bpe.train_from_iterator(((w + " ") * c for w, c in sorted(words.items())), trainer=trainer, length=len(words))
    vocab: dict[str, int] = {}
    for token, _ in sorted(bpe.get_vocab().items(), key=lambda kv: kv[1]):
        vocab.setdefault(token if token in specials else _wordpiece_token(token), len(vocab))

    tok = HFTokenizer(models.WordPiece(vocab, unk_token="<unk>", continuing_subword_prefix="##",
                                       max_input_chars_per_word=100))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    cls_id, sep_id = tok.token_to_id("<cls>"), tok.token_to_id("<sep>")
    tok.post_processor = processors.TemplateProcessing(
        single="$A <sep>", pair="<cls> $A <sep> $B <sep>",
        special_tokens=[("<cls>", cls_id), ("<sep>", sep_id)])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok.add_special_tokens(specials)
    return tok


def save_tokenizer_files(hf_tokenizer, folder: Path, max_length: int) -> None:
    """tokenizer.json plus the transformers side files, as in the released model."""
    folder.mkdir(parents=True, exist_ok=True)
    hf_tokenizer.save(str(folder / "tokenizer.json"))
    names = {"bos_token": "<s>", "cls_token": "<cls>", "eos_token": "</s>", "mask_token": "<mask>",
             "pad_token": "<pad>", "sep_token": "<sep>", "unk_token": "<unk>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(names, indent=2) + "\n")
    cfg = dict(names, model_max_length=max_length, tokenizer_class="PreTrainedTokenizerFast",
               clean_up_tokenization_spaces=True)
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
