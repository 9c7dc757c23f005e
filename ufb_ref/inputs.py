"""Input validation: the one definition of what a model accepts as ``input_ids`` and
``attention_mask``. ``ufb_mlx.inputs`` applies the same checks to MLX arrays."""

from __future__ import annotations

import numpy as np

from .config import ModelArgs
from .errors import UFBError


def check_ids_layout(shape: tuple, integer: bool, dtype, args: ModelArgs) -> None:
    """Rank, dtype and length of the ids (a 1-D input already made one row): what can be
    checked without reading the values."""
    if len(shape) != 2 or not integer:
        raise UFBError(f"input_ids must be an integer array (batch, seq), got {dtype} {tuple(shape)}")
    if shape[1] > args.max_seq_length:
        raise UFBError(f"sequence length {shape[1]} exceeds max_seq_length {args.max_seq_length}")


def check_inputs(input_ids, attention_mask, args: ModelArgs):
    """(ids (B, S), mask (B, S)) as NumPy arrays from host data, (B, S) or (S,): every
    check, the vocabulary range included (an id outside it would index out of bounds)."""
    ids = np.asarray(input_ids)
    if ids.ndim == 1:
        ids = ids[None]
    check_ids_layout(ids.shape, np.issubdtype(ids.dtype, np.integer), ids.dtype, args)
    if ids.size and (ids.min() < 0 or ids.max() >= args.vocab_size):
        raise UFBError(f"input_ids outside the vocabulary [0, {args.vocab_size})")
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask).reshape(ids.shape)
    return ids, mask
