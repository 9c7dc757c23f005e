"""Cross-backend correctness check, to run on your own machine:
``python -m ufb_mlx.check [--model PATH_OR_ID] [--configs N] [--seed S] [--json]``.

Every implementation of the conditional FFF present here is compared with the NumPy
float64 reference (ufb_ref): "ops" (MLX operations), "cpu" (the fused C++ primitive,
when built) and "metal" (the kernels of metal/: on the GPU where MLX has Metal, else run
by the CPU emulator of ufb_mlx.metal_emu, which the report says):
- the model (default: the demo model shipped in ufb_mlx/demo_model), loaded in float32
  with that backend, on a few sentences: its logits, and the path of every token
  through every FFF layer;
- each FFF layer of that model, on the activations the float64 reference feeds it: the
  layer's output and its gradients (x, w_in, b_in, w_out) for a random cotangent;
- random FFF configurations: one as wide as the released model (768, depth 11), one
  with two simdgroups per token (width 2048) and more tokens than one chunk of the
  row-gradient kernel, the rest drawn at random; output and gradients.

A routing decision whose float64 logit is within TIE_EPS of 0 may go either way in
float32: such tokens are left out of the layer comparisons (their cotangent zeroed), and
a sequence whose path differs only at such decisions is left out of the logits
comparison; the report counts both. The tolerances are the test suite's and are defined
here (tests/test_golden.py and tests/test_fff_properties.py import them).

Prints a table of each backend's worst errors against their tolerances, pass/fail and
time (``--json``: one JSON object). Exit status 0 when every check passes, 1 when one
fails, 2 on bad input (one line on stderr).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from dataclasses import asdict, dataclass, field

import mlx.core as mx
import numpy as np

import ufb_ref
from ufb_ref import fff as ref_fff
from ufb_ref.errors import ArgumentParser, UFBError, command_name
from ufb_ref.model import classify, mlm_logits
from ufb_ref.tokenizer import Tokenizer, pad_batch

from . import backend as backend_lib
from .entry import console
from .fff import fff_conditional
from .loading import DEMO_MODEL

# ---- tolerances (shared with the test suite) ---------------------------------------------

# Hidden states and logits of a float32 implementation against float64 or golden data:
# 1e-5 absolute on values of order 1. A correct float32 implementation lands near 2e-6 on
# hidden states of magnitude 3.5 (summation order only); the tanh approximation of GELU
# near 3e-5, so 1e-5 tells the two apart. The check scales it past magnitude 1 (float32
# rounding is relative): ATOL * max(1, max |reference|), the same bound on the golden
# logits (below 0.7 in magnitude); the demo model's reach 14.
ATOL = 1e-5
# Gradients against golden data: relative to each gradient's max-abs entry (observed
# below 1e-6).
GRAD_RTOL = 1e-5
# One FFF layer against float64: float32 accumulation error (~1e-6 relative) plus one
# rounding to the output dtype, |y - ref| <= (1 + max |ref|) * (FFF_RTOL + 2 * UNIT);
# gradients (in float32) FFF_RTOL * (1 + max |ref|), far below one misplaced
# contribution (~1).
FFF_RTOL = 1e-5
UNIT = {"float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}
# |z| below which a float32 routing decision may legitimately differ from the float64
# one: the conditional paths accumulate in float32 from inputs that are exact in float32,
# so 1e-4 covers their summation error with a wide margin.
TIE_EPS = 1e-4


def fff_forward_tolerance(reference: np.ndarray, dtype: str = "float32") -> float:
    return (1 + float(np.abs(reference).max(initial=0))) * (FFF_RTOL + 2 * UNIT[dtype])


def fff_grad_tolerance(reference: np.ndarray) -> float:
    return FFF_RTOL * (1 + float(np.abs(reference).max(initial=0)))


def logits_tolerance(reference: np.ndarray) -> float:
    return ATOL * max(1.0, float(np.abs(reference).max(initial=0)))


def near_ties(x, w_in, b_in, trees: int, depth: int, eps: float = TIE_EPS) -> np.ndarray:
    """(tokens,) bool: tokens (x flattened to (-1, H)) with a float64 routing decision
    within eps of 0. Exact zeros are not ties: z == 0 goes left everywhere."""
    _, z = ref_fff.descend(x, w_in, b_in, trees, depth)
    z = z.reshape(-1, trees * (depth + 1))
    return ((np.abs(z) < eps) & (z != 0)).any(-1)


# ---- what is checked ------------------------------------------------------------------

SENTENCES = [
    "The President shall deliver a message to the [MASK] on the state of the union.",
    "In the beginning God created the heaven and the [MASK].",
    "Call me Ishmael. Some years ago I went to [MASK].",
    "The function returns a [MASK] containing the result.",
    "Use the SELECT statement to query rows from a [MASK].",
    "It is a truth universally acknowledged, that a single man in possession of a good "
    "fortune, must be in want of a [MASK].",
    "Paris is the capital of [MASK].",
    "She sells sea shells by the sea [MASK].",
]


@dataclass
class Problem:
    """One FFF layer problem in float64 (values exactly representable in float32)."""

    name: str
    trees: int
    depth: int
    x: np.ndarray        # (T, H)
    w_in: np.ndarray     # (P*n, H)
    b_in: np.ndarray     # (P*n,)
    w_out: np.ndarray    # (H, P*n), as in the checkpoint
    dy: np.ndarray       # (T, H) cotangent

    @property
    def shape(self) -> str:
        return f"{self.trees}x{self.depth} H={self.x.shape[1]} T={self.x.shape[0]}"


def _f32(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float32).astype(np.float64)


def problem_shapes(count: int, seed: int) -> list[tuple[int, int, int, int]]:
    """(trees, depth, hidden, tokens) of ``random_problems(count, seed)``, without their arrays."""
    return _draw_shapes(np.random.default_rng(seed), count)


def _draw_shapes(rng, count: int) -> list[tuple[int, int, int, int]]:
    return list(_iter_shapes(rng, count))


def _iter_shapes(rng, count: int):
    from .metal_kernels import ROW_CHUNK

    fixed = [(1, 11, 768, 64), (2, 4, 2048, ROW_CHUNK + 44)][:count]
    yield from fixed
    for _ in range(count - len(fixed)):
        yield (int(rng.integers(1, 4)), int(rng.integers(0, 9)), int(rng.integers(1, 161)), int(rng.integers(1, 65)))


def check_problem_memory(count: int, seed: int) -> None:
    """The configurations are built up front: refuse a count whose float64 arrays (x, dy,
    both weights, bias) cannot fit in this machine's memory, before building any."""
    from .train import memory_limit

    have = memory_limit()
    if not have:
        return
    need = 0
    for i, (p, d, h, t) in enumerate(_iter_shapes(np.random.default_rng(seed), count), 1):  # stops when too much
        need += 8 * (2 * t * h + 2 * ref_fff.n_nodes(d) * p * h + ref_fff.n_nodes(d) * p)
        if need > have // 2:
            raise UFBError(f"--configs {count}: the first {i} configurations alone need {need / 2**30:.1f} GiB, more "
                           f"than half of the {have / 2**30:.1f} GiB this process may use; check fewer (or several "
                           "seeds, one at a time)")


