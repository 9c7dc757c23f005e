"""Loading and saving MLX models: ``load`` (a folder, a Hub id or "demo" -> Model and
Tokenizer) and ``save_model``, the one writer of model folders.

``load`` validates everything ``ufb_ref.checkpoint.open_checkpoint`` checks (config,
tokenizer, the weights' header) before a weight is read, then reads the weights with
``mx.load``: lazily, in their stored dtype, each tensor once into its own MLX buffer (no
NumPy copy), so the process holds about one copy of the weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ufb_ref import fsio
from ufb_ref.checkpoint import (CONFIG_FILE, TOKENIZER_FILES, WEIGHTS_FILE, CheckpointHeader, SafetensorsFile,
                                open_checkpoint, report_nonfinite)
from ufb_ref.config import ModelArgs
from ufb_ref.errors import UFBError

from . import backend as backend_lib
from .model import FFF_MODES, Model

__all__ = ["DEMO", "DEMO_MODEL", "count_nonfinite", "finite_screen", "load", "model_location", "read_weights", "save_model",
           "save_safetensors"]

# The small pretrained model that ships inside the package (see its README.md), so that
# the tools work offline.
DEMO_MODEL = Path(__file__).resolve().parent / "demo_model"
DEMO = "demo"  # its name in load() and in every tool's --model (a local folder "demo": ./demo)


def model_location(path_or_hub_id):
    """The demo model's folder for the name "demo"; anything else as given (a folder or a
    Hub id, which ufb_ref.checkpoint resolves)."""
    return DEMO_MODEL if str(path_or_hub_id) == DEMO else path_or_hub_id


def load(path_or_hub_id, fff_mode: str = "conditional", dtype=None, backend: str = "auto",
         allow_nonfinite: bool = False):
    """(Model, Tokenizer) from a converted folder, a Hub-layout folder, a Hub repo id or
    "demo" (the small model shipped in the package). Weights with NaN or Inf are refused,
    naming the tensor, unless ``allow_nonfinite``.
    ``backend`` picks the implementation the layers run (ufb_mlx.backend: "auto", "ops",
    "cpu", "metal"), resolved once now ("auto": by the current default device;
    ``Model.set_backend`` changes it later); an explicit one that is not present here is
    refused before anything is read.
    ``dtype`` (e.g. mx.float16) casts the weights. Default: as stored when the model runs
    on a GPU; on the CPU half-precision weights are widened to float32, because MLX's CPU
    backend has no BLAS path for half-precision matmuls (they run ~50x slower)."""
    if fff_mode not in FFF_MODES:
        raise UFBError(f"fff_mode must be one of {FFF_MODES}, got {fff_mode!r}")
    backend_lib.resolve(backend)
    head = open_checkpoint(model_location(path_or_hub_id))
    model = Model(head.args, fff_mode, backend)
    # The same rule as "auto": the default device.
    on_gpu = mx.default_device().type == mx.DeviceType.gpu
    stored = {"BF16": mx.bfloat16, "F16": mx.float16} if on_gpu else {}
    dtypes = head.dtypes
    params = read_weights(head, model.sanitize, lambda key: dtype or stored.get(dtypes[key], mx.float32),
                          allow_nonfinite)
    model.load_weights(list(params.items()), strict=True)
    model.eval()
    return model, head.tokenizer


def read_weights(head: CheckpointHeader, sanitize, dtype_of, allow_nonfinite: bool = False) -> dict:
    """The tensors of a validated checkpoint (``open_checkpoint``) as MLX arrays, read with
    ``mx.load`` (no NumPy copy): ``sanitize`` maps the raw tensors (lazy, stored dtype) to
    the ones kept, each is cast to ``dtype_of(key)``; NaN or Inf in a kept tensor is
    refused, naming it, unless ``allow_nonfinite``."""
    path = head.weights_file.path
    try:
        raw = mx.load(str(path), format="safetensors")
        if {k: tuple(v.shape) for k, v in raw.items()} != {k: i.shape for k, i in head.weights_file.infos.items()}:
            raise UFBError(f"{path}: changed while it was read (its tensors differ from the header validated)")
        # float64 has no GPU kernels: narrowed on the CPU first.
        raw = {k: v.astype(mx.float32, stream=mx.cpu) if v.dtype == mx.float64 else v for k, v in raw.items()}
        weights = sanitize(raw)
        del raw
        mx.clear_cache()  # what the checks read and dropped (the Hub's decoder copy)
        # One tensor at a time, popped, so that what a layout copy or a cast frees goes
        # back to MLX's cache and is reused by the next tensor of its size: the process
        # holds one copy of the weights and about one tensor more.
        out = {}
        for key in list(weights):
            value = weights.pop(key)
            out[key] = value.astype(dtype_of(key))
            screen = None if allow_nonfinite else finite_screen(value)
            mx.eval(out[key], *([] if screen is None else [screen]))
            if screen is not None and not mx.isfinite(screen).item():  # NaN or Inf, or an overflow
                report_nonfinite({key: count_nonfinite(value)}, str(path))
            del value
        mx.clear_cache()
    except UFBError:
        raise
    except (RuntimeError, ValueError, OSError) as e:  # MLX's reader: the file changed after validation
        raise UFBError(f"{path}: cannot read ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    return out


def finite_screen(value):
    """A scalar that is finite when every value is (lazy): the sum of the column sums. A
    NaN or an Inf makes any sum of it non-finite; a finite sum can still overflow, so a
    non-finite screen is confirmed by ``count_nonfinite``. Float sums are MLX's fast
    reductions (~0.4 s for the released model, where counting takes ~3 s)."""
    return (value.sum(0) if value.ndim > 1 else value).astype(mx.float32).sum()


# Elements per step of count_nonfinite: its temporaries stay a few MB.
COUNT_CHUNK = 1 << 20


def count_nonfinite(value):
    """The number of NaN and Inf values of an array (lazy), counted in slices along the
    first axis: a whole-tensor isfinite would make temporaries of the tensor's element
    count (72 MB for the released model's embedding), which the peak memory would show."""
    if value.ndim == 0 or value.size <= COUNT_CHUNK:
        return mx.logical_not(mx.isfinite(value)).sum()
    rows = max(1, COUNT_CHUNK * value.shape[0] // value.size)
    return sum((mx.logical_not(mx.isfinite(value[i:i + rows])).sum() for i in range(0, value.shape[0], rows)),
               mx.array(0, mx.uint32))


def save_safetensors(path, arrays: dict, metadata: dict | None = None) -> None:
    """``mx.save_safetensors``, flushed to disk and its header read back (no tensor): MLX
    reports no failed write (a full disk), the header and the file size tell."""
    mx.save_safetensors(str(path), arrays, metadata=metadata or {})
    fsio.fsync(path)
    SafetensorsFile(path)


def save_model(folder, model_or_weights, args: ModelArgs, tokenizer_folder=None, dtype=None) -> Path:
    """Write the model folder that ``load`` reads: config.json (the flat ModelArgs),
    model.safetensors (the parameters, cast to ``dtype`` if given) and the tokenizer files
    copied from ``tokenizer_folder``. Each file is replaced atomically (ufb_ref.fsio), so a
    reader never sees a half-written one. The one writer of model folders (convert,
    fine-tuning, pretraining)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if tokenizer_folder is not None and Path(tokenizer_folder).resolve() != folder.resolve():
        for name in TOKENIZER_FILES:
            src = Path(tokenizer_folder) / name
            if src.is_file():
                fsio.atomic_write_bytes(folder / name, src.read_bytes())
    fsio.atomic_write_text(folder / CONFIG_FILE, json.dumps(args.to_dict(), indent=2) + "\n")
    weights = (dict(tree_flatten(model_or_weights.parameters())) if isinstance(model_or_weights, nn.Module)
               else {k: v if isinstance(v, mx.array) else mx.array(v) for k, v in model_or_weights.items()})
    if dtype is not None:
        weights = {k: v.astype(dtype) for k, v in weights.items()}
    with fsio.atomic_file(folder / WEIGHTS_FILE) as tmp:
        save_safetensors(tmp, weights, {"format": "mlx"})
    return folder


def check_new_folder(out: Path, force: bool, inputs) -> None:
    """A tool's --out: absent, or (--force) a model folder this project wrote that is none
    of its INPUTS and holds none of them."""
    if out.exists() and not force:
        raise UFBError(f"--out '{out}' exists (give --force to replace a model folder this project wrote)")
    fsio.check_replaceable(out, list(inputs))


def save_derived(out: Path, weights: dict, args: ModelArgs, tokenizer_folder, force: bool,
                 files: dict[str, str] | None = None, **record) -> None:
    """Write a model made from a loaded one (extend_vocab, grow) into OUT, atomically:
    its weights as load() gave them (float32 on the CPU), so the source's record of an
    export dtype is dropped and RECORD added to config.json's "source"; FILES ({name: text})
    replace the copied tokenizer files. The folder must load before it is put in place."""
    args.source = dict({k: v for k, v in (args.source or {}).items() if k != "dtype"}, **record)
    with fsio.atomic_folder(out, replace=force, mark=True) as tmp:
        save_model(tmp, weights, args, tokenizer_folder=tokenizer_folder)
        for name, text in (files or {}).items():
            fsio.atomic_write_text(tmp / name, text)
        load(tmp)
