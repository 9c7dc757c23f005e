"""UltraFastBERT in MLX, the model file: ``ModelArgs``, the modules, ``Model`` and its
``sanitize`` (checkpoint tensors -> parameters). Parameter names equal the Hub checkpoint's
keys (minus the tied ``decoder.weight`` copy and the ``norm_factor`` buffers), so weights
compare by name. Mirrors ``ufb_ref.model`` block by block. Loading and saving are
``ufb_mlx.loading``, the losses ``ufb_mlx.losses``, input validation ``ufb_mlx.inputs``.

The backend (ufb_mlx.backend) is resolved once, when the model is built or
``Model.set_backend`` is called: each layer keeps the implementation ("ops", "cpu" or
"metal") in ``impl`` and runs it without deciding again.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ufb_ref import checkpoint
from ufb_ref.config import ModelArgs
from ufb_ref.errors import UFBError
from ufb_ref.model import sinusoidal_table

from . import backend as backend_lib
from . import cpu_kernels
from . import fff as fff_lib
from .inputs import check_inputs

__all__ = ["FFF_MODES", "ModelArgs", "Model", "column_major", "drop_hub_extras"]

FFF_MODES = ("conditional", "dense")


class ScaledSinusoidal(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.scale_factor = mx.array([args.hidden_size ** -0.5], dtype=mx.float32)
        # Underscore: a constant, not a parameter (the checkpoint does not store it).
        self._pe = mx.array(sinusoidal_table(args.max_seq_length, args.hidden_size))

    def __call__(self, seq_len: int):
        return self.scale_factor * self._pe[:seq_len]


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm (the same parameters), computed by the extension's primitive when
    ``impl`` is "cpu": MLX's CPU layer_norm costs ~4.6 ns an element, ~7x the primitive's."""

    def __init__(self, args: ModelArgs, impl: str = "ops"):
        super().__init__(args.hidden_size, eps=args.norm_eps)
        self.impl = impl

    def __call__(self, x):
        if self.impl == "cpu":
            return cpu_kernels.layer_norm(x, self.weight, self.bias, self.eps).astype(x.dtype)
        return super().__call__(x)


class Embedding(nn.Module):
    """LayerNorm(word_embedding[ids] + scale * pe[:S])."""

    def __init__(self, args: ModelArgs, impl: str = "ops"):
        super().__init__()
        self.word_embedding = nn.Embedding(args.vocab_size, args.hidden_size)
        self.pos_embedding = ScaledSinusoidal(args)
        self.norm = LayerNorm(args, impl)
        self.pad_token_id = args.pad_token_id

    def __call__(self, input_ids):
        # An id outside the table must never be read (MLX's gather does not check), and
        # checking on the host would cost a sync per forward: such a token reads row 0 and
        # its vector becomes NaN, which spreads to its sequence's outputs.
        vocab = self.word_embedding.weight.shape[0]
        known = (input_ids >= 0) & (input_ids < vocab)
        x = self.word_embedding(mx.where(known, input_ids, 0))
        x = mx.where(known[..., None], x, mx.array(float("nan"), x.dtype))
        # torch's padding_idx: the padding row gets no gradient through the lookup (it
        # still gets one through the tied decoder).
        x = mx.where((input_ids == self.pad_token_id)[..., None], mx.stop_gradient(x), x)
        x = x + self.pos_embedding(input_ids.shape[1]).astype(x.dtype)
        return self.norm(x)


