"""Convert an UltraFastBERT checkpoint (Hub id or Hub-layout folder) to an MLX model
folder: config.json (the flat ModelArgs, with its source recorded), model.safetensors
(the model's parameters only), the tokenizer files and a marker (.ultrafastbert.json) that
lets a later --force recognise the folder as one this tool wrote.

    ufb-convert --hf-path pbelcak/UltraFastBERT-1x11-long --mlx-path mlx_model
    python convert.py ...            # the same, from a clone (or python -m ufb_mlx.convert)

--force replaces only such a folder (or an empty one): never the input or a folder around
or inside it, a file, a symlink, the current folder, or a folder holding other files.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import mlx.core as mx

from ufb_ref import fsio
from ufb_ref.checkpoint import CONFIG_FILE, TOKENIZER_FILES, WEIGHTS_FILE, open_checkpoint
from ufb_ref.errors import ArgumentParser, UFBError, command_name

from .entry import console
from .loading import model_location, read_weights, save_model
from .model import drop_hub_extras

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def convert(hf_path: str, mlx_path: str | Path, dtype: str = "float32", force: bool = False,
            allow_nonfinite: bool = False) -> Path:
    """Validate everything first, write into a temporary sibling folder, then rename it
    into place, so a failure never leaves a partial output folder. The output is locked
    while it is written; what killed converts left beside it is removed."""
    out = Path(mlx_path)
    if dtype not in DTYPES:
        raise UFBError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if not str(mlx_path).strip() or out.name in ("", ".", ".."):
        raise UFBError(f"--mlx-path '{mlx_path}' does not name a folder to write")
    try:  # undecodable bytes (held as surrogates): MLX cannot open such a path
        str(mlx_path).encode("utf-8")
    except UnicodeEncodeError:
        raise UFBError(f"--mlx-path {str(mlx_path)!a} is not valid UTF-8; MLX cannot write model files there") from None
    if (out.exists() or out.is_symlink()) and not force:
        raise UFBError(f"output folder '{out}' exists; pass --force to replace it")
    source = model_location(hf_path)
    if force:  # before the (possibly long) read; again below, under the lock
        fsio.check_replaceable(out, _local_input(source))
    head = open_checkpoint(source)
    folder, args = head.folder, head.args
    # Read by MLX (no NumPy copy), in the output's dtype.
    weights = read_weights(head, lambda w: drop_hub_extras(w, args), lambda key: DTYPES[dtype], allow_nonfinite)
    args.source = {"hf_path": str(hf_path), "format": head.layout, "dtype": dtype}
    with fsio.folder_lock(out):
        fsio.clean_stale_temporaries(out)
        if force:  # a Hub id's files are known only now (symlinks into the Hub cache)
            fsio.check_replaceable(out, [folder, *((folder / f).resolve() for f in _files(folder))])
        elif out.exists() or out.is_symlink():
            raise UFBError(f"output folder '{out}' exists; pass --force to replace it")
        with fsio.atomic_folder(out, replace=force, mark=True) as tmp:
            # save_model checks the written weights file (header and size): MLX reports no failed write.
            save_model(tmp, weights, args, tokenizer_folder=folder)
    return out


def _files(folder: Path, names=(CONFIG_FILE, WEIGHTS_FILE, *TOKENIZER_FILES)) -> list[str]:
    return [n for n in names if (folder / n).is_file()]


def _local_input(source) -> list[Path]:
    p = Path(source).expanduser()
    return [p] if p.exists() else []


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog=command_name("ufb_mlx.convert"), description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-path", required=True, help="Hub repo id, local Hub-layout folder or 'demo'")
    p.add_argument("--mlx-path", default="mlx_model", help="output folder (default: mlx_model)")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="weight dtype (default float32)")
    p.add_argument("--force", action="store_true",
                   help="replace an existing output folder that convert wrote (nothing else)")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="convert weights holding NaN or Inf (refused by default)")
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    out = convert(a.hf_path, a.mlx_path, a.dtype, a.force, a.allow_nonfinite)
    print(f"wrote {out}")
    return 0


cli = console(main)  # the console script (pyproject.toml)

if __name__ == "__main__":
    cli()