def random_problems(count: int, seed: int) -> list[Problem]:
    """``count`` configurations: the two fixed ones of the module docstring, then random
    (trees 1-3, depth 0-8, width 1-160, 1-64 tokens)."""
    rng = np.random.default_rng(seed)
    shapes = _draw_shapes(rng, count)
    problems = []
    for trees, depth, hidden, tokens in shapes:
        n = ref_fff.n_nodes(depth) * trees
        problems.append(Problem(
            f"random {trees}x{depth} H={hidden} T={tokens}", trees, depth,
            x=_f32(rng.standard_normal((tokens, hidden))),
            w_in=_f32(rng.standard_normal((n, hidden)) / np.sqrt(hidden)),
            b_in=_f32(0.1 * rng.standard_normal(n)),
            w_out=_f32(rng.standard_normal((hidden, n)) / np.sqrt(depth + 1)),
            dy=_f32(rng.standard_normal((tokens, hidden)))))
    return problems


@dataclass
class Model64:
    """The float64 reference on the check's sentences."""

    args: object
    ids: np.ndarray
    mask: np.ndarray
    logits: np.ndarray
    paths: list            # per FFF layer (B, S, P, D+1)
    z: list                # per FFF layer, the logits of those decisions
    layers: list[Problem]  # each FFF layer on its float64 input


