"""UltraFastBERT in MLX. Parameter names equal the Hub checkpoint's keys (minus the tied
``decoder.weight`` copy and the ``norm_factor`` buffers), so weights compare by name.
Mirrors ``ufb_ref.model`` block by block."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from ufb_ref import fsio
from ufb_ref.checkpoint import CONFIG_FILE, TOKENIZER_FILES, WEIGHTS_FILE, SafetensorsFile, load_checkpoint
from ufb_ref.config import ModelArgs
from ufb_ref.errors import UFBError
from ufb_ref.model import check_inputs as ref_check_inputs, sinusoidal_table

from . import backend as backend_lib
from . import cpu_kernels
from . import fff as fff_lib

FFF_MODES = ("conditional", "dense")
# The small pretrained model that ships inside the package (see its README.md), so that
# the tools work offline.
DEMO_MODEL = Path(__file__).resolve().parent / "demo_model"
DEMO = "demo"  # its name in load() and in every tool's --model (a local folder "demo": ./demo)


def model_location(path_or_hub_id):
    """The demo model's folder for the name "demo"; anything else as given (a folder or a
    Hub id, which ufb_ref.checkpoint resolves)."""
    return DEMO_MODEL if str(path_or_hub_id) == DEMO else path_or_hub_id


class ScaledSinusoidal(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.scale_factor = mx.array([args.hidden_size ** -0.5], dtype=mx.float32)
        # Underscore: a constant, not a parameter (the checkpoint does not store it).
        self._pe = mx.array(sinusoidal_table(args.max_seq_length, args.hidden_size))

    def __call__(self, seq_len: int):
        return self.scale_factor * self._pe[:seq_len]


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm (the same parameters), computed by the extension's primitive on the
    "cpu" backend: MLX's CPU layer_norm costs ~4.6 ns an element, ~7x the primitive's."""

    def __init__(self, args: ModelArgs, backend: str = "auto"):
        super().__init__(args.hidden_size, eps=args.norm_eps)
        self.backend = backend

    def __call__(self, x):
        if backend_lib.resolve(self.backend) == "cpu":
            return cpu_kernels.layer_norm(x, self.weight, self.bias, self.eps).astype(x.dtype)
        return super().__call__(x)


