"""Model configuration: the project's flat ``ModelArgs`` and the reading of the Hub's
nested crammedBERT ``arch`` config into it."""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from typing import Any

from .errors import UFBError

MODEL_TYPE = "ultrafastbert"
# Classifier losses (as in transformers): cross-entropy, or MSE on a single output.
PROBLEM_TYPES = (None, "single_label_classification", "regression")


@dataclass
class ModelArgs:
    hidden_size: int
    num_layers: int
    num_heads: int
    vocab_size: int
    max_seq_length: int
    intermed_type: str = "fff"      # "fff" (fast feedforward) or "ffn" (dense twin)
    fff_trees: int = 1              # P: parallel trees (Hub: intermed_size)
    fff_depth: int = 11             # D: tree depth (Hub: intermed_depth)
    ffn_width: int = 0              # dense FFN width when intermed_type == "ffn"
    norm_eps: float = 1e-12
    pad_token_id: int = 0           # embedding padding row (NOT the tokenizer's <pad>)
    task: str = "mlm"               # "mlm" or "classification"
    num_labels: int = 0
    head_dim: int = 0               # classifier pooler width
    id2label: dict | None = None
    problem_type: str | None = None  # classifier loss: None/"single_label_classification" or "regression"
    sparse_prediction: float = 0.25
    model_type: str = MODEL_TYPE
    source: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, params: dict, where: str = "config.json") -> "ModelArgs":
        """``where`` names the source in error messages."""
        if "arch" in params:
            return from_hub_config(params)
        names = inspect.signature(cls).parameters
        missing = [k for k, p in names.items() if p.default is inspect.Parameter.empty and k not in params]
        if missing:
            raise UFBError(f"{where}: missing key '{missing[0]}'")
        args = cls(**{k: v for k, v in params.items() if k in names})
        args.validate(where)
        return args

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def fff_nodes(self) -> int:
        """Nodes per tree, n = 2^(D+1) - 1."""
        return 2 ** (self.fff_depth + 1) - 1

    @property
    def intermed_width(self) -> int:
        """Rows of linear_in: all FFF nodes of all trees, or the dense FFN width."""
        return self.fff_trees * self.fff_nodes if self.intermed_type == "fff" else self.ffn_width

    def validate(self, where: str = "config.json") -> None:
        """Every field's type and range, then the sizes they imply; a UFBError naming the
        field otherwise. Types first, so that no check below meets a string or a float."""
        for key, lo, hi in _INT_RANGES:
            _check_int(where, key, getattr(self, key), lo, hi)
        for key, lo, hi in _REAL_RANGES:
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo < value <= hi:
                raise UFBError(f"{where}: '{key}' must be a number in ({lo}, {hi}], got {_show(value)}")
        for key, choices in (("model_type", (MODEL_TYPE,)), ("intermed_type", ("fff", "ffn")),
                             ("task", ("mlm", "classification")), ("problem_type", PROBLEM_TYPES)):
            if getattr(self, key) not in choices:
                raise UFBError(f"{where}: '{key}' must be one of {', '.join(map(repr, choices))}, "
                               f"got {_show(getattr(self, key))}")
        if self.hidden_size % self.num_heads:
            raise UFBError(f"{where}: hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.pad_token_id >= self.vocab_size:
            raise UFBError(f"{where}: pad_token_id {self.pad_token_id} is outside the vocabulary "
                           f"(vocab_size {self.vocab_size})")
        if self.intermed_type == "ffn" and self.ffn_width < 1:
            raise UFBError(f"{where}: dense FFN needs ffn_width >= 1, got {self.ffn_width}")
        if self.task == "classification" and (self.num_labels < 1 or self.head_dim < 1):
            raise UFBError(f"{where}: a classifier needs num_labels >= 1 and head_dim >= 1")
        if self.problem_type == "regression" and (self.task != "classification" or self.num_labels != 1):
            raise UFBError(f"{where}: problem_type 'regression' needs task 'classification' and num_labels 1")
        if self.id2label is not None and not (
                isinstance(self.id2label, dict)
                and all(isinstance(k, str) and k.isdigit() and len(k) < 10 and isinstance(v, str)
                        for k, v in self.id2label.items())):
            raise UFBError(f"{where}: 'id2label' must map class numbers (\"0\", \"1\", ...) to label names, "
                           f"got {_show(self.id2label)}")
        if not isinstance(self.source, dict):
            raise UFBError(f"{where}: 'source' must be an object, got {_show(self.source)}")
        for name, numel in self._largest_tensors().items():
            if numel > MAX_TENSOR_ELEMENTS:
                raise UFBError(f"{where}: the {name} would hold {numel:.3g} values, more than one array "
                               f"can ({MAX_TENSOR_ELEMENTS:.3g}); make the model smaller")

    def _largest_tensors(self) -> dict[str, int]:
        H = self.hidden_size
        return {"word embedding (vocab_size x hidden_size)": self.vocab_size * H,
                "position table (max_seq_length x hidden_size)": self.max_seq_length * H,
                "feedforward weight (intermediate width x hidden_size)": self.intermed_width * H,
                "attention projection (3 hidden_size x hidden_size)": 3 * H * H,
                "classifier head (num_labels x head_dim)": self.num_labels * self.head_dim}


# MLX shapes are 32-bit and some of its kernels index with 32-bit integers: no array may
# hold more values than this (a larger one ends in an overflow error or a crash).
MAX_TENSOR_ELEMENTS = 2**31 - 1
# Integer fields: (name, smallest, largest). The upper bounds are far beyond any BERT-sized
# model (the Hub's UltraFastBERT: hidden 768, 12 layers, depth 11, 128 tokens) and keep
# the arithmetic on them small; the joint sizes are bounded by MAX_TENSOR_ELEMENTS.
_INT_RANGES = (("hidden_size", 1, 2**16), ("num_layers", 1, 1024), ("num_heads", 1, 2**16),
               ("vocab_size", 1, 2**31 - 1), ("max_seq_length", 1, 2**16), ("fff_trees", 1, 2**16),
               ("fff_depth", 0, 30), ("ffn_width", 0, 2**31 - 1), ("pad_token_id", 0, 2**31 - 2),
               ("num_labels", 0, 2**20), ("head_dim", 0, 2**16))
_REAL_RANGES = (("norm_eps", 0.0, 1.0), ("sparse_prediction", 0.0, 1.0))


def _show(value) -> str:
    """A short rendering of a bad value for an error line (a 5000-digit integer or a deep
    list must not become a megabyte-long message)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    try:
        text = repr(value)
    except (ValueError, RecursionError):
        text = f"a {type(value).__name__}"
    text = text if len(text) <= 40 else text[:37] + "..."
    return f"{text} ({type(value).__name__})" if isinstance(value, (str, float, bool)) else text


def _check_int(where: str, key: str, value, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise UFBError(f"{where}: '{key}' must be an integer, got {_show(value)}")
    if not lo <= value <= hi:
        raise UFBError(f"{where}: '{key}' must be in [{lo}, {hi}], got {_show(value)}")


# Hub arch values this implementation computes exactly; anything else is refused by name
# rather than silently computed differently.
_REQUIRED_ARCH = {
    "norm": "LayerNorm",
    "norm_scheme": "pre",
    "nonlin": "GELU",
    "final_norm": True,
    "use_bias": False,
    "tie_weights": True,
    "skip_head_transform": True,
    "decoder_bias": False,
    "ffn_layer_frequency": 1,
    "embedding.pos_embedding": "scaled-sinusoidal",
    "embedding.normalization": True,
    "attention.type": "self-attention",
    "attention.causal_attention": False,
    "attention.qkv_bias": False,
    "attention.rotary_embedding": False,
    "attention.skip_output_projection": False,
    "attention.sequence_op": "torch-softmax",
}
_REQUIRED_CLS_HEAD = {"pooler": "zero_index", "nonlin": "Tanh", "include_ff_layer": True}
_ARCHITECTURES = {
    "ScriptableLMForPreTraining": "mlm",
    "ScriptableLMForSequenceClassification": "classification",
}


def _get(d: dict, dotted: str, where: str = "arch"):
    cur: Any = d
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            raise UFBError(f"config.json: missing key '{where}.{dotted}'")
        cur = cur[part]
    return cur


def from_hub_config(cfg: dict) -> ModelArgs:
    """Translate a Hub crammedBERT config (``{"arch": {...}, "architectures": [...]}``)."""
    if cfg.get("model_type") != "crammedBERT":
        raise UFBError(f"config.json: model_type {cfg.get('model_type')!r} is not 'crammedBERT'")
    arch = cfg["arch"]
    if not isinstance(arch, dict):
        raise UFBError("config.json: 'arch' is not an object")
    for key, want in _REQUIRED_ARCH.items():
        got = _get(arch, key)
        if type(got) is not type(want) or got != want:
            raise UFBError(f"config.json: arch.{key} is {got!r}; only {want!r} is supported")
    intermed = _get(arch, "intermed_type")
    if intermed != "fff":
        raise UFBError(f"config.json: arch.intermed_type is {intermed!r}; this is not an FFF crammedBERT (need 'fff')")
    names = cfg.get("architectures") or []
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise UFBError(f"config.json: 'architectures' must be a list of class names, got {_show(names)}")
    task = next((_ARCHITECTURES[n] for n in names if n in _ARCHITECTURES), None)
    if task is None:
        raise UFBError(f"config.json: architectures {names!r} names no supported head "
                       f"({', '.join(_ARCHITECTURES)})")
    hidden = _get(arch, "hidden_size")
    if _get(arch, "embedding.embedding_dim") != hidden:
        raise UFBError("config.json: arch.embedding.embedding_dim differs from arch.hidden_size")
    args = ModelArgs(
        hidden_size=hidden,
        num_layers=_get(arch, "num_transformer_layers"),
        num_heads=_get(arch, "attention.num_attention_heads"),
        vocab_size=_get(arch, "embedding.vocab_size"),
        max_seq_length=_get(arch, "embedding.max_seq_length"),
        intermed_type="fff",
        fff_trees=_get(arch, "intermed_size"),
        fff_depth=_get(arch, "intermed_depth"),
        norm_eps=_get(arch, "norm_eps"),
        pad_token_id=_get(arch, "embedding.pad_token_id"),
        task=task,
        sparse_prediction=arch.get("sparse_prediction", 0.25),
    )
    if task == "classification":
        head = _get(arch, "classification_head")
        for key, want in _REQUIRED_CLS_HEAD.items():
            got = _get(head, key, "arch.classification_head")
            if type(got) is not type(want) or got != want:
                raise UFBError(f"config.json: arch.classification_head.{key} is {got!r}; only {want!r} is supported")
        args.head_dim = _get(head, "head_dim", "arch.classification_head")
        # The original sizes its head from transformers' num_labels (len(id2label)); the
        # loader overrides this with head.weight's row count, the one certain source.
        id2label = cfg.get("id2label")
        if id2label is not None and not isinstance(id2label, dict):
            raise UFBError(f"config.json: 'id2label' must be an object, got {_show(id2label)}")
        args.num_labels = len(id2label) if id2label else (arch.get("num_labels") or 2)
        args.id2label = {str(k): v for k, v in id2label.items()} if id2label else None
    args.validate()
    return args