def reference_model(model: str, seed: int) -> Model64:
    ref, tok = ufb_ref.load(model, dtype=np.float64)
    args = ref.args
    if args.intermed_type != "fff":
        raise UFBError(f"model '{model}' has dense feedforward layers (intermed_type "
                       f"{args.intermed_type!r}): there is no conditional FFF to check")
    # cut to the model's length, keeping the closing <sep>
    limit = args.max_seq_length
    seqs = [s if len(s) <= limit else s[:limit - 1] + s[-1:]
            for s in map(Tokenizer(tok.path).encode, SENTENCES)]
    batch = pad_batch(seqs, tok.pad_token_id)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    inputs: list = []
    hidden = ref.encode(ids, mask, fff_inputs=inputs)
    logits = classify(ref.weights, hidden) if args.task == "classification" else mlm_logits(ref.weights, hidden)
    rng = np.random.default_rng(seed)
    paths, zs, layers = [], [], []
    for i, h in enumerate(inputs):
        p = f"encoder.layers.{i}.ffn."
        w_in, b_in = ref.weights[p + "linear_in.weight"], ref.weights[p + "linear_in.bias"]
        path, z = ref_fff.descend(h, w_in, b_in, args.fff_trees, args.fff_depth)
        paths.append(path)
        zs.append(z)
        x = _f32(h.reshape(-1, h.shape[-1]))
        layers.append(Problem(f"layer {i}", args.fff_trees, args.fff_depth, x, _f32(w_in), _f32(b_in),
                              _f32(ref.weights[p + "linear_out.weight"]),
                              dy=_f32(rng.standard_normal(x.shape))))
    return Model64(args, ids, mask, logits, paths, zs, layers)


@dataclass
class Result:
    check: str
    error: float          # worst error (where error / tolerance is worst)
    tolerance: float
    ok: bool
    detail: str = ""


@dataclass
class BackendReport:
    backend: str
    runs_on: str
    emulated: bool = False
    seconds: float = 0.0
    results: list[Result] = field(default_factory=list)
    error: str | None = None   # a backend that raised instead of computing

    @property
    def ok(self) -> bool:
        return self.error is None and all(r.ok for r in self.results)


def _worst(pairs) -> tuple[float, float]:
    """(error, tolerance) of the worst error/tolerance ratio among pairs."""
    return max(pairs, key=lambda p: p[0] / p[1]) if pairs else (0.0, 1.0)


def run_layer(backend: str, prob: Problem):
    """The backend's output and gradients (x, w_in, b_in, w_out) of one FFF problem,
    float32, as NumPy; tokens near a routing tie get a zero cotangent."""
    keep = ~near_ties(prob.x, prob.w_in, prob.b_in, prob.trees, prob.depth)
    dy = prob.dy * keep[:, None]
    args = [mx.array(a.astype(np.float32)) for a in (prob.x, prob.w_in, prob.b_in, prob.w_out)]

    def f(*a):
        return fff_conditional(*a, prob.trees, prob.depth, backend=backend)

    (y,), grads = mx.vjp(f, args, [mx.array(dy.astype(np.float32))])
    mx.eval(y, grads)
    return keep, dy, np.array(y), [np.array(g) for g in grads]


def compare_layers(backend: str, problems: list[Problem], what: str) -> list[Result]:
    fwd, grad, excused = [], [], 0
    for prob in problems:
        keep, dy, y, grads = run_layer(backend, prob)
        excused += int((~keep).sum())
        want = ref_fff.fff_descent(prob.x, prob.w_in, prob.b_in, prob.w_out, prob.trees, prob.depth)
        if keep.any():
            fwd.append((float(np.abs(y - want)[keep].max()), fff_forward_tolerance(want)))
        refs = ref_fff.fff_descent_vjp(prob.x, prob.w_in, prob.b_in, prob.w_out, prob.trees, prob.depth, dy)
        for name, g, r in zip(("x", "w_in", "b_in", "w_out"), grads, refs):
            err = np.abs(g - r)
            # the tokens near a tie keep their own input gradient (their dy is zeroed, not x)
            grad.append((float((err[keep] if name == "x" else err).max(initial=0)), fff_grad_tolerance(r)))
    note = f"{len(problems)} {what}" + (f"; {excused} tokens near a routing tie left out" if excused else "")
    return [Result(f"{what}: output", *_worst(fwd), ok=all(e <= t for e, t in fwd), detail=note),
            Result(f"{what}: gradients", *_worst(grad), ok=all(e <= t for e, t in grad), detail=note)]