class Embedding(nn.Module):
    """LayerNorm(word_embedding[ids] + scale * pe[:S])."""

    def __init__(self, args: ModelArgs, backend: str = "auto"):
        super().__init__()
        self.word_embedding = nn.Embedding(args.vocab_size, args.hidden_size)
        self.pos_embedding = ScaledSinusoidal(args)
        self.norm = LayerNorm(args, backend)
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
    additive (1 - mask) * -10000 key mask (B, S), heads concatenated, then dense. On the
    "cpu" backend one fused primitive reads the per-head layout in place."""

    def __init__(self, args: ModelArgs, backend: str = "auto"):
        super().__init__()
        self.self_attention = SelfAttentionProj(args)
        self.dense = nn.Linear(args.hidden_size, args.hidden_size, bias=False)
        self.num_heads, self.head_size, self.backend = args.num_heads, args.head_size, backend

    def __call__(self, x, key_mask):
        B, S, H = x.shape
        qkv = self.self_attention.query_key_value(x)
        scale = self.head_size ** -0.5
        if backend_lib.resolve(self.backend) == "cpu":
            return self.dense(cpu_kernels.attention(qkv, key_mask, self.num_heads, scale).astype(x.dtype))
        qkv = qkv.reshape(B, S, self.num_heads, 3, self.head_size).transpose(3, 0, 2, 1, 4)  # (3, B, heads, S, dh)
        ctx = mx.fast.scaled_dot_product_attention(
            qkv[0], qkv[1], qkv[2], scale=scale, mask=key_mask[:, None, None, :])
        return self.dense(ctx.transpose(0, 2, 1, 3).reshape(B, S, H))


class FFF(nn.Module):
    """Fast feedforward: P trees of depth D (``linear_in`` rows k*n .. k*n+n-1 are tree k).
    ``mode`` "conditional" visits D+1 neurons per token and tree; "dense" is the original
    masked computation of all of them."""

    def __init__(self, args: ModelArgs, mode: str = "conditional", backend: str = "auto"):
        super().__init__()
        self.linear_in = nn.Linear(args.hidden_size, args.intermed_width, bias=True)
        self.linear_out = nn.Linear(args.intermed_width, args.hidden_size, bias=False)
        self.trees, self.depth, self.mode, self.backend = args.fff_trees, args.fff_depth, mode, backend

    def routing(self, x):
        """Within-tree node ids visited per level, (..., P, D+1)."""
        paths, _ = fff_lib.descend(x, self.linear_in.weight, self.linear_in.bias, self.trees, self.depth)
        return paths

    def __call__(self, x):
        w = (self.linear_in.weight, self.linear_in.bias, self.linear_out.weight, self.trees, self.depth)
        if self.mode == "dense":
            return fff_lib.fff_dense(x, *w, backend=self.backend)
        return fff_lib.fff_conditional(x, *w, backend=self.backend)


class FFN(nn.Module):
    """Dense feedforward twin (``intermed_type`` "ffn"): gelu(x W_in^T + b) W_out^T."""

    def __init__(self, args: ModelArgs, backend: str = "auto"):
        super().__init__()
        self.linear_in = nn.Linear(args.hidden_size, args.intermed_width, bias=True)
        self.linear_out = nn.Linear(args.intermed_width, args.hidden_size, bias=False)
        self.backend = backend

    def __call__(self, x):
        return self.linear_out(fff_lib.fast_gelu(self.linear_in(x), self.backend))


class TransformerLayer(nn.Module):
    def __init__(self, args: ModelArgs, fff_mode: str, backend: str = "auto"):
        super().__init__()
        self.norm1 = LayerNorm(args, backend)
        self.attn = Attention(args, backend)
        self.norm2 = LayerNorm(args, backend)
        self.ffn = FFF(args, fff_mode, backend) if args.intermed_type == "fff" else FFN(args, backend)
        self.dropout = nn.Dropout(0.0)

    def __call__(self, x, key_mask, paths=None):
        x = x + self.dropout(self.attn(self.norm1(x), key_mask))
        h = self.norm2(x)
        if paths is not None and isinstance(self.ffn, FFF):
            paths.append(self.ffn.routing(h))
        return x + self.dropout(self.ffn(h))


class Encoder(nn.Module):
    def __init__(self, args: ModelArgs, fff_mode: str, backend: str = "auto"):
        super().__init__()
        self.embedding = Embedding(args, backend)
        self.layers = [TransformerLayer(args, fff_mode, backend) for _ in range(args.num_layers)]
        self.final_norm = LayerNorm(args, backend)

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
    logits (B, num_labels)."""

    def __init__(self, args: ModelArgs, fff_mode: str = "conditional", backend: str = "auto"):
        super().__init__()
        if fff_mode not in FFF_MODES:
            raise UFBError(f"fff_mode must be one of {FFF_MODES}, got {fff_mode!r}")
        self.args = args
        self.encoder = Encoder(args, fff_mode, backend_lib.check(backend))
        if args.task == "classification":
            self.pooler = Pooler(args)
            self.head = nn.Linear(args.head_dim, args.num_labels)

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


def check_inputs(input_ids, attention_mask, args: ModelArgs):
    """Accepts NumPy or MLX integer arrays, (B, S) or (S,); returns MLX arrays. Host data
    is checked in full by the reference's ``check_inputs`` (vocabulary range included);
    an MLX array only for dtype and shape, since its values would need a device sync (the
    embedding makes an unknown id's token NaN instead of reading out of bounds)."""
    if not isinstance(input_ids, mx.array):
        ids, mask = ref_check_inputs(input_ids, attention_mask, args)
        return mx.array(ids), mx.array(mask)
    ids = input_ids[None] if input_ids.ndim == 1 else input_ids
    if ids.ndim != 2 or not mx.issubdtype(ids.dtype, mx.integer):
        raise UFBError(f"input_ids must be an integer array (batch, seq), got {ids.dtype} {tuple(ids.shape)}")
    if ids.shape[1] > args.max_seq_length:
        raise UFBError(f"sequence length {ids.shape[1]} exceeds max_seq_length {args.max_seq_length}")
    if attention_mask is None:
        mask = mx.ones(ids.shape, dtype=mx.int32)
    else:
        mask = attention_mask if isinstance(attention_mask, mx.array) else mx.array(np.asarray(attention_mask))
        mask = mask.reshape(ids.shape)
    return ids, mask


