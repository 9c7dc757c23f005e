"""Fill-mask with UltraFastBERT: ``python -m ufb_mlx.generate --model <folder or hub id>
--prompt "The capital of France is [MASK]."``

For each mask of a prompt, in order of position, it prints the top-k candidate tokens with
their probabilities and the token chosen, then the prompt as written with its masks
filled in. Several masks are
filled one at a time, most confident first (``--strategy iterative``: re-encode, predict
the remaining masks, fill the one whose best candidate is most probable, repeat), or all at
once from a single pass (``--strategy parallel``). The decoder runs only on the hidden
states of the (remaining) mask positions, never on the whole sequence.

The library function :func:`fill_mask` does the work; the CLI is a thin argparse layer.

JSON output (``--json``), one object on stdout::

    {"model": str, "fff_mode": "conditional"|"dense", "strategy": "iterative"|"parallel",
     "top_k": int, "temperature": float, "seed": int|null,
     "results": [                                   # one per prompt, in input order
       {"prompt": str,                              # the prompt as given
        "tokens": int,                              # its length in tokens (with <sep>)
        "masks": [                                  # one per mask, in order of position
          {"position": int,                         # token index in the encoded prompt
           "span": [int, int],                      # its characters in the prompt: start, end
           "step": int,                             # fill step, 1-based as in the text output
                                                    #   (iterative order; always 1 for parallel)
           "candidates": [{"token": str, "token_id": int, "prob": float}, ...],
                                                    # top-k, prob descending
           "chosen": {"token": str, "token_id": int, "prob": float}}],
        "completed": str}],                         # the prompt as written, each mask's span
                                                    #   replaced by its chosen token
     "stats": {"prompt_tokens": int,                # sum of the prompts' lengths
               "encoded_tokens": int,               # tokens run through the encoder, all
                                                    #   passes (iterative: one per mask step)
               "forward_passes": int,               # encoder calls
               "seconds": float,                    # wall time of the fill (not the load)
               "tokens_per_s": float,               # encoded_tokens / seconds
               "peak_memory_mb": float}}            # mx.get_peak_memory(), weights included

Special tokens (``<mask>``, ``<pad>``, ``<sep>``, ``<unk>``, ...) are neither candidates nor
fills unless ``--allow-special``. ``prob`` is always the model's own probability (softmax of the logits, temperature 1),
also when ``--temperature`` > 0 samples the chosen token from softmax(logits / T); the most
confident mask is likewise judged by the model's probabilities.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from ufb_ref.errors import ArgumentParser, UFBError, command_name
from ufb_ref.tokenizer import pad_batch

from .entry import console
from .loading import DEMO, load
from .progress import Progress
from .jsonable import clean_tree

STRATEGIES = ("iterative", "parallel")


# ---------------------------------------------------------------------------------------
# Library


def encode_prompts(tokenizer, prompts, labels=None) -> list[list[int]]:
    """Token ids of each prompt; a UFBError (naming the prompt by ``labels[i]``) for an
    empty or over-long prompt or one without a mask."""
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise UFBError("no prompts to fill")
    if labels is None:
        labels = [f"prompt {i + 1}" for i in range(len(prompts))] if len(prompts) > 1 else [None] * len(prompts)
    encoded = []
    for text, label in zip(prompts, labels):
        where = f"{label}: " if label else ""
        try:
            ids = tokenizer.encode(text)
        except UFBError as e:
            raise UFBError(f"{where}{e}") from None
        if tokenizer.mask_token_id not in ids:
            short = text if len(text) <= 60 else text[:57] + "..."
            raise UFBError(f"{where}no mask in the prompt (write [MASK] or <mask> where a token "
                           f"should be filled in): {short!r}")
        encoded.append(ids)
    return encoded


def fill_mask(model, tokenizer, prompts, top_k: int = 5, strategy: str = "iterative",
              temperature: float = 0.0, seed: int | None = None, batch_size: int = 16,
              allow_special: bool = False, stats: dict | None = None, on_batch=None) -> list[dict]:
    """Fill every mask of each prompt. Returns one dict per prompt (see the module
    docstring for the structure): ``{"prompt", "tokens", "masks", "completed"}``.

    ``temperature`` 0 takes the most probable token; > 0 samples from
    softmax(logits / temperature) with a generator seeded from (``seed``, prompt index),
    so a prompt's result does not depend on the batching. The tokenizer's special tokens
    (``<mask>``, ``<pad>``, ``<sep>``, ``<unk>``, ...) are never candidates nor chosen
    unless ``allow_special``; probabilities stay the model's softmax over the whole
    vocabulary (not renormalised). Prompts are run ``batch_size``
    at a time (right-padded; padded keys are masked out of attention). When ``stats`` is a
    dict, the counters prompt_tokens, encoded_tokens and forward_passes are added to it.
    ``on_batch(n)`` is told of every ``n`` prompts done (progress).
    """
    if strategy not in STRATEGIES:
        raise UFBError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise UFBError(f"top_k must be a positive integer, got {top_k!r}")
    if not np.isfinite(temperature) or temperature < 0:
        raise UFBError(f"temperature must be >= 0, got {temperature!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
        raise UFBError(f"seed must be a non-negative integer, got {seed!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise UFBError(f"batch_size must be a positive integer, got {batch_size!r}")
    if getattr(model.args, "task", "mlm") != "mlm":
        raise UFBError(f"fill-mask needs a masked-LM model; this one is a {model.args.task} model")
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    encoded = encode_prompts(tokenizer, prompts)
    counters = {"prompt_tokens": 0, "encoded_tokens": 0, "forward_passes": 0}
    banned = [] if allow_special else sorted(set(tokenizer.special_ids.values()))
    if model.args.vocab_size - len(banned) < 1:
        raise UFBError("the vocabulary has no token that is not a special token")
    top_k = int(min(top_k, model.args.vocab_size - len(banned)))
    results = []
    for start in range(0, len(prompts), batch_size):
        chunk = encoded[start:start + batch_size]
        rngs = [_rng(seed, start + i) if temperature > 0 else None for i in range(len(chunk))]
        filled, masks = _fill_batch(model, tokenizer, chunk, rngs, top_k, strategy, temperature,
                                    banned, counters)
        for i, ids in enumerate(chunk):
            prompt = prompts[start + i]
            offsets = tokenizer.offsets(prompt)
            records = [dict(masks[i][p], span=list(offsets[p])) for p in sorted(masks[i])]
            results.append({"prompt": prompt, "tokens": len(ids), "masks": records,
                            "completed": complete(prompt, records)})
        if on_batch is not None:
            on_batch(len(chunk))
    counters["prompt_tokens"] = sum(len(ids) for ids in encoded)
    if stats is not None:
        for k, v in counters.items():
            stats[k] = stats.get(k, 0) + v
    return results


def complete(prompt: str, masks: list[dict]) -> str:
    """The prompt exactly as written, with each mask's character span replaced by its
    chosen token (a word piece's "##" dropped, so that it joins what it continues)."""
    out, end = [], 0
    for m in sorted(masks, key=lambda m: m["span"][0]):
        start, stop = m["span"]
        token = m["chosen"]["token"]
        out += [prompt[end:start], token[2:] if token.startswith("##") else token]
        end = stop
    return "".join(out) + prompt[end:]


def _rng(seed, index):
    return np.random.default_rng(None if seed is None else [int(seed), int(index)])


def _fill_batch(model, tokenizer, encoded, rngs, top_k, strategy, temperature, banned, counters):
    """Fill a batch of encoded prompts; returns (filled ids per prompt, {position: mask
    record} per prompt)."""
    batch = pad_batch(encoded, tokenizer.pad_token_id)
    ids, attn = batch["input_ids"], batch["attention_mask"]
    lengths = [len(e) for e in encoded]
    mask_id = tokenizer.mask_token_id
    remaining = [[p for p, t in enumerate(e) if t == mask_id] for e in encoded]
    records = [dict() for _ in encoded]
    step = 1
    while any(remaining):
        rows = [r for r in range(len(encoded)) if remaining[r]]
        width = max(lengths[r] for r in rows)  # drop padding no active row needs
        hidden = model.encode(ids[rows, :width], attn[rows, :width])
        counters["forward_passes"] += 1
        counters["encoded_tokens"] += sum(lengths[r] for r in rows)
        # The decoder runs on the hidden rows of the remaining masks only.
        flat = [i * width + p for i, r in enumerate(rows) for p in remaining[r]]
        h = hidden.reshape(-1, hidden.shape[-1])[mx.array(flat, dtype=mx.int32)]
        logits = model.mlm_logits(h).astype(mx.float32)
        probs = mx.softmax(logits, axis=-1, precise=True)
        probs_np, logits_np = np.array(probs), np.array(logits)
        # Ranking and sampling skip the banned (special) tokens; reported probabilities
        # stay the model's own.
        ranked = probs_np.copy()
        ranked[:, banned] = -1.0
        logits_np[:, banned] = -np.inf
        offset = 0
        for r in rows:
            n = len(remaining[r])
            p_rows, l_rows = probs_np[offset:offset + n], logits_np[offset:offset + n]
            k_rows = ranked[offset:offset + n]
            offset += n
            if strategy == "parallel":
                order = range(n)                        # all at once, in position order
            else:
                order = [int(np.argmax(k_rows.max(axis=1)))]  # most confident; ties: leftmost
            for j in order:
                pos = remaining[r][j]
                chosen = _choose(k_rows[j], l_rows[j], temperature, rngs[r])
                ids[r, pos] = chosen
                records[r][pos] = {
                    "position": pos,
                    "step": step,  # 1-based, as in the text output
                    "candidates": _top_k(tokenizer, p_rows[j], k_rows[j], top_k),
                    "chosen": _entry(tokenizer, chosen, p_rows[j][chosen]),
                }
            filled = {remaining[r][j] for j in order}
            remaining[r] = [p for p in remaining[r] if p not in filled]
        step += 1
    return [ids[r, :lengths[r]].tolist() for r in range(len(encoded))], records


def _choose(ranked, logits, temperature, rng) -> int:
    if not np.isfinite(ranked).all():
        raise UFBError("the model's probabilities are not finite (NaN): its weights or inputs are broken")
    if temperature <= 0:
        return int(np.argmax(ranked))
    # The maximum is subtracted before dividing: a tiny temperature then sends the others
    # to -inf (probability 0) instead of every logit to +-inf (NaN).
    z = (logits.astype(np.float64) - logits.max()) / temperature
    p = np.exp(z)
    return int(rng.choice(len(p), p=p / p.sum()))


def _top_k(tokenizer, probs, ranked, k):
    idx = np.argpartition(-ranked, k - 1)[:k] if k < len(ranked) else np.arange(len(ranked))
    idx = idx[np.lexsort((idx, -ranked[idx]))]          # prob descending, then id
    return [_entry(tokenizer, i, probs[i]) for i in idx]


def _entry(tokenizer, token_id, prob):
    return {"token": tokenizer.id_to_token(int(token_id)), "token_id": int(token_id), "prob": float(prob)}


def peak_memory_mb() -> float:
    get = getattr(mx, "get_peak_memory", None) or mx.metal.get_peak_memory
    return get() / 2**20


# ---------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog=command_name("ufb_mlx.generate"),
        description="Fill the masks ([MASK] or <mask>) of prompts with an UltraFastBERT masked-LM model.",
        epilog='example: python -m ufb_mlx.generate --model tests/data/golden/ufb-tiny-1x3 '
               '--prompt "The capital of France is [MASK]."')
    p.add_argument("--model", default=DEMO,
                   help="model folder (converted or Hub layout), Hub repo id, or 'demo': the small "
                        "model shipped in the package (default)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append",
                     help="text with one or more masks; '-' reads one prompt from stdin (repeatable)")
    src.add_argument("--prompts-file", metavar="F",
                     help="one prompt a line (blank lines skipped), run in batches; '-' reads stdin")
    p.add_argument("--top-k", type=int, default=5, help="candidates shown per mask (default 5)")
    p.add_argument("--strategy", choices=STRATEGIES, default="iterative",
                   help="iterative: fill the most confident mask, re-encode, repeat (default); "
                        "parallel: fill all masks from one pass")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0: take the most probable token (default); > 0: sample from softmax(logits / T)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling (reproducible output)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per forward pass (default 16)")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="load a model whose weights hold NaN or Inf (refused by default, naming the tensor)")
    p.add_argument("--fff-mode", choices=("conditional", "dense"), default="conditional",
                   help="conditional: visited FFF neurons only (default); dense: the original masked computation")
    p.add_argument("--allow-special", action="store_true",
                   help="let special tokens (<mask>, <pad>, <sep>, <unk>, ...) be candidates and fills")
    p.add_argument("--json", action="store_true", help="print one JSON object (results and stats) on stdout")
    return p


