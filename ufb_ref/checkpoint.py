"""Checkpoints: finding a model folder (local or on the Hub), reading its config and
safetensors weights, and checking every key and shape against the config.

Two folder layouts load:
- Hub layout (``pbelcak/UltraFastBERT-1x11-long``): config.json with a nested ``arch``,
  model.safetensors holding the original state_dict (with ``decoder.weight`` and the
  ``norm_factor`` buffers);
- converted layout (written by convert.py): the flat ``ModelArgs`` config and exactly the
  model's parameters.
Both become the same ``(ModelArgs, {name: array})``, the names being the model's parameter
names (Hub keys minus ``decoder.weight`` and ``norm_factor``).
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import MODEL_TYPE, ModelArgs
from .errors import UFBError
from .tokenizer import Tokenizer

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

# ---------------------------------------------------------------------------------------
# Finding the folder

def resolve(path_or_hub_id: str | os.PathLike) -> Path:
    """A local folder as is; anything else is a Hub repo id fetched through
    huggingface_hub (its cache and HF_HUB_OFFLINE apply). The Hub is first asked about the
    repo with a timeout (HF_HUB_ETAG_TIMEOUT seconds, default 10): a Hub that accepts the
    connection and never answers ends in an error naming the id, not a hang."""
    if not str(path_or_hub_id).strip():
        raise UFBError("model path is empty: give a model folder or a Hub repo id (owner/name)")
    path = Path(path_or_hub_id).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UFBError(f"model path '{path}' is a file, not a model folder")
        return path
    repo_id = str(path_or_hub_id)
    # Hub ids are owner/name, or a bare name for the oldest models (bert-base-uncased).
    if repo_id.count("/") > 1 or repo_id.startswith((".", "/", "~")) or repo_id.endswith("/"):
        raise UFBError(f"model '{repo_id[:200]}' is neither a local folder nor a Hub repo id (owner/name)")
    try:
        from huggingface_hub import HfApi, constants, snapshot_download
        from huggingface_hub.errors import (HfHubHTTPError, HFValidationError, LocalEntryNotFoundError,
                                            RepositoryNotFoundError)
        from huggingface_hub.utils import validate_repo_id
    except ImportError as e:  # pragma: no cover - huggingface_hub is a dependency
        raise UFBError(f"loading '{repo_id}' from the Hub needs huggingface_hub: {e}") from e
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise UFBError(f"model '{repo_id[:200]}' is neither a local folder nor a valid Hub repo id "
                       f"({str(e).splitlines()[0][:160]})") from None
    patterns = ["*.json", "*.safetensors", "*.txt", "*.md"]
    timeout = constants.HF_HUB_ETAG_TIMEOUT
    local_only = constants.HF_HUB_OFFLINE
    if not local_only:
        try:  # snapshot_download's own first request has no timeout
            HfApi().repo_info(repo_id, timeout=timeout)
        except RepositoryNotFoundError as e:
            raise UFBError(f"Hub repo '{repo_id}' not found (or private)") from e
        except HfHubHTTPError as e:
            raise UFBError(f"could not download '{repo_id}' from the Hub: {str(e).splitlines()[0]}") from e
        except Exception:  # no answer in time, no network: the cache may still hold it
            local_only = True
        else:  # the config first: a dense BERT is refused before its weights are downloaded
            try:
                from huggingface_hub import hf_hub_download

                cfg = Path(hf_hub_download(repo_id, CONFIG_FILE, etag_timeout=timeout))
            except Exception:  # no config.json, or the download failed: the snapshot says which
                cfg = None
            if cfg is not None:
                refuse_foreign(read_json_object(cfg), repo_id)
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, etag_timeout=timeout,
                                      local_files_only=local_only))
    except RepositoryNotFoundError as e:
        raise UFBError(f"Hub repo '{repo_id}' not found (or private)") from e
    except LocalEntryNotFoundError as e:
        if constants.HF_HUB_OFFLINE:
            raise UFBError(f"model '{repo_id}' is not a local folder, and as a Hub repo id it is not in the Hugging "
                           "Face cache; HF_HUB_OFFLINE is set, so the Hub was not asked") from e
        raise UFBError(f"model '{repo_id}' is not a local folder and is not in the Hugging Face cache, "
                       f"and the Hub did not answer (no network, or no reply within {timeout} s)") from e
    except (HfHubHTTPError, OSError) as e:
        raise UFBError(f"could not download '{repo_id}' from the Hub: {str(e).splitlines()[0]}") from e


# A config or tokenizer description is kilobytes; a larger file is not one.
MAX_JSON_BYTES = 64 * 2**20


def read_json_object(path: Path) -> dict:
    """A JSON file holding one object; anything else is an error naming the file."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise UFBError(f"{path}: {path.stat().st_size} bytes, too large for a JSON config "
                           f"(limit {MAX_JSON_BYTES})")
        cfg = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as e:
        raise UFBError(f"{path}: cannot read ({e.strerror or e})") from None
    except RecursionError:
        raise UFBError(f"{path}: not valid JSON (nested too deeply)") from None
    except (ValueError, UnicodeDecodeError) as e:  # ValueError: also integers over 4300 digits
        raise UFBError(f"{path}: not valid JSON ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(cfg, dict):
        raise UFBError(f"{path}: not a JSON object")
    return cfg


# What a training run writes (ufb_mlx.train): a checkpoint folder holds these, no config.
TRAINER_STATE_FILE = "trainer_state.json"


def read_config(folder: Path) -> tuple[ModelArgs, str]:
    """The model's args and the folder's layout: "crammedBERT" (Hub, nested ``arch``) or
    "ultrafastbert" (converted, flat). A training checkpoint or a dense (Hugging Face)
    BERT is named as such, with what to use instead."""
    path = folder / CONFIG_FILE
    if not path.is_file():
        if (folder / TRAINER_STATE_FILE).is_file():
            run = folder.parent.parent if folder.parent.name == "checkpoints" else folder.parent
            raise UFBError(f"'{folder}' is a training checkpoint (for --resume), not a model folder: the model "
                           f"is in '{run}'")
        if folder.name == "checkpoints" and (folder.parent / CONFIG_FILE).is_file():
            raise UFBError(f"'{folder}' holds training checkpoints (for --resume): the model is in '{folder.parent}'")
        raise UFBError(f"{path}: no config.json in the model folder")
    cfg = read_json_object(path)
    refuse_foreign(cfg, folder)
    try:
        return ModelArgs.from_dict(cfg), "crammedBERT" if "arch" in cfg else "ultrafastbert"
    except UFBError as e:  # name the file the user gave, not just "config.json"
        msg = str(e)
        raise UFBError(f"{path}{msg[len(CONFIG_FILE):]}" if msg.startswith(CONFIG_FILE + ":") else msg) from None


def refuse_foreign(cfg: dict, where) -> None:
    """A UFBError for the config of another kind of model: a dense (Hugging Face) BERT, or
    any other ``model_type``; ``where`` names the folder or Hub id."""
    dense, kind = dense_bert(cfg), cfg.get("model_type")
    use = ("use an UltraFastBERT model (a folder written by this project, 'demo', or "
           "pbelcak/UltraFastBERT-1x11-long)")
    if dense:
        raise UFBError(f"'{where}' is a dense BERT ({dense}), not an UltraFastBERT checkpoint: its feedforward "
                       f"layers are dense, not fast feedforward trees; {use}")
    if isinstance(kind, str) and kind not in (MODEL_TYPE, "crammedBERT") and "arch" not in cfg:
        raise UFBError(f"'{where}' holds a {kind!r} model (config.json model_type), not an UltraFastBERT "
                       f"checkpoint; {use}")


def dense_bert(cfg: dict) -> str | None:
    """What a Hugging Face BERT config says it is ("model_type 'bert', BertForMaskedLM"),
    or None for any other config."""
    names = cfg.get("architectures")
    names = [n for n in names if isinstance(n, str)] if isinstance(names, list) else []
    bert_names = [n for n in names if n.startswith("Bert")]
    if cfg.get("model_type") != "bert" and not bert_names:
        return None
    parts = [f"model_type {cfg['model_type']!r}"] if "model_type" in cfg else []
    return ", ".join(parts + bert_names)


# ---------------------------------------------------------------------------------------
# safetensors (https://huggingface.co/docs/safetensors): an 8-byte little-endian header
# length N, N bytes of JSON header (may be padded with spaces), then the byte buffer that
# the header's tensors tile exactly: no gaps, no overlaps, nothing after the last one.
#
# Read without unpickling and without a framework, and hardened: the whole header is
# validated (types, dtypes, shapes, offsets, coverage) before any tensor byte is read; a
# tensor is then read once, straight into its own array, and only when asked for (a read,
# not a memory map: a file truncated under a map would kill the process with SIGBUS). The
# `safetensors` library (0.8.0) was measured as the alternative: it refuses the same
# malformed headers except two duplicate keys (it keeps the last one silently), cannot
# return bfloat16 as NumPy (TypeError), and its get_tensor peaks at twice the tensor's size
# (4123 MB resident for one 2 GiB float32 tensor, 3.3-3.8 s) where this reader peaks at
# once (2075 MB, 4.0-5.7 s; both on a loaded 2-core machine).

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
           "U16": np.uint16, "U32": np.uint32, "U64": np.uint64, "BOOL": np.bool_}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
