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
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import ModelArgs
from .errors import UFBError

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

# ---------------------------------------------------------------------------------------
# Finding the folder


def resolve(path_or_hub_id: str | os.PathLike) -> Path:
    """A local folder as is; anything else is a Hub repo id fetched through
    huggingface_hub (its cache and HF_HUB_OFFLINE apply)."""
    path = Path(path_or_hub_id).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UFBError(f"model path '{path}' is a file, not a model folder")
        return path
    repo_id = str(path_or_hub_id)
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/", "~")):
        raise UFBError(f"model '{repo_id}' is neither a local folder nor a Hub repo id (owner/name)")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError as e:  # pragma: no cover - huggingface_hub is a dependency
        raise UFBError(f"loading '{repo_id}' from the Hub needs huggingface_hub: {e}") from e
    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.md"]))
    except RepositoryNotFoundError as e:
        raise UFBError(f"Hub repo '{repo_id}' not found (or private)") from e
    except LocalEntryNotFoundError as e:
        raise UFBError(f"model '{repo_id}' is not a local folder and is not in the Hugging Face cache, "
                       "and the Hub cannot be reached (HF_HUB_OFFLINE or no network)") from e
    except (HfHubHTTPError, OSError) as e:
        raise UFBError(f"could not download '{repo_id}' from the Hub: {str(e).splitlines()[0]}") from e


def read_json_object(path: Path) -> dict:
    """A JSON file holding one object; anything else is an error naming the file."""
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UFBError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(cfg, dict):
        raise UFBError(f"{path}: not a JSON object")
    return cfg


def read_config(folder: Path) -> tuple[ModelArgs, str]:
    """The model's args and the folder's layout: "crammedBERT" (Hub, nested ``arch``) or
    "ultrafastbert" (converted, flat)."""
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise UFBError(f"{path}: no config.json in the model folder")
    cfg = read_json_object(path)
    return ModelArgs.from_dict(cfg), "crammedBERT" if "arch" in cfg else "ultrafastbert"


# ---------------------------------------------------------------------------------------
# safetensors, read without unpickling and without a framework. The format is an 8-byte
# little-endian header length, a JSON header and the raw little-endian tensor bytes.

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
           "BOOL": np.bool_}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


def read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Returns ({key: array}, {key: safetensors dtype}); bfloat16 comes back as float32."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UFBError(f"{path}: cannot read ({e.strerror})") from e
    if len(data) < 8:
        raise UFBError(f"{path}: corrupted safetensors file (shorter than its header)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise UFBError(f"{path}: corrupted safetensors file (header length {n} exceeds file size {len(data)})")
    try:
        header = json.loads(data[8:8 + n])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UFBError(f"{path}: corrupted safetensors file (header is not JSON)") from e
    if not isinstance(header, dict):
        raise UFBError(f"{path}: corrupted safetensors file (header is not a JSON object)")
    body = memoryview(data)[8 + n:]
    tensors, dtypes = {}, {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError) as e:
            raise UFBError(f"{path}: corrupted safetensors file (bad header entry for '{key}')") from e
        if dtype not in _DTYPES:
            raise UFBError(f"{path}: tensor '{key}' has unsupported dtype {dtype}")
        np_dtype = np.dtype(_DTYPES[dtype])
        if not (0 <= begin <= end <= len(body)) or end - begin != int(np.prod(shape)) * np_dtype.itemsize:
            raise UFBError(f"{path}: corrupted safetensors file (tensor '{key}' data out of range or truncated)")
        arr = np.frombuffer(body[begin:end], dtype=np_dtype.newbyteorder("<")).reshape(shape)
        if dtype == "BF16":  # bfloat16 is the top half of a float32
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        tensors[key] = arr.astype(arr.dtype.newbyteorder("="))
        dtypes[key] = dtype
    return tensors, dtypes


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


def sanitize(weights: dict[str, np.ndarray], args: ModelArgs) -> dict[str, np.ndarray]:
    """Hub state_dict -> model parameters: drop the stored copy of the tied decoder and
    the constant ``norm_factor`` buffers, after checking they hold what they must."""
    out = dict(weights)
    if "decoder.weight" in out:
        dec = out.pop("decoder.weight")
        emb = out.get("encoder.embedding.word_embedding.weight")
        if args.task != "mlm":
            raise UFBError("checkpoint: unexpected key 'decoder.weight' in a classifier checkpoint")
        if emb is not None and (dec.shape != emb.shape or not np.array_equal(dec, emb)):
            raise UFBError("checkpoint: 'decoder.weight' differs from 'encoder.embedding.word_embedding.weight' "
                           "(the model ties them)")
    for i in range(args.num_layers):
        key = f"encoder.layers.{i}.attn.self_attention.norm_factor"
        if key in out:
            nf = out.pop(key)
            if nf.size != 1 or not np.isclose(float(nf.reshape(())), args.head_size ** -0.5, rtol=1e-6):
                raise UFBError(f"checkpoint: '{key}' is {nf.reshape(-1)[:1]}, expected head_size^-0.5")
    return out


def check_weights(weights: dict[str, np.ndarray], dtypes: dict[str, str], args: ModelArgs, where: str) -> None:
    """Missing, extra, mis-shaped or non-float tensors are errors that name the key."""
    want = expected_shapes(args)
    for key in want:
        if key not in weights:
            raise UFBError(f"{where}: missing key '{key}'")
    for key, arr in weights.items():
        if key not in want:
            raise UFBError(f"{where}: unexpected key '{key}'")
        if tuple(arr.shape) != want[key]:
            raise UFBError(f"{where}: key '{key}' has shape {tuple(arr.shape)}, expected {want[key]}")
        if dtypes.get(key, "F32") not in FLOAT_DTYPES:
            raise UFBError(f"{where}: key '{key}' has dtype {dtypes[key]}, expected a float type")


@dataclass
class Checkpoint:
    folder: Path
    args: ModelArgs
    weights: dict[str, np.ndarray]   # parameter name -> array (bfloat16 widened to float32)
    dtypes: dict[str, str]           # parameter name -> stored safetensors dtype
    layout: str                      # "crammedBERT" (Hub) or "ultrafastbert" (converted)


def load_checkpoint(path_or_hub_id) -> Checkpoint:
    """Find, read and validate a model."""
    folder = resolve(path_or_hub_id)
    args, layout = read_config(folder)
    wpath = folder / WEIGHTS_FILE
    if not wpath.is_file():
        if any((folder / f).exists() for f in ("pytorch_model.bin", "pytorch_model.bin.index.json")):
            raise UFBError(f"{folder}: only pytorch_model.bin found; pickled checkpoints are never loaded "
                           "(unsafe): provide model.safetensors")
        raise UFBError(f"{folder}: no {WEIGHTS_FILE} in the model folder")
    weights, dtypes = read_safetensors(wpath)
    if args.task == "classification" and "head.weight" in weights:
        args.num_labels = weights["head.weight"].shape[0]  # the head's true width
        if args.id2label and len(args.id2label) != args.num_labels:
            args.id2label = None
    weights = sanitize(weights, args)
    check_weights(weights, dtypes, args, str(wpath))
    return Checkpoint(folder, args, weights, {k: dtypes[k] for k in weights}, layout)
