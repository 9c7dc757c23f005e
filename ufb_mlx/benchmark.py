"""Benchmarks: conditional FFF against the original masked-dense FFF and dense feedforwards.

    python -m ufb_mlx.benchmark layer [--tokens 1,128,8192] [--compile] [--backward]
    python -m ufb_mlx.benchmark model [--batch 1,8] [--seq 128] [--model PATH] [--hf-python PY]
    python -m ufb_mlx.benchmark train [--batch 16] [--seq 128] [--task classification|mlm]
    common: [--reps N] [--warmup N] [--budget S] [--tiny] [--json] [--plot out.png]

Every command prints the environment (device, MLX, which BLAS MLX uses and its measured
1024^3 matmul GFLOP/s, which FFF implementations are present), a table of median times per
arm, the speedups against the baselines, and (``--plot``) a log-log PNG of speedup against
tokens per batch. ``--json`` writes one JSON document to stdout (tables and progress then
go to stderr).

Arms are named by the implementation they run: ``fff_ops`` (MLX operations), ``fff_cpu``
(the fused C++ primitive of csrc/), ``fff_metal`` (the Metal kernels), each present only
where it can run; the layer's dense baselines are the strongest this machine has (BLAS
sgemms with the same fast GELU), and ``sgemm2`` is the bare two matmuls, a lower bound for
any dense layer of that width. The model benchmark runs the whole model on one backend
(``--backend``, default: what ``load()`` would pick) and, when a Python with torch and
transformers is given (``--hf-python``, default this one), Hugging Face's BertForMaskedLM
(bert-base, random weights) in a separate process, interleaved with the other arms.

The timing harness (``measure``) is separate from the arms: warm-up per arm, then
``reps`` rounds in which every arm runs once (interleaved, rotating the order) so that
drift on a shared machine hits all arms alike; ``mx.eval`` closes every call, so lazy
evaluation is timed in full. Reported times are medians.

On Linux a dense baseline is only fair with an optimised BLAS (docs/DESIGN.md section 4): unless
OpenBLAS is loaded, bound (checked in /proc/self/maps and by a matmul's GFLOP/s), ratios
against dense baselines are marked NOT FAIR.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from . import blas  # noqa: F401  (ufb_mlx/__init__ has loaded OpenBLAS before mlx)

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from ufb_ref.config import ModelArgs  # noqa: E402
from ufb_ref.errors import ArgumentParser, UFBError, command_name  # noqa: E402

from . import backend as backend_lib  # noqa: E402
from . import fff as fff_lib  # noqa: E402
from .entry import console  # noqa: E402
from .losses import classification_loss, mlm_loss  # noqa: E402
from .model import Model  # noqa: E402
from .progress import Progress  # noqa: E402

SCHEMA_VERSION = 1
MATMUL_N = 1024
# A 1024^3 matmul: ~6 GFLOP/s on the mlx wheel's reference BLAS, ~90 with OpenBLAS on two
# cores (less on a busy machine). Below this, MLX is not bound to an optimised BLAS (or the machine is swamped).
MIN_BLAS_GFLOPS = 12.0

DEFAULT_SEQ = 128

NO_MATPLOTLIB = "--plot needs matplotlib: pip install 'ultrafastbert-mlx[plot]' (or pip install matplotlib)"

RELEASED = dict(hidden_size=768, num_layers=16, num_heads=12, vocab_size=32768,
                max_seq_length=128, fff_trees=1, fff_depth=11)
TINY = dict(hidden_size=64, num_layers=2, num_heads=4, vocab_size=512,
            max_seq_length=32, fff_trees=1, fff_depth=3)


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def phase(desc: str, calls: int) -> Progress:
    """The progress of one size's calls on stderr: a bar with the rate and the time left on
    a terminal, else a line every 10 seconds (the total grows once measure() knows it)."""
    return Progress(calls, desc, "call", file=sys.stderr)


# --------------------------------------------------------------------------- harness


@dataclass
class Arm:
    """One thing to time. ``fn()`` returns what must be evaluated (any MLX tree, or a NumPy
    result when ``numpy``). ``dense_blas``: its cost is dense matmuls in MLX's BLAS, so it
    is a fair baseline only on an optimised BLAS."""

    name: str
    fn: Callable[[], Any]
    desc: str = ""
    dense_blas: bool = False
    numpy: bool = False
    # Timed in another process: ``fn()`` runs one call there and returns its seconds.
    remote: bool = False


def call(arm: Arm):
    """Run one call to completion: MLX's lazy graph is evaluated inside the timed region."""
    out = arm.fn()
    if not (arm.numpy or arm.remote):
        mx.eval(out)
    return out


def time_call(arm: Arm) -> float:
    if arm.remote:
        return arm.fn()
    t0 = time.perf_counter()
    call(arm)
    return time.perf_counter() - t0