def compare_model(backend: str, model: str, ref: Model64) -> list[Result]:
    """Logits and routing paths of the MLX model (float32, this backend) against float64."""
    import ufb_mlx

    m, _ = ufb_mlx.load(model, dtype=mx.float32, backend=backend)
    paths: list = []
    m.encode(ref.ids, ref.mask, paths)
    logits = np.array(m(ref.ids, attention_mask=ref.mask).astype(mx.float32))
    # Per sequence: does its routing differ anywhere, and only at near-tie decisions?
    differs = np.zeros(len(ref.ids), bool)
    only_ties = np.ones(len(ref.ids), bool)
    decisions = 0
    for got, want, z in zip(paths, ref.paths, ref.z):
        got = np.array(got)
        diff = got != want                                        # (B, S, P, L)
        decisions += want.size - want.shape[0] * want.shape[1] * want.shape[2]  # root not decided
        bad = diff.any(-1)
        first = np.argmax(diff, axis=-1)                          # first level that differs
        decided_at = np.take_along_axis(np.abs(z), np.maximum(first - 1, 0)[..., None], -1)[..., 0]
        tie = decided_at < TIE_EPS
        differs |= bad.any((1, 2))
        only_ties &= ~(bad & ~tie).any((1, 2))
    routing_ok = bool(only_ties.all())
    compared = ~differs
    tol = logits_tolerance(ref.logits)
    err = float(np.abs(logits - ref.logits)[compared].max(initial=0))
    n_diff, n_seq = int(differs.sum()), len(ref.ids)
    if not n_diff:
        how = f"every token routes as in float64 ({decisions} decisions)"
    elif routing_ok:
        how = (f"{n_diff} of {n_seq} sequences route differently, only at decisions within "
               f"{TIE_EPS} of 0 (left out of the logits comparison)")
    else:
        how = f"{n_diff} of {n_seq} sequences route differently at a decision away from 0"
    routing = Result("model: routing paths", float(n_diff), 0.0, ok=routing_ok, detail=how)
    logit = Result("model: logits", err, tol, ok=bool(err <= tol and compared.any()),
                   detail=f"{int(compared.sum())} of {n_seq} sequences compared")
    return [logit, routing]


def runs_on(name: str) -> tuple[str, bool]:
    """(where the backend runs here, whether it is emulated)."""
    if name == "metal":
        from .metal_emu import metal_runner

        if metal_runner() == "gpu":
            return "Metal GPU", False
        return "CPU emulator of the Metal kernels (no GPU here; times are not GPU times)", True
    if name == "cpu":
        return "CPU, C++ extension", False
    return f"MLX ops on {mx.default_device()}", False


def available_backends() -> tuple[list[str], dict[str, str]]:
    """(backends to check, {backend: why it is not checked})."""
    from .metal_emu import metal_runner, unavailable_reason

    names, skipped = ["ops"], {}
    if backend_lib.cpu_available():
        names.append("cpu")
    else:
        skipped["cpu"] = backend_lib.cpu_unavailable_reason()
    if metal_runner() == "gpu":
        reason = backend_lib.metal_unavailable_reason()
    else:
        reason = unavailable_reason()
    if reason is None:
        names.append("metal")
    else:
        skipped["metal"] = reason
    return names, skipped


