"""This process's place among the data-parallel processes (MLX's distributed layer)."""

from __future__ import annotations

import hashlib

import mlx.core as mx
import numpy as np

from ufb_ref.errors import UFBError


class World:
    """This process's place among the data-parallel processes (size 1 without mlx.launch)."""

    def __init__(self):
        self.group = mx.distributed.init()
        self.rank, self.size = self.group.rank(), self.group.size()

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, values) -> np.ndarray:
        """Element-wise sum over the processes of a small array: integers exactly (as
        int64), floats in float64."""
        values = np.asarray(values)
        if self.size == 1:
            return values
        wide = np.int64 if np.issubdtype(values.dtype, np.integer) else np.float64
        out = mx.distributed.all_sum(mx.array(values.astype(wide)), group=self.group, stream=mx.cpu)
        return np.array(out).astype(values.dtype)

    def barrier(self) -> None:
        if self.size > 1:
            mx.eval(mx.distributed.all_sum(mx.array(1), group=self.group, stream=mx.cpu))

    def broadcast_text(self, text: str | None) -> str:
        """Rank 0's ``text`` on every process (an all-sum of its UTF-8 bytes in which the
        others add zeros, exact in uint8); needs no shared file system."""
        if self.size == 1:
            return text
        data = np.frombuffer(text.encode(), dtype=np.uint8) if self.main else np.zeros(0, np.uint8)
        n = int(self.sum(np.array([len(data)], dtype=np.int64))[0])
        buf = np.zeros(n, dtype=np.uint8)
        if self.main:
            buf[:] = data
        every = np.array(mx.distributed.all_sum(mx.array(buf), group=self.group, stream=mx.cpu))
        return every.tobytes().decode()

    def check_same(self, what: str, text: str) -> None:
        """All processes must hold the same ``text`` (e.g. a tokenizer or a label map)."""
        if self.size == 1:
            return
        h = np.frombuffer(hashlib.sha256(text.encode()).digest()[:8], dtype=np.uint16).astype(np.float32)
        every = np.array(mx.distributed.all_gather(mx.array(h[None]), group=self.group))
        if not (every == h[None]).all():
            raise UFBError(f"the {self.size} processes disagree on the {what}; give every process the same files")

