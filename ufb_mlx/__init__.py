"""UltraFastBERT in MLX with conditional execution of the fast feedforward layers."""

from . import blas

blas.load_openblas()  # before the first import of mlx: see blas.py

from ufb_ref.config import ModelArgs  # noqa: E402
from ufb_ref.errors import UFBError  # noqa: E402
from ufb_ref.tokenizer import Tokenizer  # noqa: E402

from .loading import DEMO, DEMO_MODEL, load, save_model  # noqa: E402
from .model import Model  # noqa: E402

__all__ = ["DEMO", "DEMO_MODEL", "ModelArgs", "Model", "Tokenizer", "UFBError", "load", "save_model"]