class SelfAttentionProj(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.query_key_value = nn.Linear(args.hidden_size, 3 * args.hidden_size, bias=False)


class Attention(nn.Module):
    """Fused QKV laid out per head ([q_h | k_h | v_h] blocks), softmax attention with the
    additive (1 - mask) * -10000 key mask (B, S), heads concatenated, then dense. When
    ``impl`` is "cpu" one fused primitive reads the per-head layout in place."""

    def __init__(self, args: ModelArgs, impl: str = "ops"):
        super().__init__()
        self.self_attention = SelfAttentionProj(args)
        self.dense = nn.Linear(args.hidden_size, args.hidden_size, bias=False)
        self.num_heads, self.head_size, self.impl = args.num_heads, args.head_size, impl

    def __call__(self, x, key_mask):
        B, S, H = x.shape
        qkv = self.self_attention.query_key_value(x)
        scale = self.head_size ** -0.5
        if self.impl == "cpu":
            return self.dense(cpu_kernels.attention(qkv, key_mask, self.num_heads, scale).astype(x.dtype))
        qkv = qkv.reshape(B, S, self.num_heads, 3, self.head_size).transpose(3, 0, 2, 1, 4)  # (3, B, heads, S, dh)
        ctx = mx.fast.scaled_dot_product_attention(
            qkv[0], qkv[1], qkv[2], scale=scale, mask=key_mask[:, None, None, :])
        return self.dense(ctx.transpose(0, 2, 1, 3).reshape(B, S, H))


class FFF(nn.Module):
    """Fast feedforward: P trees of depth D (``linear_in`` rows k*n .. k*n+n-1 are tree k).
    ``mode`` "conditional" visits D+1 neurons per token and tree (by the implementation
    ``impl``, on its own device); "dense" is the original masked computation of all of
    them."""

    def __init__(self, args: ModelArgs, mode: str = "conditional", impl: str = "ops"):
        super().__init__()
        self.linear_in = nn.Linear(args.hidden_size, args.intermed_width, bias=True)
        self.linear_out = nn.Linear(args.intermed_width, args.hidden_size, bias=False)
        self.trees, self.depth, self.mode, self.impl = args.fff_trees, args.fff_depth, mode, impl

    def routing(self, x):
        """Within-tree node ids visited per level, (..., P, D+1)."""
        paths, _ = fff_lib.descend(x, self.linear_in.weight, self.linear_in.bias, self.trees, self.depth)
        return paths

    def __call__(self, x):
        w = (self.linear_in.weight, self.linear_in.bias, self.linear_out.weight, self.trees, self.depth)
        if self.mode == "dense":
            return fff_lib.fff_dense(x, *w, impl=self.impl)
        return fff_lib.run_conditional(self.impl, x, *w)


class FFN(nn.Module):
    """Dense feedforward twin (``intermed_type`` "ffn"): gelu(x W_in^T + b) W_out^T."""

    def __init__(self, args: ModelArgs, impl: str = "ops"):
        super().__init__()
        self.linear_in = nn.Linear(args.hidden_size, args.intermed_width, bias=True)
        self.linear_out = nn.Linear(args.intermed_width, args.hidden_size, bias=False)
        self.impl = impl

    def __call__(self, x):
        return self.linear_out(fff_lib.fast_gelu(self.linear_in(x), impl=self.impl))


# The modules that run an implementation: Model.set_backend sets their ``impl``.
_DISPATCHING = (LayerNorm, Attention, FFF, FFN)


class TransformerLayer(nn.Module):
    def __init__(self, args: ModelArgs, fff_mode: str, impl: str = "ops"):
        super().__init__()
        self.norm1 = LayerNorm(args, impl)
        self.attn = Attention(args, impl)
        self.norm2 = LayerNorm(args, impl)
        self.ffn = FFF(args, fff_mode, impl) if args.intermed_type == "fff" else FFN(args, impl)
        self.dropout = nn.Dropout(0.0)

    def __call__(self, x, key_mask, paths=None):
        x = x + self.dropout(self.attn(self.norm1(x), key_mask))
        h = self.norm2(x)
        if paths is not None and isinstance(self.ffn, FFF):
            paths.append(self.ffn.routing(h))
        return x + self.dropout(self.ffn(h))


class Encoder(nn.Module):
    def __init__(self, args: ModelArgs, fff_mode: str, impl: str = "ops"):
        super().__init__()
        self.embedding = Embedding(args, impl)
        self.layers = [TransformerLayer(args, fff_mode, impl) for _ in range(args.num_layers)]
        self.final_norm = LayerNorm(args, impl)

    def __call__(self, input_ids, attention_mask, paths=None):
        """Hidden states (B, S, H). When ``paths`` is a list, each FFF layer's routing
        (B, S, P, D+1), within-tree node ids, is appended to it."""
        additive = (1 - attention_mask.astype(mx.float32)) * -10000.0   # (B, S), on the keys
        x = self.embedding(input_ids)
        additive = additive.astype(x.dtype)
        for layer in self.layers:
            x = layer(x, additive, paths)
        return self.final_norm(x)


class Pooler(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.dense = nn.Linear(args.hidden_size, args.head_dim)
        self.dropout = nn.Dropout(0.0)

    def __call__(self, hidden):
        return self.dropout(mx.tanh(self.dense(hidden[:, 0])))  # zero_index pooling


class Model(nn.Module):
    """``model(input_ids, attention_mask=mask)`` -> MLM logits (B, S, V) or classifier
    logits (B, num_labels). ``backend`` (ufb_mlx.backend: "auto", "ops", "cpu", "metal")
    is resolved here, "auto" by the default device now; ``set_backend`` resolves again."""

    def __init__(self, args: ModelArgs, fff_mode: str = "conditional", backend: str = "auto"):
        super().__init__()
        if fff_mode not in FFF_MODES:
            raise UFBError(f"fff_mode must be one of {FFF_MODES}, got {fff_mode!r}")
        self.args = args
        impl = backend_lib.resolve(backend)
        self.backend = backend
        self.encoder = Encoder(args, fff_mode, impl)
        if args.task == "classification":
            self.pooler = Pooler(args)
            self.head = nn.Linear(args.head_dim, args.num_labels)

    @property
    def impl(self) -> str:
        """The implementation the layers run ("ops", "cpu" or "metal")."""
        return self.encoder.final_norm.impl

    def set_backend(self, backend: str) -> None:
        """Resolve ``backend`` now ("auto": by the current default device) and run every
        layer by that implementation from the next call on. An absent one is refused
        (one line) and the model keeps its implementation."""
        impl = backend_lib.resolve(backend)
        self.backend = backend
        for _, module in self.named_modules():
            if isinstance(module, _DISPATCHING):
                module.impl = impl

    def set_dropout(self, p: float) -> None:
        """Dropout for fine-tuning (the paper's 0.1); the checkpoints run without it. The
        dropout modules are replaced (nn.Dropout keeps its rate private)."""
        for layer in self.encoder.layers:
            layer.dropout = nn.Dropout(p)
        if "pooler" in self:
            self.pooler.dropout = nn.Dropout(p)

    def encode(self, input_ids, attention_mask=None, paths=None):
        ids, mask = check_inputs(input_ids, attention_mask, self.args)
        return self.encoder(ids, mask, paths)

    def mlm_logits(self, hidden):
        """Tied decoder: hidden @ word_embedding^T (no transform, no bias)."""
        return self.encoder.embedding.word_embedding.as_linear(hidden)

    def __call__(self, input_ids, attention_mask=None):
        hidden = self.encode(input_ids, attention_mask)
        if self.args.task == "classification":
            return self.head(self.pooler(hidden))
        return self.mlm_logits(hidden)

    def sanitize(self, weights: dict) -> dict:
        """Checkpoint tensors (as ``mx.load`` returns them, either folder layout) -> this
        model's parameters, in their stored dtype: the Hub's extra tensors (the tied
        decoder's copy, the ``norm_factor`` buffers) checked and dropped as the reference
        does (``drop_hub_extras``), and each FFF's ``linear_out.weight`` laid out
        column-major (``column_major``). Lazy: nothing is read but what the checks compare."""
        weights = drop_hub_extras(weights, self.args)
        if self.args.intermed_type == "fff":
            weights = {k: column_major(v) if k.endswith("ffn.linear_out.weight") else v for k, v in weights.items()}
        return weights


def drop_hub_extras(weights: dict, args: ModelArgs) -> dict:
    """``ufb_ref.checkpoint.sanitize`` on MLX arrays: the Hub's tied decoder copy and the
    ``norm_factor`` buffers checked and dropped, compared by MLX (nothing through NumPy)."""
    return checkpoint.sanitize(weights, args, array_equal=lambda a, b: mx.array_equal(a, b).item())


def column_major(w):
    """The same (H, P*n) values, laid out as the transpose of a row-major (P*n, H) buffer:
    the conditional FFF reads rows of w^T, which then cost no copy (see fff.py). A cast
    (``astype``) keeps the layout."""
    return mx.contiguous(w.T).T
