"""Input validation of the MLX model: the checks of ``ufb_ref.inputs`` (one definition),
without a host sync for MLX arrays."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from ufb_ref.config import ModelArgs
from ufb_ref.inputs import check_ids_layout, check_inputs as check_host_inputs


def check_inputs(input_ids, attention_mask, args: ModelArgs):
    """Accepts NumPy or MLX integer arrays, (B, S) or (S,); returns MLX arrays. Host data
    is checked in full (``ufb_ref.inputs.check_inputs``, the vocabulary range included);
    an MLX array only for dtype and shape, since its values would need a device sync (the
    embedding makes an unknown id's token NaN instead of reading out of bounds)."""
    if not isinstance(input_ids, mx.array):
        ids, mask = check_host_inputs(input_ids, attention_mask, args)
        return mx.array(ids), mx.array(mask)
    ids = input_ids[None] if input_ids.ndim == 1 else input_ids
    check_ids_layout(ids.shape, mx.issubdtype(ids.dtype, mx.integer), ids.dtype, args)
    if attention_mask is None:
        mask = mx.ones(ids.shape, dtype=mx.int32)
    else:
        mask = attention_mask if isinstance(attention_mask, mx.array) else mx.array(np.asarray(attention_mask))
        mask = mask.reshape(ids.shape)
    return ids, mask
