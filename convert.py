"""``python convert.py --hf-path <Hub id or folder> --mlx-path <out>``: the converter of
the design brief, run from a clone. The code is ``ufb_mlx.convert`` (also the console
command ``ufb-convert``)."""

import ufb_mlx  # noqa: F401  (loads OpenBLAS before mlx)
from ufb_mlx.convert import cli, convert  # noqa: F401  (convert: the library function)

if __name__ == "__main__":
    cli()
