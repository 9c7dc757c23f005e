"""Convert an UltraFastBERT checkpoint (Hub id or Hub-layout folder) to an MLX model
folder: config.json (the flat ModelArgs, with its source recorded), model.safetensors
(the model's parameters only) and the tokenizer files.

    ufb-convert --hf-path pbelcak/UltraFastBERT-1x11-long --mlx-path mlx_model
    python convert.py ...            # the same, from a clone (or python -m ufb_mlx.convert)
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import mlx.core as mx

from ufb_ref.checkpoint import load_checkpoint
from ufb_ref.errors import UFBError
from ufb_ref.tokenizer import Tokenizer

from .entry import console
from .model import model_location, save_model

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def convert(hf_path: str, mlx_path: str | Path, dtype: str = "float32", force: bool = False) -> Path:
    """Validate everything first, write into a temporary sibling folder, then rename it
    into place, so a failure never leaves a partial output folder."""
    out = Path(mlx_path)
    if dtype not in DTYPES:
        raise UFBError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if out.exists() and not force:
        raise UFBError(f"output folder '{out}' exists; pass --force to replace it")
    ckpt = load_checkpoint(model_location(hf_path))
    folder, args, weights = ckpt.folder, ckpt.args, ckpt.weights
    Tokenizer(folder, args.max_seq_length)  # a model without a working tokenizer is refused
    args.source = {"hf_path": str(hf_path), "format": ckpt.layout, "dtype": dtype}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would make the model private to this user
    try:
        save_model(tmp, weights, args, tokenizer_folder=folder, dtype=DTYPES[dtype])
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-path", required=True, help="Hub repo id, local Hub-layout folder or 'demo'")
    p.add_argument("--mlx-path", default="mlx_model", help="output folder (default: mlx_model)")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="weight dtype (default float32)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    out = convert(a.hf_path, a.mlx_path, a.dtype, a.force)
    print(f"wrote {out}")
    return 0


cli = console(main)  # the console script (pyproject.toml)

if __name__ == "__main__":
    cli()