# The format library's own bound: a larger header is an attack, not a model.
MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class TensorInfo:
    dtype: str                 # safetensors dtype code, e.g. "F32"
    shape: tuple[int, ...]
    begin: int                 # byte offsets into the data buffer
    end: int


def _no_duplicate_keys(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key '{k}'")
        out[k] = v
    return out


def _is_uint(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


class SafetensorsFile:
    """A validated safetensors file: ``infos`` ({key: TensorInfo}) and ``metadata``
    ({str: str}) from the header; ``read(key)`` reads one tensor (bfloat16 widened to
    float32, native byte order)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        bad = f"{self.path}: corrupted safetensors file"
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                prefix = f.read(8)
                if len(prefix) < 8:
                    raise UFBError(f"{bad} (shorter than its header)")
                (n,) = struct.unpack("<Q", prefix)
                if n > min(size - 8, MAX_HEADER_BYTES):
                    raise UFBError(f"{bad} (header length {n} exceeds the file size {size} "
                                   f"or the format's limit {MAX_HEADER_BYTES})")
                raw = f.read(n)
        except OSError as e:
            raise UFBError(f"{self.path}: cannot read ({e.strerror or e})") from e
        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
        except RecursionError:
            raise UFBError(f"{bad} (header nested too deeply)") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise UFBError(f"{bad} (header is not JSON: {str(e).splitlines()[0][:80]})") from None
        if not raw.startswith(b"{") or not isinstance(header, dict):
            raise UFBError(f"{bad} (header is not a JSON object)")
        self.data_start, self.data_size = 8 + n, size - 8 - n
        meta = header.pop("__metadata__", None)
        meta = {} if meta is None else meta  # null: MLX's writer when there is none
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise UFBError(f"{bad} (__metadata__ is not a map of strings to strings)")
        self.metadata = meta
        self.infos = {key: self._check_entry(key, info) for key, info in header.items()}
        # The tensors must tile the buffer: sorted by offset, each starts where the last ended.
        at = 0
        for key, info in sorted(self.infos.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
            if info.begin != at:
                what = "overlaps another tensor" if info.begin < at else "leaves a gap before it"
                raise UFBError(f"{bad} (tensor '{key}' {what})")
            at = info.end
        if at != self.data_size:
            raise UFBError(f"{bad} (the tensors cover {at} of the {self.data_size} data bytes)")

    def _check_entry(self, key: str, info) -> TensorInfo:
        bad = f"{self.path}: corrupted safetensors file"
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise UFBError(f"{bad} (tensor '{key}' needs dtype, shape and data_offsets)")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str):
            raise UFBError(f"{bad} (tensor '{key}': dtype is not a string)")
        if dtype not in _DTYPES:
            raise UFBError(f"{self.path}: tensor '{key}' has unsupported dtype {dtype[:20]!r}")
        if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
            raise UFBError(f"{bad} (tensor '{key}': shape is not a list of non-negative integers)")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_uint(o) for o in offsets)
                or offsets[0] > offsets[1]):
            raise UFBError(f"{bad} (tensor '{key}': data_offsets is not [begin, end] with 0 <= begin <= end)")
        nbytes = math.prod(shape) * np.dtype(_DTYPES[dtype]).itemsize  # Python ints: no overflow
        if offsets[1] - offsets[0] != nbytes:
            raise UFBError(f"{bad} (tensor '{key}' data out of range or truncated: shape {shape} "
                           f"needs {nbytes} bytes, data_offsets span {offsets[1] - offsets[0]})")
        return TensorInfo(dtype, tuple(shape), offsets[0], offsets[1])

    def read(self, key: str) -> np.ndarray:
        info = self.infos[key]
        arr = np.empty(info.shape, dtype=np.dtype(_DTYPES[info.dtype]).newbyteorder("<"))
        try:
            with open(self.path, "rb") as f:
                f.seek(self.data_start + info.begin)
                got = f.readinto(memoryview(arr.reshape(-1)).cast("B")) if arr.size else 0
        except OSError as e:
            raise UFBError(f"{self.path}: cannot read ({e.strerror or e})") from e
        if got != info.end - info.begin:  # the file shrank since its header was checked
            raise UFBError(f"{self.path}: corrupted safetensors file (tensor '{key}' truncated)")
        if info.dtype == "BF16":  # bfloat16 is the top half of a float32
            return (arr.astype(np.uint32) << 16).view(np.float32)
        return arr.astype(arr.dtype.newbyteorder("="), copy=False)


def read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Every tensor: ({key: array}, {key: safetensors dtype}); bfloat16 comes back as float32."""
    f = SafetensorsFile(path)
    return {k: f.read(k) for k in f.infos}, {k: i.dtype for k, i in f.infos.items()}


# ---------------------------------------------------------------------------------------
# The expected parameters of a model, by name


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every parameter of the model and its shape, named as in the Hub checkpoint."""
    H, W = args.hidden_size, args.intermed_width
    shapes = {
        "encoder.embedding.word_embedding.weight": (args.vocab_size, H),
        "encoder.embedding.pos_embedding.scale_factor": (1,),
        "encoder.embedding.norm.weight": (H,),
        "encoder.embedding.norm.bias": (H,),
    }
    for i in range(args.num_layers):
        p = f"encoder.layers.{i}."
        shapes.update({
            p + "norm1.weight": (H,), p + "norm1.bias": (H,),
            p + "norm2.weight": (H,), p + "norm2.bias": (H,),
            p + "attn.self_attention.query_key_value.weight": (3 * H, H),
            p + "attn.dense.weight": (H, H),
            p + "ffn.linear_in.weight": (W, H),
            p + "ffn.linear_in.bias": (W,),
            p + "ffn.linear_out.weight": (H, W),
        })
    shapes["encoder.final_norm.weight"] = (H,)
    shapes["encoder.final_norm.bias"] = (H,)
    if args.task == "classification":
        shapes.update({
            "pooler.dense.weight": (args.head_dim, H), "pooler.dense.bias": (args.head_dim,),
            "head.weight": (args.num_labels, args.head_dim), "head.bias": (args.num_labels,),
        })
    return shapes


def sanitize(weights: dict, args: ModelArgs, array_equal=np.array_equal) -> dict:
    """Hub state_dict -> model parameters: drop the stored copy of the tied decoder and
    the constant ``norm_factor`` buffers, after checking they hold what they must. Any
    array type with ``shape``, ``size`` and ``reshape``; ``array_equal`` compares two of
    them (ufb_mlx passes MLX's, so its lazily loaded weights never pass through NumPy)."""
    out = dict(weights)
    if "decoder.weight" in out:
        dec = out.pop("decoder.weight")
        emb = out.get("encoder.embedding.word_embedding.weight")
        if args.task != "mlm":
            raise UFBError("checkpoint: unexpected key 'decoder.weight' in a classifier checkpoint")
        if emb is not None and (tuple(dec.shape) != tuple(emb.shape) or not array_equal(dec, emb)):
            raise UFBError("checkpoint: 'decoder.weight' differs from 'encoder.embedding.word_embedding.weight' "
                           "(the model ties them)")
    for i in range(args.num_layers):
        key = f"encoder.layers.{i}.attn.self_attention.norm_factor"
        if key in out:
            nf = out.pop(key)
            if nf.size != 1 or not np.isclose(float(nf.reshape(())), args.head_size ** -0.5, rtol=1e-6):
                raise UFBError(f"checkpoint: '{key}' is {float(nf.reshape(-1)[0])}, expected head_size^-0.5")
    return out


def hub_extras(args: ModelArgs) -> dict[str, tuple[int, ...] | None]:
    """Tensors a Hub checkpoint stores beside the parameters (``sanitize`` checks and drops
    them): the tied decoder's copy (masked LMs) and the norm_factor buffers (any shape of
    one element: None)."""
    extras = {f"encoder.layers.{i}.attn.self_attention.norm_factor": None for i in range(args.num_layers)}
    if args.task == "mlm":
        extras["decoder.weight"] = (args.vocab_size, args.hidden_size)
    return extras


def check_weights(shapes: dict[str, tuple[int, ...]], dtypes: dict[str, str], args: ModelArgs, where: str) -> None:
    """Missing, extra, mis-shaped or non-float tensors are errors that name the key. Runs on
    the file's header, before any tensor is read."""
    want = expected_shapes(args)
    extras = hub_extras(args)
    for key in want:
        if key not in shapes:
            raise UFBError(f"{where}: missing key '{key}'")
    for key, shape in shapes.items():
        if key not in want and key not in extras:
            raise UFBError(f"{where}: unexpected key '{key}'")
        expected = want.get(key, extras.get(key))
        if expected is None and math.prod(shape) != 1:
            raise UFBError(f"{where}: key '{key}' has shape {tuple(shape)}, expected one element")
        if expected is not None and tuple(shape) != expected:
            raise UFBError(f"{where}: key '{key}' has shape {tuple(shape)}, expected {expected}")
        if dtypes[key] not in FLOAT_DTYPES:
            raise UFBError(f"{where}: key '{key}' has dtype {dtypes[key]}, expected a float type")


def check_finite(weights: dict[str, np.ndarray], where: str) -> None:
    """NaN or Inf in a weight makes every output NaN: refuse it, naming the tensor."""
    report_nonfinite({key: arr.size - int(np.count_nonzero(np.isfinite(arr))) for key, arr in weights.items()},
                     where)


def report_nonfinite(counts: dict, where: str) -> None:
    """The error of ``check_finite`` for the first tensor whose count of non-finite values
    (any integer or scalar array) is not zero."""
    for key, bad in counts.items():
        bad = int(bad)
        if bad:
            raise UFBError(f"{where}: tensor '{key}' holds {bad} non-finite value{'s' if bad > 1 else ''} "
                           "(NaN or Inf); pass allow_nonfinite=True (CLI: --allow-nonfinite) to load it anyway")


@dataclass
class Checkpoint:
    folder: Path
    args: ModelArgs
    weights: dict[str, np.ndarray]   # parameter name -> array (bfloat16 widened to float32)
    dtypes: dict[str, str]           # parameter name -> stored safetensors dtype
    layout: str                      # "crammedBERT" (Hub) or "ultrafastbert" (converted)
    tokenizer: Tokenizer             # checked to emit only ids below args.vocab_size


@dataclass
class CheckpointHeader:
    """A model found and validated up to its weights' header: nothing of the weights read."""
    folder: Path
    args: ModelArgs
    weights_file: SafetensorsFile    # its header checked against args (keys, shapes, dtypes)
    layout: str
    tokenizer: Tokenizer

    @property
    def dtypes(self) -> dict[str, str]:
        """Tensor name -> stored safetensors dtype, for every tensor of the file."""
        return {k: i.dtype for k, i in self.weights_file.infos.items()}


def open_checkpoint(path_or_hub_id) -> CheckpointHeader:
    """Find and validate a model without reading a weight: config, tokenizer (its ids must
    fit the vocabulary), the weights' header (keys, shapes, dtypes). ufb_mlx then reads
    the weights with ``mx.load``; ``load_checkpoint`` with this module's reader."""
    folder = resolve(path_or_hub_id)
    args, layout = read_config(folder)
    tokenizer = Tokenizer(folder, args.max_seq_length, vocab_size=args.vocab_size)
    wpath = folder / WEIGHTS_FILE
    if not wpath.is_file():
        if any((folder / f).exists() for f in ("pytorch_model.bin", "pytorch_model.bin.index.json")):
            raise UFBError(f"{folder}: only pytorch_model.bin found; pickled checkpoints are never loaded "
                           "(unsafe): provide model.safetensors")
        raise UFBError(f"{folder}: no {WEIGHTS_FILE} in the model folder")
    st = SafetensorsFile(wpath)
    head = st.infos.get("head.weight")
    if args.task == "classification" and head is not None and len(head.shape) == 2:
        args.num_labels = head.shape[0]  # the head's true width
        if args.id2label and len(args.id2label) != args.num_labels:
            args.id2label = None
        args.validate()
    check_weights({k: i.shape for k, i in st.infos.items()}, {k: i.dtype for k, i in st.infos.items()},
                  args, str(wpath))
    return CheckpointHeader(folder, args, st, layout, tokenizer)


def load_checkpoint(path_or_hub_id, allow_nonfinite: bool = False) -> Checkpoint:
    """``open_checkpoint``, then the weights read into NumPy (finite unless
    ``allow_nonfinite``)."""
    head = open_checkpoint(path_or_hub_id)
    st, dtypes = head.weights_file, head.dtypes
    weights = sanitize({k: st.read(k) for k in st.infos}, head.args)
    if not allow_nonfinite:
        check_finite(weights, str(st.path))
    return Checkpoint(head.folder, head.args, weights, {k: dtypes[k] for k in weights}, head.layout,
                      head.tokenizer)