def read_prompts(args) -> tuple[list[str], list[str | None]]:
    """(prompts, labels naming each in error messages)."""
    if args.prompts_file is not None:
        if args.prompts_file == "-":
            text, name = read_stdin(), "stdin"
        else:
            path = Path(args.prompts_file)
            if not path.is_file():
                raise UFBError(f"prompts file '{path}' not found" if not path.exists()
                               else f"prompts file '{path}' is not a file")
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise UFBError(f"prompts file '{path}' is not UTF-8 text ({e.reason} at byte {e.start})") from None
            except OSError as e:
                raise UFBError(f"cannot read prompts file '{path}': {e.strerror}") from None
            name = str(path)
        lines = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
        if not lines:
            raise UFBError(f"prompts file '{name}' has no prompts (it is empty or blank)")
        return [t for _, t in lines], [f"{name} line {n}" for n, _ in lines]
    prompts = []
    if args.prompt.count("-") > 1:
        raise UFBError("--prompt - (stdin) can be given once")
    for text in args.prompt:
        prompts.append(read_stdin().strip() if text == "-" else text)
    labels = [f"prompt {i + 1}" for i in range(len(prompts))] if len(prompts) > 1 else [None]
    return prompts, labels


def read_stdin() -> str:
    """Standard input as UTF-8 text; anything else is a one-line error naming the line."""
    if sys.stdin is None:  # started with stdin closed (`<&-`)
        raise UFBError("stdin is closed: '-' reads the prompts from standard input")
    try:
        data = sys.stdin.buffer.read()
    except OSError as e:
        raise UFBError(f"cannot read stdin: {e.strerror or e}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise UFBError(f"stdin line {line}: not valid UTF-8 text ({e.reason} at byte {e.start})") from None


def format_text(results) -> str:
    out = []
    for res in results:
        out.append(f"prompt: {res['prompt']}")
        for n, m in enumerate(res["masks"], 1):
            out.append(f"  mask {n} (token {m['position']}, characters {m['span'][0]}-{m['span'][1]}, "
                       f"filled at step {m['step']}):")
            chosen = m["chosen"]["token_id"]
            width = max(len(c["token"]) for c in m["candidates"])
            for c in m["candidates"]:
                mark = "  <- chosen" if c["token_id"] == chosen else ""
                out.append(f"    {c['token']:<{width}}  {c['prob']:.4f}{mark}")
            if chosen not in [c["token_id"] for c in m["candidates"]]:
                out.append(f"    chosen (sampled): {m['chosen']['token']}  {m['chosen']['prob']:.4f}")
        out.append(f"completed: {res['completed']}")
        out.append("")
    return "\n".join(out[:-1])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    prompts, labels = read_prompts(args)
    model, tokenizer = load(args.model, fff_mode=args.fff_mode, allow_nonfinite=args.allow_nonfinite)
    encode_prompts(tokenizer, prompts, labels)  # every bad prompt fails before any work
    stats: dict = {}
    t0 = time.perf_counter()
    with Progress(len(prompts), "fill-mask", "prompt") as progress:  # stderr: a bar, or a line every 10 s
        results = fill_mask(model, tokenizer, prompts, top_k=args.top_k, strategy=args.strategy,
                            temperature=args.temperature, seed=args.seed, batch_size=args.batch_size,
                            allow_special=args.allow_special, stats=stats, on_batch=progress.update)
    seconds = time.perf_counter() - t0
    stats.update(seconds=seconds, tokens_per_s=stats["encoded_tokens"] / max(seconds, 1e-9),
                 peak_memory_mb=peak_memory_mb())
    if args.json:
        # Strict JSON: a non-finite number (never expected) is written as null, not NaN.
        print(json.dumps(clean_tree({"model": str(args.model), "fff_mode": args.fff_mode,
                                     "strategy": args.strategy, "top_k": args.top_k,
                                     "temperature": args.temperature, "seed": args.seed,
                                     "results": results, "stats": stats}), indent=2, allow_nan=False))
    else:
        print(format_text(results))
        print(f"prompt tokens: {stats['prompt_tokens']}, encoded tokens: {stats['encoded_tokens']} "
              f"in {stats['forward_passes']} pass(es), {seconds:.3f} s, {stats['tokens_per_s']:.1f} tokens/s, "
              f"peak memory: {stats['peak_memory_mb']:.1f} MB", file=sys.stderr)
    return 0


cli = console(main)  # the console script (pyproject.toml)

if __name__ == "__main__":
    cli()