# ---------------------------------------------------------------------------------------
# Losses: the one definition per task, used by training, evaluation and the golden tests.

IGNORE_INDEX = -100  # the label of a position that is not predicted (torch's convention)
REDUCTIONS = ("mean", "sum", "none")


def example_losses(logits, targets, regression: bool = False):
    """The loss of each row, in float32: cross-entropy of (N, C) logits against class ids,
    or, for a one-output regressor, the squared error against the targets."""
    logits = logits.astype(mx.float32)
    if regression:
        return mx.square(logits[:, 0] - targets)
    return nn.losses.cross_entropy(logits, targets, reduction="none")


def reduce_losses(per, reduction: str, weights=None):
    """"none": the per-row losses (times ``weights``); "sum": their sum; "mean": their
    mean (weighted by ``weights``)."""
    if reduction not in REDUCTIONS:
        raise UFBError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if weights is not None:
        per = per * weights
    if reduction == "none":
        return per
    if reduction == "sum":
        return per.sum()
    return per.sum() / weights.sum() if weights is not None else per.mean()


def masked_lm_logits(model: Model, input_ids, attention_mask, labels):
    """(float32 MLM logits at every labelled position (label != IGNORE_INDEX), in
    row-major order, and those labels). The decoder runs on those positions only."""
    labels_np = np.asarray(labels).reshape(-1)
    positions = np.flatnonzero(labels_np != IGNORE_INDEX)
    return mlm_logits_at(model, input_ids, attention_mask, mx.array(positions)), mx.array(labels_np[positions])


def mlm_logits_at(model: Model, input_ids, attention_mask, positions):
    """float32 MLM logits at ``positions``, flat indices into the (B, S) tokens."""
    hidden = model.encode(input_ids, attention_mask)
    h = hidden.reshape(-1, hidden.shape[-1])[positions]
    return model.mlm_logits(h).astype(mx.float32)


def mlm_loss(model: Model, input_ids, attention_mask, labels, reduction: str = "mean"):
    """Cross-entropy of the MLM head over every labelled position (label != -100).
    "mean" is the original's loss (it keeps round(0.25 * B * S) positions; the two agree
    whenever at most that many are labelled). A sum over no labelled position is 0."""
    if reduction == "mean" and not (np.asarray(labels) != IGNORE_INDEX).any():
        raise UFBError("mlm_loss: no labelled positions")
    return reduce_losses(example_losses(*masked_lm_logits(model, input_ids, attention_mask, labels)), reduction)


def mlm_loss_at(model: Model, input_ids, attention_mask, positions, targets, weights, reduction: str = "sum"):
    """``mlm_loss`` with the labelled positions given (``ufb_mlx.data.label_positions``):
    flat ``positions``, their ``targets`` and ``weights`` (0 for padding). A batch's
    positions are padded to a fixed count, so a compiled training step sees one shape;
    training sums over a process's slice and divides by the global count."""
    per = example_losses(mlm_logits_at(model, input_ids, attention_mask, positions), targets)
    return reduce_losses(per, reduction, weights)


def classification_loss(model: Model, input_ids, attention_mask, labels, reduction: str = "mean", weights=None):
    """Cross-entropy of the classifier, or the squared error of a regressor
    (``problem_type`` "regression"), per example; ``weights`` scale each example's loss
    (0 drops a padding row)."""
    logits = model(input_ids, attention_mask)
    targets = labels if isinstance(labels, mx.array) else mx.array(np.asarray(labels))
    per = example_losses(logits, targets, regression=model.args.problem_type == "regression")
    return reduce_losses(per, reduction, weights)


