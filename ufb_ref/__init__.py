"""NumPy reference implementation of UltraFastBERT: the executable specification."""

from .config import ModelArgs
from .errors import UFBError
from .loading import load
from .model import Model
from .tokenizer import Tokenizer

__all__ = ["ModelArgs", "Model", "Tokenizer", "UFBError", "load"]
