"""Loading the reference model: ``load`` reads and validates a checkpoint
(``ufb_ref.checkpoint``) into a NumPy ``Model``."""

from __future__ import annotations

import numpy as np

from .checkpoint import load_checkpoint
from .model import Model


def load(path_or_hub_id, dtype=np.float32, mode: str = "descent", allow_nonfinite: bool = False):
    """(Model, Tokenizer) from a converted folder, a Hub-layout folder or a Hub repo id.
    Weights holding NaN or Inf are refused unless ``allow_nonfinite``."""
    ckpt = load_checkpoint(path_or_hub_id, allow_nonfinite=allow_nonfinite)
    return Model(ckpt.args, ckpt.weights, dtype=dtype, mode=mode), ckpt.tokenizer