def measure(arms: list[Arm], reps: int | None = None, warmup: int = 2, budget_s: float = 10.0,
            min_reps: int = 3, max_reps: int = 50, timer: Callable[[Arm], float] = time_call,
            blocks: bool = False, progress: Progress | None = None) -> tuple[dict[str, list[float]], int]:
    """Seconds per call for every arm: ``warmup`` untimed calls per arm, then ``reps`` rounds
    of one timed call per arm, interleaved (the order rotates each round). ``reps=None``
    picks as many rounds as fit in ``budget_s`` (from the last warm-up round), clamped to
    [min_reps, max_reps]. ``blocks`` (``--schedule blocks``): 3 rounds instead, each timing
    a third of the calls of an arm consecutively: each arm then runs warm, after itself, as
    a layer called again and again does, while the rounds still spread drift over the arms.
    ``progress`` counts every call (warm-up and timed), outside the timed region; its
    total grows by the calls to come, once they are known.
    Returns (times per arm name, calls timed per arm)."""
    def tick():
        if progress is not None:
            progress.update(1)

    def expect(calls: int):
        if progress is not None:
            progress.set_total(progress.n + calls)

    last = {}
    n_warm = max(warmup, 1 if reps is None else 0)
    expect(len(arms) * (n_warm + (reps or 0)))
    for arm in arms:
        for _ in range(n_warm):
            last[arm.name] = timer(arm)
            tick()
    if reps is None:
        round_s = max(sum(last.values()), 1e-6)
        reps = int(min(max_reps, max(min_reps, math.ceil(budget_s / round_s))))
        expect(len(arms) * reps)
    block = -(-reps // 3) if blocks else 1
    rounds = -(-reps // block)
    times: dict[str, list[float]] = {a.name: [] for a in arms}
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()  # no collector pauses inside a timed call
    try:
        for r in range(rounds):
            k = r % len(arms)
            for arm in arms[k:] + arms[:k]:
                for _ in range(min(block, reps - r * block)):
                    times[arm.name].append(timer(arm))
                    tick()
    finally:
        if gc_was_enabled:
            gc.enable()
    return times, reps


def arm_stats(ts: list[float]) -> dict:
    ms = sorted(t * 1e3 for t in ts)
    q = statistics.quantiles(ms, n=4) if len(ms) >= 2 else [ms[0]] * 3
    return {"median_ms": statistics.median(ms), "min_ms": ms[0], "max_ms": ms[-1],
            "q1_ms": q[0], "q3_ms": q[2], "reps": len(ms), "times_ms": [round(t, 4) for t in ms]}


# ----------------------------------------------------------------------- environment


def _openblas_mapped() -> list[str]:
    """System OpenBLAS libraries mapped into this process (NumPy's own bundled
    libscipy_openblas does not count: it is not what MLX calls)."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "/" in line}
    except OSError:
        return []
    return sorted(p for p in paths if os.path.basename(p).startswith("libopenblas"))


def matmul_gflops(n: int = MATMUL_N, reps: int = 3) -> float:
    """Best-of-reps GFLOP/s of an (n, n) @ (n, n) float32 matmul on the default device."""
    a = mx.random.normal((n, n), key=mx.random.key(1))
    b = mx.random.normal((n, n), key=mx.random.key(2))
    mx.eval(a, b)
    mx.eval(a @ b)
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        mx.eval(a @ b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    dev = mx.default_device()
    gpu = dev.type == mx.gpu
    metal = bool(mx.metal.is_available())
    backend = f"MLX {mx.__version__} " + ("GPU (Metal)" if gpu and metal else "GPU" if gpu else "CPU")
    mapped = _openblas_mapped()
    gflops = matmul_gflops()
    if gpu:
        fair, reason = True, "dense matmuls run on the GPU"
    elif sys.platform != "linux":
        fair, reason = True, f"{blas.status}"
    elif not blas.status.startswith("OpenBLAS"):
        fair, reason = False, f"MLX uses {blas.status}"
    elif not mapped:
        fair, reason = False, "OpenBLAS was reported loaded but is not mapped in this process"
    elif gflops < MIN_BLAS_GFLOPS:
        fair, reason = False, (f"OpenBLAS is loaded but a {MATMUL_N}^3 matmul runs at {gflops:.1f} GFLOP/s "
                               f"(< {MIN_BLAS_GFLOPS:.0f}): MLX is not bound to it, or the machine is swamped")
    else:
        fair, reason = True, f"OpenBLAS bound: {MATMUL_N}^3 matmul at {gflops:.0f} GFLOP/s"
    try:
        load = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        load = None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "mlx_version": mx.__version__,
        "numpy_version": np.__version__,
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
        "device": "gpu" if gpu else "cpu",
        "device_name": ("Apple GPU" if metal else "GPU") if gpu else _cpu_model(),
        "metal": metal,
        "backend": backend,
        "cpu_count": os.cpu_count(),
        "load_average": load,
        "blas": blas.status,
        "openblas_mapped": mapped,
        "matmul_n": MATMUL_N,
        "matmul_gflops": round(gflops, 2),
        "dense_fair": fair,
        "dense_fair_reason": reason,
        "fff_backends": backend_lib.describe(),
    }


# ------------------------------------------------------------------------ reporting


def ratio(results: dict, arm: str, baseline: str, dense_blas: bool, fair_env: bool) -> dict:
    r = results[baseline]["median_ms"] / results[arm]["median_ms"]
    return {"arm": arm, "baseline": baseline, "ratio": r, "fair": fair_env or not dense_blas}


def group(label: str, params: dict, tokens: int, arms: list[Arm], times: dict, reps: int) -> dict:
    return {"label": label, "params": params, "tokens_per_batch": tokens, "reps": reps,
            "arms": {a.name: dict(arm_stats(times[a.name]), desc=a.desc, dense_blas=a.dense_blas,
                                  us_per_token=1e3 * statistics.median(times[a.name]) * 1e3 / tokens)
                     for a in arms},
            "ratios": []}


def _fmt_ms(v: float) -> str:
    return f"{v:.3f}" if v < 10 else f"{v:.1f}" if v < 1000 else f"{v:.0f}"


def render(doc: dict) -> str:
    env = doc["env"]
    fb = env["fff_backends"]
    out = [f"UltraFastBERT-MLX benchmark: {doc['benchmark']}   ({env['date']})",
           f"device : {env['device']} ({env['device_name']}, {env['cpu_count']} CPUs, "
           f"load average {env['load_average']})   backend: {env['backend']}",
           f"BLAS   : {env['blas']}; {env['matmul_n']}^3 matmul {env['matmul_gflops']:.1f} GFLOP/s"
           + (f"; mapped: {', '.join(env['openblas_mapped'])}" if env["openblas_mapped"] else ""),
           f"FFF    : 'auto' runs {fb['auto']}; {backend_lib.present_line(fb)}"]
    cfg = doc["config"]
    out.append("config : " + ", ".join(f"{k}={v}" for k, v in cfg.items() if v is not None))
    if not env["dense_fair"]:
        bar = "!" * 88
        out += [bar, f"!! WARNING: dense baselines are NOT FAIR: {env['dense_fair_reason']}.",
                "!! Ratios against dense baselines are marked '!'.",
                "!! Fix: apt-get install libopenblas0-pthread, unset UFB_NO_OPENBLAS, import ufb_mlx before mlx.",
                bar]
    for g in doc["results"]:
        out.append("")
        schedule = "in 3 blocks" if cfg.get("schedule") == "blocks" else "interleaved"
        out.append(f"== {g['label']}  (median of {g['reps']} reps, {schedule}, ms)")
        w = max(len(n) for n in g["arms"])
        out.append(f"  {'arm':<{w}}  {'median':>9}  {'min':>9}  {'q1-q3':>19}  {'us/token':>9}  what")
        for name, a in g["arms"].items():
            spread = f"{_fmt_ms(a['q1_ms'])}-{_fmt_ms(a['q3_ms'])}"
            out.append(f"  {name:<{w}}  {_fmt_ms(a['median_ms']):>9}  {_fmt_ms(a['min_ms']):>9}  {spread:>19}  "
                       f"{a['us_per_token']:>9.3f}  {a['desc']}")
        if g["ratios"]:
            w2 = max(len(f"{r['arm']} vs {r['baseline']}") for r in g["ratios"])
            out.append(f"  {'speedup (baseline median / arm median)':<{w2}}")
            for r in g["ratios"]:
                name = f"{r['arm']} vs {r['baseline']}"
                out.append(f"  {name:<{w2}}  {r['ratio']:>9.2f}x" + ("" if r["fair"] else " ! (not fair)"))
    mem = doc.get("memory")
    if mem:
        out += ["", f"== memory: fill-mask peak (batch {mem['batch']}, seq {mem['seq']}, fresh state) "
                f"{mem['peak_bytes'] / 2**20:.1f} MiB, weights {mem['weights_bytes'] / 2**20:.1f} MiB: "
                f"ratio {mem['ratio']:.3f}"]
    for n in doc.get("notes", []):
        out.append(f"note: {n}")
    if not env["dense_fair"]:
        out.append("!! dense ratios above are NOT FAIR (reference BLAS): see the warning at the top")
    return "\n".join(out)


def check_plot_path(path: str) -> None:
    """A --plot path that matplotlib can write (its suffix names a format it knows) in a
    folder that exists: checked before the benchmark runs, not after."""
    from matplotlib.figure import Figure

    suffix = Path(path).suffix.lstrip(".").lower()
    formats = Figure().canvas.get_supported_filetypes()
    if suffix not in formats:
        raise UFBError(f"--plot '{path}': the suffix must name an image format ({', '.join(sorted(formats))})")
    folder = Path(path).parent
    if not folder.is_dir():
        raise UFBError(f"--plot '{path}': folder '{folder}' does not exist")


def plot(doc: dict, path: str) -> None:
    try:
        import matplotlib
    except ImportError:
        raise UFBError(NO_MATPLOTLIB) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[tuple, list] = {}
    for g in doc["results"]:
        for r in g["ratios"]:
            series.setdefault((r["arm"], r["baseline"], r["fair"]), []).append((g["tokens_per_batch"], r["ratio"]))
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for i, ((arm, base, fair), pts) in enumerate(series.items()):
        pts.sort()
        label = f"{arm} vs {base}" + ("" if fair else " (NOT FAIR: reference BLAS)")
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=f"C{i % 10}",
                linestyle="-" if fair else ":", label=label)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("tokens per batch")
    ax.set_ylabel("speedup (baseline time / arm time)")
    env = doc["env"]
    ax.set_title(f"ufb_mlx.benchmark {doc['benchmark']}: {env['backend']}, {env['device_name']}\n"
                 f"{env['blas']}", fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------------------- arms


def _normal(shape, seed, scale=1.0):
    return mx.random.normal(shape, key=mx.random.key(seed)) * scale


def _dense_ffn(x, w1, b1, w2):
    """The strongest dense feedforward here: two BLAS sgemms and the fast exact GELU (the
    extension's vectorised one where it is built), gelu(x W1^T + b1) W2^T."""
    return fff_lib.fast_gelu(mx.addmm(b1, x, w1.T)) @ w2.T


def _sgemm2(x, w1, b1, w2):
    """The bare two matmuls of a dense layer of that width: a lower bound for any of them."""
    return (x @ w1.T) @ w2.T


def fff_backends() -> list[str]:
    """The conditional FFF implementations that can run here, each timed as its own arm."""
    out = ["ops"]
    for name in ("cpu", "metal"):
        try:
            backend_lib.resolve(name)
        except UFBError:
            continue
        out.append(name)
    return out


def check_layer_sizes(tokens: list[int], H: int, widest: int, memory: int | None) -> None:
    """Refuse, before allocating anything, a token count whose arrays cannot exist: MLX's
    element count per array (int32), or more memory than the machine has (estimated:
    x, y and dy (T, H) in float32 and float64 for the NumPy arm, the dense arms' (T, width)
    activations and their gradients)."""
    for T in tokens:
        if T * max(H, widest) >= 2**31:
            raise UFBError(f"--tokens {T}: a ({T}, {max(H, widest)}) array has more than 2^31 - 1 elements")
        need = T * (4 * 3 * H + 8 * 3 * H + 4 * 4 * widest)
        if memory and need > memory:
            raise UFBError(f"--tokens {T} needs about {need / 2**30:.1f} GiB, more than the "
                           f"{memory / 2**30:.1f} GiB this process may use; give fewer tokens")


def layer_sizes(tiny: bool) -> tuple[int, int, int]:
    """(hidden, trees, depth) of the layer benchmark: the released layer, or a tiny one."""
    return (64, 1, 3) if tiny else (768, 1, 11)


def bench_layer(opts, env) -> dict:
    H, P, D = layer_sizes(opts.tiny)
    n = fff_lib.n_nodes(D)
    width, width_ffn = P * n, 4 * H
    w_in = _normal((width, H), 1, H**-0.5)
    b_in = _normal((width,), 2, 0.1)
    # linear_out.weight (H, P*n) as load() lays it out: the transposed view of a row-major
    # (P*n, H) buffer, so the conditional FFF reads its rows without a copy.
    w_out_t = _normal((width, H), 3, width**-0.5)
    w_out = w_out_t.T
    w1 = _normal((width_ffn, H), 4, H**-0.5)
    b1 = _normal((width_ffn,), 5, 0.1)
    w2 = _normal((H, width_ffn), 6, width_ffn**-0.5)
    mx.eval(w_in, b_in, w_out_t, w1, b1, w2)
    np_w = [np.array(a) for a in (w_in, b_in, w_out)]
    from ufb_ref.fff import fff_descent, fff_descent_vjp

    def maybe_compile(f):
        return mx.compile(f) if opts.compile else f

    cotangents: dict[int, mx.array] = {}  # dy per token count, drawn once: MLX's CPU
    # random normals cost ~70 ns each, which would otherwise be timed inside every arm

    def cotangent(T: int) -> mx.array:
        if T not in cotangents:
            cotangents[T] = _normal((T, H), 7)
            mx.eval(cotangents[T])
        return cotangents[T]

    def with_backward(f):
        """--backward: forward + backward, the gradients of sum(y * dy) w.r.t. every input."""
        if not opts.backward:
            return f
        return lambda x, a, b, c: mx.vjp(f, [x, a, b, c], [cotangent(x.shape[0])])[1]

    def conditional(impl):
        return maybe_compile(with_backward(lambda x, a, b, c: fff_lib.fff_conditional(x, a, b, c, P, D, backend=impl)))

    impls = fff_backends()
    conds = {impl: conditional(impl) for impl in impls}
    masked = maybe_compile(with_backward(lambda x, a, b, c: fff_lib.fff_dense(x, a, b, c, P, D)))
    dense = maybe_compile(with_backward(_dense_ffn))
    sgemm2 = maybe_compile(with_backward(_sgemm2))

    def numpy_ref(x_np):
        if opts.backward:
            return fff_descent_vjp(x_np, *np_w, P, D, np.array(cotangent(x_np.shape[0])))
        return fff_descent(x_np, *np_w, P, D)

    missing = [b for b in ("cpu", "metal") if b not in impls]
    fb = env["fff_backends"]
    notes = [f"fff_{b} arm absent: {fb.get(f'{b}_reason') or 'not available here'}" for b in missing]
    what = "forward + backward" if opts.backward else "forward"
    doc = {"results": [], "notes": notes}
    for T in opts.tokens:
        x = _normal((T, H), 100 + T)
        x_np = np.array(x)
        arms = [Arm(f"fff_{impl}", lambda f=f: f(x, w_in, b_in, w_out),
                    f"conditional FFF, {D + 1} of {width} neurons per token: {DESCRIBE[impl]}")
                for impl, f in conds.items()]
        arms += [
            Arm("masked_dense", lambda: masked(x, w_in, b_in, w_out),
                f"the original: all {width} neurons, GELU, then the visited mask", dense_blas=True),
            Arm(f"dense_{width}", lambda: dense(x, w_in, b_in, w_out),
                f"dense feedforward of width {width}: 2 sgemms + fast GELU", dense_blas=True),
            Arm(f"sgemm2_{width}", lambda: sgemm2(x, w_in, b_in, w_out),
                f"the bare 2 sgemms of width {width} (no bias, no GELU)", dense_blas=True),
            Arm(f"dense_{width_ffn}", lambda: dense(x, w1, b1, w2),
                f"dense feedforward of width {width_ffn} (crammedBERT's)", dense_blas=True),
            Arm("numpy_ref", lambda: numpy_ref(x_np),
                "ufb_ref.fff (NumPy reference" + (", descent + its VJP)" if opts.backward else " descent)"),
                numpy=True),
        ]
        same = [(a.name, "masked_dense", a.name.startswith(("fff_", "numpy"))) for a in arms
                if a.name not in ("masked_dense", f"sgemm2_{width}")]
        log(f"[layer] tokens={T}: timing {len(arms)} arms ({what}) ...")
        with phase(f"[layer] tokens={T}", len(arms)) as progress:
            checks = _check_same(arms, same, f"tokens={T}", notes, progress)
            times, reps = measure(arms, opts.reps, max(opts.warmup - 1, 0), opts.budget,
                                  blocks=opts.schedule == "blocks", progress=progress)
        g = group(f"layer {what}, H={H}, {P}x{D} ({width} neurons), tokens={T}", {"tokens": T}, T, arms, times, reps)
        g["checks"] = checks
        for a in arms:
            if a.name.startswith("fff_"):
                for b in arms:
                    if not b.name.startswith("fff_"):
                        g["ratios"].append(ratio(g["arms"], a.name, b.name, b.dense_blas, env["dense_fair"]))
        doc["results"].append(g)
    doc["config"] = {"hidden": H, "trees": P, "depth": D, "tokens": opts.tokens, "reps": opts.reps or "auto",
                     "schedule": opts.schedule,
                     "backward": opts.backward, "warmup": opts.warmup, "compile": opts.compile, "tiny": opts.tiny,
                     "fff_arms": impls}
    return doc


DESCRIBE = {"ops": "MLX operations", "cpu": "fused C++ primitive (csrc/)", "metal": "fused Metal kernels (metal/)"}


def _check_same(arms: list[Arm], pairs: list[tuple[str, str, bool]], size, notes: list,
                progress: Progress | None = None) -> list[dict]:
    """Arms compared by a ratio must compute the same thing: same input, same output shape
    and, for pairs marked True (the same function: conditional vs masked-dense), the same
    values (rows whose routing differs by a float tie at z ~ 0 are tolerated up to 1 %).
    Runs every arm once: that call is the first warm-up call. Returns the value checks
    (the results' "checks": arm, baseline, the fraction of rows that differ, agree)."""
    # Backward arms return every gradient; the input gradient (the first) stands for them.
    outs = {}
    for a in arms:
        if not a.remote:
            out = call(a)
            outs[a.name] = np.asarray(out[0] if isinstance(out, (tuple, list)) else out)
        if progress is not None:
            progress.update(1)
    checks = []
    for a, b, values in pairs:
        if a not in outs or b not in outs:
            continue
        if outs[a].shape != outs[b].shape:
            raise UFBError(f"benchmark arms {a} and {b} disagree on the output shape: "
                           f"{outs[a].shape} != {outs[b].shape}")
        if not values:
            continue
        x, y = outs[a].reshape(-1, outs[a].shape[-1]), outs[b].reshape(-1, outs[b].shape[-1])
        tol = 1e-3 * (float(np.abs(y).max()) + 1e-6)
        bad = ~np.isclose(x, y, rtol=1e-3, atol=tol).all(-1)
        checks.append(_agreement(a, b, float(bad.mean()), "rows", size, notes))
    return checks


def _agreement(a: str, b: str, differ: float, of: str, size, notes: list) -> dict:
    if differ > 0.01:
        notes.append(f"{size}: {a} and {b} differ on {differ:.1%} of {of}")
    return {"arm": a, "baseline": b, "differ": differ, "of": of, "agree": differ <= 0.01}


def _check_same_step(models: list[tuple[str, Any]], loss_fn, batch: tuple, size, notes: list) -> list[dict]:
    """The train arms' models start from the same weights: one dropout-free loss and
    gradient of each must agree (elements of the flattened gradients and loss within 1e-3
    relative to the largest; up to 1 % may differ, as routing ties may move a row)."""
    outs = []
    for _, m in models:
        m.eval()
        loss, grads = nn.value_and_grad(m, loss_fn)(m, *batch)
        m.train()
        outs.append(np.concatenate([np.array(loss, dtype=np.float32).reshape(1)] +
                                   [np.array(g, dtype=np.float32).reshape(-1) for _, g in tree_flatten(grads)]))
    (a, x), (b, y) = [(name, o) for (name, _), o in zip(models, outs)]
    bad = ~np.isclose(x, y, rtol=1e-3, atol=1e-3 * (float(np.abs(y).max()) + 1e-6))
    return [_agreement(a, b, float(bad.mean()), "gradient elements", size, notes)]


def _model_args(opts, task="mlm") -> ModelArgs:
    kw = dict(TINY if opts.tiny else RELEASED)
    if task == "classification":
        kw.update(task="classification", num_labels=2, head_dim=1024 if not opts.tiny else 32)
    args = ModelArgs(**kw)
    args.validate()
    return args


def _as_loaded(model: Model) -> Model:
    """Random weights laid out as ``load()`` lays out a checkpoint's (its ``column_major``
    linear_out), so a random model costs what a loaded one costs."""
    from .model import column_major

    if model.args.intermed_type == "fff":
        for layer in model.encoder.layers:
            layer.ffn.linear_out.weight = column_major(layer.ffn.linear_out.weight)
    mx.eval(model.parameters())
    return model


def _inputs(args: ModelArgs, B: int, S: int, seed: int):
    rng = np.random.default_rng(seed)
    ids = mx.array(rng.integers(7, args.vocab_size, size=(B, S)).astype(np.int32))
    mask = mx.ones((B, S), dtype=mx.int32)
    pos = mx.array(rng.integers(1, S, size=(B,)).astype(np.int32))  # one <mask> per sequence
    return ids, mask, pos


def mask_logits(model: Model, ids, mask, pos):
    """Logits at one mask position per sequence only: (B, vocab)."""
    h = model.encode(ids, mask)
    rows = mx.take_along_axis(h, pos[:, None, None], axis=1)[:, 0]
    return model.mlm_logits(rows)


def _weights_bytes(model: Model) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def _peak_fill_mask(model: Model, args: ModelArgs, B: int, S: int) -> dict:
    """Peak MLX memory of one fill-mask call, measured first (nothing but the weights and
    the inputs alive), against the weights' bytes."""
    ids, mask, pos = _inputs(args, B, S, 7)
    mx.eval(ids, mask, pos)
    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()
    mx.eval(mask_logits(model, ids, mask, pos))
    peak = mx.get_peak_memory()
    wb = _weights_bytes(model)
    return {"batch": B, "seq": S, "weights_bytes": wb, "peak_bytes": peak, "ratio": peak / wb}


def _check_seq(opts, args: ModelArgs) -> int:
    S = opts.seq or (16 if opts.tiny else DEFAULT_SEQ)
    if S > args.max_seq_length:
        raise UFBError(f"--seq {S} exceeds the model's max_seq_length {args.max_seq_length}")
    from .train import check_batch_memory

    for B in opts.batch:  # before any array is made: MLX may crash on a failed allocation
        check_batch_memory(args, B * S, B * S if args.task == "mlm" else B, f"--batch {B} --seq {S}",
                           "lower --batch or --seq")
    return S


class HFWorker:
    """Hugging Face's BertForMaskedLM (bert-base, random weights) timed in a separate
    process (ufb_mlx/hf_bert_worker.py run by ``python``), one forward per request."""

    SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf_bert_worker.py")

    @staticmethod
    def unavailable(python: str) -> str | None:
        import subprocess

        try:
            p = subprocess.run([python, "-c", "import torch, transformers"], capture_output=True, text=True,
                               timeout=300)
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"cannot run {python}: {e}"
        if p.returncode != 0:
            last = (p.stderr.strip().splitlines() or ["import failed"])[-1]
            return f"{python} cannot import torch and transformers ({last}); pass --hf-python"
        return None

    def __init__(self, python: str):
        import subprocess

        self.proc = subprocess.Popen([python, self.SCRIPT], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, bufsize=1)

    def ask(self, **msg) -> dict:
        self.proc.stdin.write(json.dumps(msg) + "\n")
        line = self.proc.stdout.readline()
        if not line:
            raise UFBError("the Hugging Face benchmark worker exited unexpectedly")
        return json.loads(line)

    def close(self) -> None:
        try:
            self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        except (OSError, ValueError):
            self.proc.kill()


def bench_model(opts, env) -> dict:
    notes: list[str] = []
    doc: dict = {"results": [], "notes": notes}
    impl = backend_lib.resolve(opts.backend)
    if opts.model:
        from .loading import load

        cond_only, _ = load(opts.model, fff_mode="conditional", backend=opts.backend)
        args = cond_only.args
    else:
        args = _model_args(opts)
        cond_only = _as_loaded(Model(args, "conditional", opts.backend))
        cond_only.eval()
    S = _check_seq(opts, args)
    mlm = args.task == "mlm"
    if mlm:  # first, in a fresh state: only the conditional model's weights are alive
        doc["memory"] = _peak_fill_mask(cond_only, args, max(opts.batch), S)
    else:
        notes.append("classifier checkpoint: no fill-mask arms and no memory measurement")
    cond = cond_only
    dense = Model(args, "dense", opts.backend)
    dense.update(cond.parameters())
    dense.eval()
    mx.eval(dense.parameters())
    hf = None
    if opts.hf_python != "none" and mlm:
        log(f"[model] looking for torch and transformers in {opts.hf_python} (the Hugging Face arm) ...")
        reason = HFWorker.unavailable(opts.hf_python)
        if reason:
            notes.append(f"hf_bert_forward arm absent: {reason}")
        else:
            hf = HFWorker(opts.hf_python)
    try:
        for B in opts.batch:
            ids, mask, pos = _inputs(args, B, S, B)
            mx.eval(ids, mask, pos)
            what = "MLM logits (B, S, vocab)" if mlm else "classifier logits"
            c, d = f"conditional_forward_{impl}", f"dense_forward_{impl}"
            cf, df = f"conditional_fillmask_{impl}", f"dense_fillmask_{impl}"
            arms = [Arm(c, lambda: cond(ids, attention_mask=mask), f"full forward, {what}"),
                    Arm(d, lambda: dense(ids, attention_mask=mask),
                        f"full forward, masked-dense FFF, {what}", dense_blas=True)]
            if mlm:
                arms += [Arm(cf, lambda: mask_logits(cond, ids, mask, pos),
                             "encode + logits at 1 mask per sequence (B, vocab)"),
                         Arm(df, lambda: mask_logits(dense, ids, mask, pos),
                             "masked-dense encode + logits at the mask rows", dense_blas=True)]
            if hf is not None:
                log(f"[model] batch={B} seq={S}: setting up Hugging Face's bert-base (picks torch's thread count) ...")
                setup = hf.ask(cmd="setup", batch=B, seq=S)
                notes.append(f"batch={B}: hf_bert_forward uses torch {setup['torch']} with {setup['threads']} "
                             f"thread(s) (probe ms: " + ", ".join(f"{k} thread(s) {v:.0f}"
                                                                  for k, v in setup["probe_ms"].items()) + ")")
                arms.append(Arm("hf_bert_forward", lambda: hf.ask(cmd="run")["seconds"],
                                "Hugging Face BertForMaskedLM, bert-base, torch CPU, all logits (other process)",
                                dense_blas=True, remote=True))
            log(f"[model] batch={B} seq={S}: timing {len(arms)} arms ...")
            with phase(f"[model] batch={B}", len(arms)) as progress:
                checks = _check_same(arms, [(c, d, True)] + ([(cf, df, True)] if mlm else []), f"batch={B}", notes,
                                     progress)
                times, reps = measure(arms, opts.reps, max(opts.warmup - 1, 0), opts.budget, progress=progress)
            g = group(f"model ({args.num_layers} layers, H={args.hidden_size}, {args.fff_trees}x{args.fff_depth}, "
                      f"vocab {args.vocab_size}, backend {impl}) batch={B} seq={S}", {"batch": B, "seq": S},
                      B * S, arms, times, reps)
            g["checks"] = checks
            pairs = [(c, d)] + ([(cf, d), (cf, df)] if mlm else [])
            if hf is not None:
                pairs += [(c, "hf_bert_forward"), (cf, "hf_bert_forward")]
            for a, b in pairs:
                g["ratios"].append(ratio(g["arms"], a, b, True, env["dense_fair"]))
            doc["results"].append(g)
    finally:
        if hf is not None:
            hf.close()
    doc["config"] = {"model": opts.model or ("random tiny" if opts.tiny else "random, released configuration"),
                     "layers": args.num_layers, "hidden": args.hidden_size, "trees": args.fff_trees,
                     "depth": args.fff_depth, "vocab": args.vocab_size, "batch": opts.batch, "seq": S,
                     "backend": impl, "reps": opts.reps or "auto", "warmup": opts.warmup, "tiny": opts.tiny}
    return doc


def bench_train(opts, env) -> dict:
    task = opts.task
    impl = backend_lib.resolve(opts.backend)
    if opts.model:
        from .loading import load

        cond, _ = load(opts.model, fff_mode="conditional", backend=opts.backend)
        args = cond.args
        task = args.task
    else:
        args = _model_args(opts, task)
        cond = _as_loaded(Model(args, "conditional", opts.backend))
    S = _check_seq(opts, args)
    dense = Model(args, "dense", opts.backend)
    loss_fn = classification_loss if task == "classification" else mlm_loss
    doc: dict = {"results": [], "notes": []}
    for B in opts.batch:
        dense.update(cond.parameters())  # same starting weights; each arm then updates its own
        rng = np.random.default_rng(B)
        ids = mx.array(rng.integers(7, args.vocab_size, size=(B, S)).astype(np.int32))
        mask = mx.ones((B, S), dtype=mx.int32)
        if task == "classification":
            labels = mx.array(rng.integers(0, args.num_labels, size=(B,)).astype(np.int32))
        else:  # 25 % of the positions labelled, as in pretraining
            lab = np.full((B, S), -100, dtype=np.int32)
            sel = rng.random((B, S)) < 0.25
            sel[:, 0] = True
            lab[sel] = rng.integers(7, args.vocab_size, size=int(sel.sum()))
            labels = lab
        models = [(f"conditional_step_{impl}", cond), (f"dense_step_{impl}", dense)]
        checks = _check_same_step(models, loss_fn, (ids, mask, labels), f"batch={B}", doc["notes"])
        arms = []
        for name, m in models:
            m.set_dropout(0.1)
            m.train()
            opt = optim.AdamW(learning_rate=4e-5, betas=[0.9, 0.98], eps=1e-6, weight_decay=0.01)
            vg = nn.value_and_grad(m, loss_fn)

            def step(m=m, opt=opt, vg=vg):
                loss, grads = vg(m, ids, mask, labels)
                opt.update(m, grads)
                return m.parameters(), opt.state, loss

            arms.append(Arm(name, step, f"{task} loss, forward + backward + AdamW"
                            + (", masked-dense FFF" if name.startswith("dense") else ", conditional FFF"),
                            dense_blas=name.startswith("dense")))
        log(f"[train] batch={B} seq={S}: timing {len(arms)} arms ...")
        with phase(f"[train] batch={B}", 0) as progress:
            times, reps = measure(arms, opts.reps, opts.warmup, opts.budget, progress=progress)
        g = group(f"train step ({args.num_layers} layers, H={args.hidden_size}, {args.fff_trees}x{args.fff_depth}, "
                  f"{task}, backend {impl}) batch={B} seq={S}", {"batch": B, "seq": S}, B * S, arms, times, reps)
        g["checks"] = checks
        g["ratios"].append(ratio(g["arms"], arms[0].name, arms[1].name, True, env["dense_fair"]))
        doc["results"].append(g)
    doc["config"] = {"model": opts.model or ("random tiny" if opts.tiny else "random, released configuration"),
                     "task": task, "layers": args.num_layers, "hidden": args.hidden_size, "trees": args.fff_trees,
                     "depth": args.fff_depth, "batch": opts.batch, "seq": S, "optimizer": "AdamW",
                     "dropout": 0.1, "backend": impl, "reps": opts.reps or "auto", "warmup": opts.warmup,
                     "tiny": opts.tiny}
    return doc


# ----------------------------------------------------------------------------- CLI


def _int_list(s: str) -> list[int]:
    try:
        vals = [int(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {s!r}")
    return vals


COMMANDS = {
    "layer": "one FFF layer of the released size against masked-dense, dense and the NumPy reference",
    "model": "the whole model: MLM forward and fill-mask (and Hugging Face's bert-base with .[bench])",
    "train": "one fine-tuning step (forward + backward + AdamW), conditional against masked-dense",
}


def parser() -> argparse.ArgumentParser:
    """The top-level --help lists every command with its description and its options (as
    `COMMAND --help` does for one), not just their names."""
    name = command_name("ufb_mlx.benchmark")
    p = ArgumentParser(prog=name, description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    shared = [
        common.add_argument("--reps", type=int, default=None,
                            help="timed rounds (every arm once per round); default: as many as fit --budget, 3..50"),
        common.add_argument("--warmup", type=int, default=None,
                            help="untimed calls per arm first (default 2; --tiny 1)"),
        common.add_argument("--budget", type=float, default=10.0,
                            help="seconds of timed rounds per size when --reps is not given (default 10)"),
        common.add_argument("--tiny", action="store_true",
                            help="tiny sizes (hidden 64, depth 3, 2 layers, vocab 512, seq 16, 1 rep) for smoke tests"),
        common.add_argument("--json", action="store_true", help="one JSON document on stdout (tables go to stderr)"),
        common.add_argument("--plot", metavar="PNG",
                            help="write a log-log plot of speedup against tokens per batch (needs matplotlib)"),
        common.add_argument("--backend", choices=backend_lib.BACKENDS, default="auto",
                            help="model/train: the implementation the whole model runs (default auto: what load() picks)"),
    ]
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    own: dict[str, list] = {}
    lay = sub.add_parser("layer", parents=[common], help=COMMANDS["layer"], description=COMMANDS["layer"])
    own["layer"] = [
        lay.add_argument("--tokens", type=_int_list, default=None, help="token counts (default 1,128,8192; --tiny 1,16)"),
        lay.add_argument("--compile", action="store_true", help="mx.compile every MLX arm"),
        lay.add_argument("--schedule", choices=("interleaved", "blocks"), default="interleaved",
                         help="interleaved (default): one call of each arm in turn, so each runs after the "
                              "others (cold caches, as a model's layers run); blocks: consecutive calls of "
                              "each arm in 3 rounds (warm, as a layer called again and again)"),
        lay.add_argument("--backward", action="store_true",
                         help="time forward + backward (all gradients of sum(y * dy)) instead of the forward"),
    ]
    mod = sub.add_parser("model", parents=[common], help=COMMANDS["model"], description=COMMANDS["model"])
    own["model"] = [
        mod.add_argument("--batch", type=_int_list, default=None, help="batch sizes (default 1,8; --tiny 1,2)"),
        mod.add_argument("--seq", type=int, default=None, help="sequence length (default 128; --tiny 16)"),
        mod.add_argument("--model", metavar="PATH",
                         help="a converted/Hub-layout folder or Hub id instead of random weights"),
        mod.add_argument("--hf-python", default=sys.executable, metavar="PY",
                         help="a Python with torch and transformers for the Hugging Face bert-base arm "
                              "(default: this one, which has them after pip install -e \".[bench]\"; "
                              "'none' leaves the arm out)"),
    ]
    tr = sub.add_parser("train", parents=[common], help=COMMANDS["train"], description=COMMANDS["train"])
    own["train"] = [
        tr.add_argument("--batch", type=_int_list, default=None, help="batch sizes (default 16; --tiny 2)"),
        tr.add_argument("--seq", type=int, default=None, help="sequence length (default 128; --tiny 16)"),
        tr.add_argument("--task", choices=("classification", "mlm"), default="classification",
                        help="loss of the step with random weights (default classification, as GLUE fine-tuning)"),
        tr.add_argument("--model", metavar="PATH",
                        help="a checkpoint instead of random weights (its task decides the loss)"),
    ]
    f = argparse.HelpFormatter(name)
    for title, actions in [(f"options of every command ({name} COMMAND [options])", shared),
                           *((f"{cmd} options ({name} {cmd} --help)", acts) for cmd, acts in own.items())]:
        f.start_section(title)
        f.add_arguments(actions)
        f.end_section()
    p.epilog = f.format_help()
    return p


def main(argv: list[str] | None = None) -> int:
    opts = parser().parse_args(argv)
    if opts.reps is None and opts.tiny:
        opts.reps = 1
    if opts.warmup is None:
        opts.warmup = 1 if opts.tiny else 2
    if opts.reps is not None and opts.reps < 1:
        raise UFBError(f"--reps must be >= 1, got {opts.reps}")
    if opts.warmup < 0:
        raise UFBError(f"--warmup must be >= 0, got {opts.warmup}")
    if not 0 < opts.budget < math.inf:
        raise UFBError(f"--budget must be a positive number of seconds, got {opts.budget}")
    if getattr(opts, "seq", None) is not None and opts.seq < 1:
        raise UFBError(f"--seq must be >= 1, got {opts.seq}")
    if opts.command == "layer" and opts.tokens is None:
        opts.tokens = [1, 16] if opts.tiny else [1, 128, 8192]
    if opts.command == "model" and opts.batch is None:
        opts.batch = [1, 2] if opts.tiny else [1, 8]
    if opts.command == "train" and opts.batch is None:
        opts.batch = [2] if opts.tiny else [16]
    if opts.plot:  # fail before the work, not after it
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UFBError(NO_MATPLOTLIB) from None
        check_plot_path(opts.plot)
    if opts.command == "layer":
        H, P, D = layer_sizes(opts.tiny)
        from .train import memory_limit

        check_layer_sizes(opts.tokens, H, max(P * fff_lib.n_nodes(D), 4 * H), memory_limit())
    mx.random.seed(0)
    env = environment()
    log(f"[{opts.command}] {env['backend']} on {env['device']}; BLAS: {env['blas']} "
        f"({env['matmul_gflops']:.1f} GFLOP/s); dense baselines fair: {env['dense_fair']}")
    bench = {"layer": bench_layer, "model": bench_model, "train": bench_train}[opts.command]
    body = bench(opts, env)
    doc = {"schema": SCHEMA_VERSION, "benchmark": opts.command, "env": env, "config": body["config"],
           "results": body["results"], "notes": body.get("notes", [])}
    if "memory" in body:
        doc["memory"] = body["memory"]
    doc["warnings"] = [] if env["dense_fair"] else [f"dense baselines NOT FAIR: {env['dense_fair_reason']}"]
    table = render(doc)
    if opts.plot:
        plot(doc, opts.plot)
        table += f"\nplot: {opts.plot}"
    if opts.json:
        log(table)
        print(json.dumps(doc, indent=1))
    else:
        print(table)
    return 0


cli = console(main)  # the console script (pyproject.toml)

if __name__ == "__main__":
    cli()