def check(model: str | None = None, configs: int = 4, seed: int = 0, progress=None) -> dict:
    """Run every check on every backend present; returns the report (see main)."""
    from .metal_emu import metal_kernels

    model = str(model or DEMO_MODEL)
    say = progress or (lambda msg: None)
    say(f"float64 reference on {model} ...")
    ref = reference_model(model, seed)
    problems = random_problems(configs, seed)
    names, skipped = available_backends()
    reports = []
    for name in names:
        where, emulated = runs_on(name)
        rep = BackendReport(name, where, emulated)
        say(f"{name} ({where}) ...")
        t0 = time.perf_counter()
        try:
            with metal_kernels() if name == "metal" else contextlib.nullcontext():
                rep.results += compare_model(name, model, ref)
                rep.results += compare_layers(name, ref.layers, "model FFF layers")
                if problems:
                    rep.results += compare_layers(name, problems, "random FFF configurations")
        except UFBError:
            raise
        except Exception as e:  # a backend that crashes is a failed check, reported in one line
            rep.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        rep.seconds = time.perf_counter() - t0
        reports.append(rep)
    args = ref.args
    return {
        "mlx": mx.__version__,
        "device": backend_lib.describe(),
        "model": {"path": model, "layers": args.num_layers, "hidden": args.hidden_size,
                  "fff": f"{args.fff_trees}x{args.fff_depth}", "sequences": len(SENTENCES),
                  "tokens": int(ref.ids.size)},
        "configs": [p.shape for p in problems],
        "seed": seed,
        "backends": [dict(asdict(r), ok=r.ok) for r in reports],
        "skipped": skipped,
        "ok": all(r.ok for r in reports),
    }


def format_report(doc: dict) -> str:
    m = doc["model"]
    dev = doc["device"]
    out = [f"ufb_mlx.check: mlx {doc['mlx']} on {dev['platform']}, default device "
           f"{dev['default_device']}, auto picks {dev['auto']!r}",
           backend_lib.present_line(dev)]
    if dev["platform_problem"]:
        out.append(f"platform: {dev['platform_problem']}; the Metal kernels run on a Mac's GPU "
                   "only (here at most through the CPU emulator)")
    out += [f"model {m['path']}: {m['layers']} layers, H={m['hidden']}, FFF {m['fff']}; "
            f"{m['sequences']} sentences ({m['tokens']} token slots)",
            f"random FFF configurations (seed {doc['seed']}): {', '.join(doc['configs']) or 'none'}", ""]
    rows = [("backend", "check", "max error", "tolerance", "result")]
    for b in doc["backends"]:
        if b["error"]:
            rows.append((b["backend"], "(raised)", "", "", "FAIL"))
        for r in b["results"]:
            tol = "exact" if r["check"].endswith("paths") else f"{r['tolerance']:.2e}"
            err = f"{int(r['error'])} seq" if r["check"].endswith("paths") else f"{r['error']:.2e}"
            rows.append((b["backend"], r["check"], err, tol, "pass" if r["ok"] else "FAIL"))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    for row in rows:
        out.append("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip())
    out.append("")
    for b in doc["backends"]:
        out.append(f"{b['backend']:<5}  {'PASS' if b['ok'] else 'FAIL'}  {b['seconds']:7.2f} s  runs on: {b['runs_on']}")
        if b["error"]:
            out.append(f"       raised {b['error']}")
        for r in b["results"]:
            if r["detail"] and (not r["ok"] or r["check"].startswith("model: routing")):
                out.append(f"       {r['check']}: {r['detail']}")
    for name, why in doc["skipped"].items():
        out.append(f"{name:<5}  not checked: {why}")
    out.append("")
    out.append("all checks passed" if doc["ok"] else "SOME CHECKS FAILED")
    return "\n".join(out)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog=command_name("ufb_mlx.check"),
        description="Compare every conditional-FFF backend present here (MLX ops, CPU extension, "
                    "Metal kernels) with the float64 NumPy reference: model logits, routing paths, "
                    "FFF outputs and gradients.",
        epilog="exit status: 0 all checks pass, 1 a check failed, 2 bad input")
    p.add_argument("--model", default=None,
                   help="converted or Hub-layout model folder, or a Hub repo id "
                        "(default: the demo model shipped in ufb_mlx/demo_model)")
    p.add_argument("--configs", type=int, default=4,
                   help="random FFF configurations to check besides the model (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random configurations and cotangents")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.configs < 0:
        raise UFBError(f"--configs must be 0 or more, got {args.configs}")
    if args.seed < 0:
        raise UFBError(f"--seed must be 0 or more, got {args.seed}")
    check_problem_memory(args.configs, args.seed)
    doc = check(args.model, args.configs, args.seed,
                progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(json.dumps(doc, indent=2) if args.json else format_report(doc))
    return 0 if doc["ok"] else 1


cli = console(main)  # the console script (pyproject.toml)

if __name__ == "__main__":
    cli()
