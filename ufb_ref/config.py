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
    def from_dict(cls, params: dict) -> "ModelArgs":
        if "arch" in params:
            return from_hub_config(params)
        names = inspect.signature(cls).parameters
        missing = [k for k, p in names.items() if p.default is inspect.Parameter.empty and k not in params]
        if missing:
            raise UFBError(f"config.json: missing key '{missing[0]}'")
        args = cls(**{k: v for k, v in params.items() if k in names})
        args.validate()
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

    def validate(self) -> None:
        if self.model_type != MODEL_TYPE:
            raise UFBError(f"config.json: model_type '{self.model_type}' is not '{MODEL_TYPE}'")
        for key in ("hidden_size", "num_layers", "num_heads", "vocab_size", "max_seq_length"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) <= 0:
                raise UFBError(f"config.json: '{key}' must be a positive integer, got {getattr(self, key)!r}")
        if self.hidden_size % self.num_heads:
            raise UFBError(f"config.json: hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.intermed_type == "fff":
            if self.fff_trees < 1 or self.fff_depth < 0:
                raise UFBError(f"config.json: FFF needs fff_trees >= 1 and fff_depth >= 0, got {self.fff_trees}, {self.fff_depth}")
        elif self.intermed_type == "ffn":
            if self.ffn_width < 1:
                raise UFBError(f"config.json: dense FFN needs ffn_width >= 1, got {self.ffn_width}")
        else:
            raise UFBError(f"config.json: intermed_type '{self.intermed_type}' is not 'fff' or 'ffn'")
        if self.task not in ("mlm", "classification"):
            raise UFBError(f"config.json: task '{self.task}' is not 'mlm' or 'classification'")
        if self.task == "classification" and (self.num_labels < 1 or self.head_dim < 1):
            raise UFBError("config.json: a classifier needs num_labels >= 1 and head_dim >= 1")
        if self.problem_type not in PROBLEM_TYPES:
            raise UFBError(f"config.json: problem_type {self.problem_type!r} is not one of {PROBLEM_TYPES}")
        if self.problem_type == "regression" and (self.task != "classification" or self.num_labels != 1):
            raise UFBError("config.json: problem_type 'regression' needs task 'classification' and num_labels 1")


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
        if got != want:
            raise UFBError(f"config.json: arch.{key} is {got!r}; only {want!r} is supported")
    intermed = _get(arch, "intermed_type")
    if intermed != "fff":
        raise UFBError(f"config.json: arch.intermed_type is {intermed!r}; this is not an FFF crammedBERT (need 'fff')")
    names = cfg.get("architectures") or []
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
        norm_eps=float(_get(arch, "norm_eps")),
        pad_token_id=_get(arch, "embedding.pad_token_id"),
        task=task,
        sparse_prediction=float(arch.get("sparse_prediction", 0.25)),
    )
    if task == "classification":
        head = _get(arch, "classification_head")
        for key, want in _REQUIRED_CLS_HEAD.items():
            got = _get(head, key, "arch.classification_head")
            if got != want:
                raise UFBError(f"config.json: arch.classification_head.{key} is {got!r}; only {want!r} is supported")
        args.head_dim = _get(head, "head_dim", "arch.classification_head")
        # The original sizes its head from transformers' num_labels (len(id2label)); the
        # loader overrides this with head.weight's row count, the one certain source.
        id2label = cfg.get("id2label")
        args.num_labels = len(id2label) if id2label else (arch.get("num_labels") or 2)
        args.id2label = {str(k): v for k, v in id2label.items()} if id2label else None
    args.validate()
    return args
