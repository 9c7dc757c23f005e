"""Loading the reference model: ``load`` reads and validates a checkpoint
(``ufb_ref.checkpoint``) into a NumPy ``Model``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .checkpoint import load_checkpoint
from .errors import UFBError
from .model import Model

DEMO = "demo"  # the small model shipped in ufb_mlx/demo_model (ufb_mlx.loading.DEMO)


def model_location(path_or_hub_id):
    """The demo model's folder for the name "demo" (found without importing ufb_mlx, which
    would import MLX); anything else as given."""
    if str(path_or_hub_id) != DEMO:
        return path_or_hub_id
    import importlib.util

    spec = importlib.util.find_spec("ufb_mlx")
    if spec is None or not spec.submodule_search_locations:
        raise UFBError("the demo model ships in the ufb_mlx package, which is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "demo_model"


def load(path_or_hub_id, dtype=np.float32, mode: str = "descent", allow_nonfinite: bool = False):
    """(Model, Tokenizer) from a converted folder, a Hub-layout folder, a Hub repo id or
    "demo" (the model shipped in ufb_mlx). Weights holding NaN or Inf are refused unless
    ``allow_nonfinite``."""
    ckpt = load_checkpoint(model_location(path_or_hub_id), allow_nonfinite=allow_nonfinite)
    return Model(ckpt.args, ckpt.weights, dtype=dtype, mode=mode), ckpt.tokenizer
