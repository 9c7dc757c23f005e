"""Convert an UltraFastBERT checkpoint (Hub id or Hub-layout folder) to an MLX model
folder: config.json (the flat ModelArgs, with its source recorded), model.safetensors
(the model's parameters only), the tokenizer files and a marker (.ultrafastbert.json) that
lets a later --force recognise the folder as one this tool wrote.

    python convert.py --hf-path pbelcak/UltraFastBERT-1x11-long --mlx-path mlx_model

--force replaces only such a folder (or an empty one): never the input or a folder around
or inside it, a file, a symlink, the current folder, or a folder holding other files.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import ufb_mlx  # noqa: F401  (loads OpenBLAS before mlx)
import mlx.core as mx

from ufb_mlx.cli import run
from ufb_ref import fsio
from ufb_ref.checkpoint import CONFIG_FILE, TOKENIZER_FILES, WEIGHTS_FILE, SafetensorsFile, load_checkpoint
from ufb_ref.errors import UFBError

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
    if (out.exists() or out.is_symlink()) and not force:
        raise UFBError(f"output folder '{out}' exists; pass --force to replace it")
    if force:  # before the (possibly long) read; again below, under the lock
        fsio.check_replaceable(out, _local_input(hf_path))
    ckpt = load_checkpoint(hf_path, allow_nonfinite=allow_nonfinite)
    folder, args, weights = ckpt.folder, ckpt.args, ckpt.weights
    args.source = {"hf_path": str(hf_path), "format": ckpt.layout, "dtype": dtype}
    with fsio.folder_lock(out):
        fsio.clean_stale_temporaries(out)
        if force:  # a Hub id's files are known only now (symlinks into the Hub cache)
            fsio.check_replaceable(out, [folder, *((folder / f).resolve() for f in _files(folder))])
        elif out.exists() or out.is_symlink():
            raise UFBError(f"output folder '{out}' exists; pass --force to replace it")
        with fsio.atomic_folder(out, replace=force, mark=True) as tmp:
            (tmp / CONFIG_FILE).write_text(json.dumps(args.to_dict(), indent=2) + "\n")
            arrays = {k: mx.array(v).astype(DTYPES[dtype]) for k, v in weights.items()}
            mx.save_safetensors(str(tmp / WEIGHTS_FILE), arrays, metadata={"format": "mlx"})
            SafetensorsFile(tmp / WEIGHTS_FILE)  # MLX does not report a failed write (a full disk)
            for name in _files(folder, TOKENIZER_FILES):
                shutil.copyfile(folder / name, tmp / name)
    return out


def _files(folder: Path, names=(CONFIG_FILE, WEIGHTS_FILE, *TOKENIZER_FILES)) -> list[str]:
    return [n for n in names if (folder / n).is_file()]


def _local_input(hf_path: str) -> list[Path]:
    p = Path(hf_path).expanduser()
    return [p] if p.exists() else []


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-path", required=True, help="Hub repo id or local Hub-layout folder")
    p.add_argument("--mlx-path", default="mlx_model", help="output folder (default: mlx_model)")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="weight dtype (default float32)")
    p.add_argument("--force", action="store_true",
                   help="replace an existing output folder that convert.py wrote (nothing else)")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="convert weights holding NaN or Inf (refused by default)")
    a = p.parse_args(argv)
    out = convert(a.hf_path, a.mlx_path, a.dtype, a.force, a.allow_nonfinite)
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(run(main))