def column_major(w):
    """The same (H, P*n) values, laid out as the transpose of a row-major (P*n, H) buffer:
    the conditional FFF reads rows of w^T, which then cost no copy (see fff.py)."""
    return mx.contiguous(w.T).T


def load(path_or_hub_id, fff_mode: str = "conditional", dtype=None, backend: str = "auto",
         allow_nonfinite: bool = False):
    """(Model, Tokenizer) from a converted folder, a Hub-layout folder, a Hub repo id or
    "demo" (the small model shipped in the package). Weights with NaN or Inf are refused,
    naming the tensor, unless ``allow_nonfinite``.
    ``backend`` picks the conditional FFF's implementation (ufb_mlx.backend: "auto",
    "ops", "cpu", "metal"); an explicit one that is not present here is refused now.
    ``dtype`` (e.g. mx.float16) casts the weights. Default: as stored when the model runs
    on a GPU; on the CPU half-precision weights are widened to float32, because MLX's CPU
    backend has no BLAS path for half-precision matmuls (they run ~50x slower)."""
    if fff_mode not in FFF_MODES:
        raise UFBError(f"fff_mode must be one of {FFF_MODES}, got {fff_mode!r}")
    backend_lib.resolve(backend)
    ckpt = load_checkpoint(model_location(path_or_hub_id), allow_nonfinite=allow_nonfinite)
    args = ckpt.args
    model = Model(args, fff_mode, backend)
    # The same rule as the FFF's backend choice: the device of the current stream.
    on_gpu = mx.default_device().type == mx.DeviceType.gpu
    stored = {"BF16": mx.bfloat16, "F16": mx.float16} if on_gpu else {}
    arrays = {k: mx.array(v).astype(dtype or stored.get(ckpt.dtypes[k], mx.float32))
              for k, v in ckpt.weights.items()}
    if args.intermed_type == "fff":
        arrays = {k: column_major(v) if k.endswith("ffn.linear_out.weight") else v for k, v in arrays.items()}
    model.load_weights(list(arrays.items()), strict=True)
    model.eval()
    mx.eval(model.parameters())
    return model, ckpt.tokenizer


def save_safetensors(path, arrays: dict, metadata: dict | None = None) -> None:
    """``mx.save_safetensors``, flushed to disk and read back: MLX reports no failed write
    (a full disk), the header and the file size tell."""
    mx.save_safetensors(str(path), arrays, metadata=metadata or {})
    fsio.fsync(path)
    SafetensorsFile(path)


def save_model(folder, model_or_weights, args: ModelArgs, tokenizer_folder=None, dtype=None) -> Path:
    """Write the model folder that ``load`` reads: config.json (the flat ModelArgs),
    model.safetensors (the parameters, cast to ``dtype`` if given) and the tokenizer files
    copied from ``tokenizer_folder``. Each file is replaced atomically (ufb_ref.fsio), so a
    reader never sees a half-written one. The one writer of model folders (convert,
    fine-tuning, pretraining)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if tokenizer_folder is not None and Path(tokenizer_folder).resolve() != folder.resolve():
        for name in TOKENIZER_FILES:
            src = Path(tokenizer_folder) / name
            if src.is_file():
                fsio.atomic_write_bytes(folder / name, src.read_bytes())
    fsio.atomic_write_text(folder / CONFIG_FILE, json.dumps(args.to_dict(), indent=2) + "\n")
    weights = (dict(tree_flatten(model_or_weights.parameters())) if isinstance(model_or_weights, nn.Module)
               else {k: v if isinstance(v, mx.array) else mx.array(v) for k, v in model_or_weights.items()})
    if dtype is not None:
        weights = {k: v.astype(dtype) for k, v in weights.items()}
    with fsio.atomic_file(folder / WEIGHTS_FILE) as tmp:
        save_safetensors(tmp, weights, {"format": "mlx"})
    return folder
