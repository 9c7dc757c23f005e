"""UltraFastBERT in NumPy: the reference that defines the semantics (docs/DESIGN.md section 2).

Each function is one equation of the model; ``Model`` strings them together. Arrays are
batch-first: (batch B, sequence S, hidden H). Pass ``dtype=np.float64`` to ``load`` for
ground-truth computations. Input validation is ``ufb_ref.inputs``, loading
``ufb_ref.loading``, the losses ``ufb_ref.losses``.
"""

from __future__ import annotations

import math

import numpy as np

from . import fff as fff_lib
from .config import ModelArgs
from .errors import UFBError
from .inputs import check_inputs


def sinusoidal_table(length: int, dim: int) -> np.ndarray:
    """pe[p, 2i] = sin(p * f_i), pe[p, 2i+1] = cos(p * f_i), f_i = 10000^(-2i/dim); built
    in float32 as the original does, so both backends share the same table."""
    pos = np.arange(length, dtype=np.float32)[:, None]
    freq = np.exp(np.arange(0, dim, 2, dtype=np.float32) * np.float32(-math.log(10000.0) / dim))
    pe = np.zeros((length, dim), dtype=np.float32)
    pe[:, 0::2] = np.sin(pos * freq)
    pe[:, 1::2] = np.cos(pos * freq)
    return pe


def layer_norm(x, weight, bias, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def embed(w, input_ids, args: ModelArgs):
    """LayerNorm(word_embedding[ids] + scale * pe[:S])."""
    p = "encoder.embedding."
    S = input_ids.shape[1]
    pe = sinusoidal_table(S, args.hidden_size).astype(w[p + "word_embedding.weight"].dtype)
    x = w[p + "word_embedding.weight"][input_ids] + w[p + "pos_embedding.scale_factor"] * pe
    return layer_norm(x, w[p + "norm.weight"], w[p + "norm.bias"], args.norm_eps)


def split_heads(qkv, num_heads):
    """Fused projection (B, S, 3H), laid out per head as [q_h | k_h | v_h] blocks,
    -> three (B, heads, S, dh) arrays."""
    B, S, three_h = qkv.shape
    dh = three_h // (3 * num_heads)
    qkv = qkv.reshape(B, S, num_heads, 3, dh).transpose(3, 0, 2, 1, 4)
    return qkv[0], qkv[1], qkv[2]


def softmax(s, axis=-1):
    e = np.exp(s - s.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def attention(x, w, prefix, attention_mask, args: ModelArgs):
    """softmax(q k^T / sqrt(dh) + (1 - mask) * -10000) v, heads concatenated, then dense."""
    q, k, v = split_heads(x @ w[prefix + "self_attention.query_key_value.weight"].T, args.num_heads)
    scores = q @ k.transpose(0, 1, 3, 2) * x.dtype.type(args.head_size ** -0.5)
    scores = scores + ((1 - attention_mask) * -10000.0).astype(x.dtype)[:, None, None, :]
    ctx = softmax(scores) @ v                                  # (B, heads, S, dh)
    B, _, S, _ = ctx.shape
    ctx = ctx.transpose(0, 2, 1, 3).reshape(B, S, args.hidden_size)
    return ctx @ w[prefix + "dense.weight"].T


def feedforward(x, w, prefix, args: ModelArgs, mode: str):
    """The FFF block: ``mode`` "descent" (conditional) or "dense" (the original masked
    computation); a dense FFN twin is gelu(x W_in^T + b) W_out^T."""
    w_in, b_in, w_out = (w[prefix + k] for k in ("linear_in.weight", "linear_in.bias", "linear_out.weight"))
    if args.intermed_type == "ffn":
        return (fff_lib.gelu(x @ w_in.T + b_in) @ w_out.T).astype(x.dtype)
    fn = fff_lib.fff_descent if mode == "descent" else fff_lib.fff_dense
    return fn(x, w_in, b_in, w_out, args.fff_trees, args.fff_depth)


def encode(w, input_ids, attention_mask, args: ModelArgs, mode="descent", paths=None, fff_inputs=None):
    """Embedding, pre-norm layers, final norm -> hidden states (B, S, H). When ``paths`` is
    a list, each layer's routing (B, S, P, D+1) is appended to it; when ``fff_inputs`` is,
    the input of each layer's FFF (B, S, H) (ufb_mlx.check compares the FFF there)."""
    x = embed(w, input_ids, args)
    for i in range(args.num_layers):
        p = f"encoder.layers.{i}."
        x = x + attention(layer_norm(x, w[p + "norm1.weight"], w[p + "norm1.bias"], args.norm_eps),
                          w, p + "attn.", attention_mask, args)
        h = layer_norm(x, w[p + "norm2.weight"], w[p + "norm2.bias"], args.norm_eps)
        if fff_inputs is not None and args.intermed_type == "fff":
            fff_inputs.append(h)
        if paths is not None and args.intermed_type == "fff":
            paths.append(fff_lib.descend(h, w[p + "ffn.linear_in.weight"], w[p + "ffn.linear_in.bias"],
                                         args.fff_trees, args.fff_depth)[0])
        x = x + feedforward(h, w, p + "ffn.", args, mode)
    return layer_norm(x, w["encoder.final_norm.weight"], w["encoder.final_norm.bias"], args.norm_eps)


def mlm_logits(w, hidden):
    """Tied decoder, no transform and no bias: hidden @ word_embedding^T."""
    return hidden @ w["encoder.embedding.word_embedding.weight"].T


def classify(w, hidden):
    """Pooler on the first token (zero_index): head(tanh(dense(h_0)))."""
    pooled = np.tanh(hidden[:, 0] @ w["pooler.dense.weight"].T + w["pooler.dense.bias"])
    return pooled @ w["head.weight"].T + w["head.bias"]


class Model:
    """``model(input_ids, attention_mask=mask)`` -> MLM logits (B, S, V) or classifier
    logits (B, num_labels)."""

    def __init__(self, args: ModelArgs, weights: dict, dtype=np.float32, mode: str = "descent"):
        if mode not in ("descent", "dense"):
            raise UFBError(f"mode must be 'descent' or 'dense', got {mode!r}")
        self.args, self.mode = args, mode
        self.weights = {k: np.asarray(v, dtype=dtype) for k, v in weights.items()}

    def encode(self, input_ids, attention_mask=None, paths=None, fff_inputs=None):
        ids, mask = check_inputs(input_ids, attention_mask, self.args)
        return encode(self.weights, ids, mask, self.args, self.mode, paths, fff_inputs)

    def __call__(self, input_ids, attention_mask=None):
        hidden = self.encode(input_ids, attention_mask)
        if self.args.task == "classification":
            return classify(self.weights, hidden)
        return mlm_logits(self.weights, hidden)

