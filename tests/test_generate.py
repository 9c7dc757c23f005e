"""Fill-mask (ufb_mlx.generate): the library function against a direct computation with the
full model, the iterative and parallel strategies, batching, sampling, and the CLI end to
end (as a subprocess) including its one-line errors. Tiny golden MLM checkpoint only."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import ufb_mlx  # noqa: F401  (OpenBLAS before mlx)
from conftest import MLM, REPO
from ufb_mlx.generate import fill_mask

TWO_MASKS = "The [MASK] lit his <mask> before the sun."
PROMPTS = ["The capital of France is [MASK].", TWO_MASKS, "Ducks ate [MASK] on the lake today."]


@pytest.fixture(scope="module")
def mt():
    return ufb_mlx.load(MLM)


def softmax_at(model, tok, ids, position):
    """The model's probabilities at one position, from the full (B, S, V) logits."""
    logits = np.array(model(np.array([ids]), attention_mask=np.ones((1, len(ids)), np.int64)))
    z = logits[0, position].astype(np.float64)
    p = np.exp(z - z.max())
    return p / p.sum()


def check_candidates(mask, probs, tok, k):
    cands = mask["candidates"]
    assert len(cands) == k
    got = np.array([c["prob"] for c in cands])
    assert np.all((got >= 0) & (got <= 1)) and np.all(np.diff(got) <= 0)
    ids = [c["token_id"] for c in cands]
    assert all(c["token"] == tok.id_to_token(c["token_id"]) for c in cands)
    np.testing.assert_allclose(got, probs[ids], atol=1e-5)
    # They are the k most probable non-special tokens.
    allowed = probs.copy()
    allowed[list(tok.special_ids.values())] = -1
    np.testing.assert_allclose(got, np.sort(allowed)[::-1][:k], atol=1e-5)
    assert mask["chosen"] == cands[0]


def expected_completion(prompt, masks):
    """The prompt with its mask markers, found by a regular expression (not by the
    tokenizer's offsets), replaced in order by the chosen tokens (word pieces joined)."""
    chosen = iter(m["chosen"]["token"].removeprefix("##") for m in sorted(masks, key=lambda m: m["position"]))
    return re.sub(r"\[MASK\]|<mask>", lambda _: next(chosen), prompt)


@pytest.mark.parametrize("strategy", ["iterative", "parallel"])
def test_completed_text_keeps_what_the_tokenizer_cannot_represent(strategy):
    """Emoji, CJK, accents, capitals and runs of spaces survive: the answer is the prompt
    as written with only the masks replaced, and each mask's span points at its marker."""
    model, tok = ufb_mlx.load("demo")
    prompts = ["\U0001F431\U0001F431 [MASK] \U0001F436", "Caf\u00e9 [MASK] na\u00efve \u2014 \u6771\u4eac[MASK]\u3067\u3059!",
               "  Two  spaces,\ttab and <mask> kept  "]
    for prompt, res in zip(prompts, fill_mask(model, tok, prompts, strategy=strategy)):
        assert res["prompt"] == prompt
        assert [prompt[a:b] for a, b in (m["span"] for m in res["masks"])] == re.findall(r"\[MASK\]|<mask>", prompt)
        assert res["completed"] == expected_completion(prompt, res["masks"])
        assert "[MASK]" not in res["completed"] and "<mask>" not in res["completed"]
        assert sorted(m["step"] for m in res["masks"]) == (
            list(range(1, len(res["masks"]) + 1)) if strategy == "iterative" else [1] * len(res["masks"]))


def test_parallel_probs_equal_full_model(mt):
    model, tok = mt
    ids = tok.encode(TWO_MASKS)
    (res,) = fill_mask(model, tok, TWO_MASKS, top_k=4, strategy="parallel")
    positions = [p for p, t in enumerate(ids) if t == tok.mask_token_id]
    assert [m["position"] for m in res["masks"]] == positions and len(positions) == 2
    assert res["tokens"] == len(ids) and res["prompt"] == TWO_MASKS
    for m in res["masks"]:
        assert m["step"] == 1
        check_candidates(m, softmax_at(model, tok, ids, m["position"]), tok, 4)
    assert res["completed"] == expected_completion(TWO_MASKS, res["masks"])


def test_iterative_is_a_two_step_computation(mt):
    model, tok = mt
    ids = tok.encode(TWO_MASKS)
    (par,) = fill_mask(model, tok, TWO_MASKS, top_k=5, strategy="parallel")
    (it,) = fill_mask(model, tok, TWO_MASKS, top_k=5, strategy="iterative")
    first = next(m for m in it["masks"] if m["step"] == 1)
    second = next(m for m in it["masks"] if m["step"] == 2)
    # The first fill is the parallel prediction of the most confident mask.
    par_first = next(m for m in par["masks"] if m["position"] == first["position"])
    assert first["chosen"]["prob"] == max(m["chosen"]["prob"] for m in par["masks"])
    assert [c["token_id"] for c in first["candidates"]] == [c["token_id"] for c in par_first["candidates"]]
    np.testing.assert_allclose([c["prob"] for c in first["candidates"]],
                               [c["prob"] for c in par_first["candidates"]], atol=1e-6)
    check_candidates(first, softmax_at(model, tok, ids, first["position"]), tok, 5)
    # The second is predicted with the first filled in.
    step2 = list(ids)
    step2[first["position"]] = first["chosen"]["token_id"]
    check_candidates(second, softmax_at(model, tok, step2, second["position"]), tok, 5)
    assert it["completed"] == expected_completion(TWO_MASKS, it["masks"])


def test_decoder_runs_only_at_remaining_masks(mt, monkeypatch):
    model, tok = mt
    rows = []
    original = model.mlm_logits

    def spy(h):
        rows.append(h.shape[0])
        return original(h)

    monkeypatch.setattr(model, "mlm_logits", spy)
    fill_mask(model, tok, TWO_MASKS, strategy="iterative")
    assert rows == [2, 1]
    rows.clear()
    fill_mask(model, tok, PROMPTS, strategy="parallel", batch_size=3)
    assert rows == [4]


def test_batched_equals_one_by_one_and_dense(mt):
    model, tok = mt
    stats = {}
    batched = fill_mask(model, tok, PROMPTS, batch_size=2, stats=stats)
    single = [fill_mask(model, tok, p)[0] for p in PROMPTS]
    assert_same(batched, single)
    assert stats["prompt_tokens"] == sum(len(tok.encode(p)) for p in PROMPTS)
    assert stats["forward_passes"] == 3 and stats["encoded_tokens"] > stats["prompt_tokens"]
    dense, _ = ufb_mlx.load(MLM, fff_mode="dense")
    assert_same(fill_mask(dense, tok, PROMPTS, batch_size=2), batched)


def assert_same(a, b, atol=1e-5):
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert ra["completed"] == rb["completed"] and ra["prompt"] == rb["prompt"]
        for ma, mb in zip(ra["masks"], rb["masks"], strict=True):
            assert (ma["position"], ma["step"]) == (mb["position"], mb["step"])
            assert ma["chosen"]["token_id"] == mb["chosen"]["token_id"]
            assert [c["token_id"] for c in ma["candidates"]] == [c["token_id"] for c in mb["candidates"]]
            np.testing.assert_allclose([c["prob"] for c in ma["candidates"]],
                                       [c["prob"] for c in mb["candidates"]], atol=atol)


def test_sampling_is_seeded(mt):
    model, tok = mt
    run = lambda seed, bs=16: fill_mask(model, tok, PROMPTS, temperature=1.0, seed=seed, batch_size=bs)  # noqa: E731
    a = run(7)
    chosen = lambda r: [m["chosen"]["token_id"] for x in r for m in x["masks"]]  # noqa: E731
    assert chosen(a) == chosen(run(7)) == chosen(run(7, bs=1))
    assert chosen(a) != chosen(run(8))  # 4 draws from ~900 near-uniform tokens
    for res in a:  # the reported probabilities stay the model's own
        for m in res["masks"]:
            assert m["candidates"][0]["prob"] >= m["chosen"]["prob"]


def test_library_rejects_bad_arguments(mt):
    model, tok = mt
    for kwargs in ({"top_k": 0}, {"strategy": "greedy"}, {"temperature": -1.0}, {"batch_size": 0}):
        with pytest.raises(ufb_mlx.UFBError):
            fill_mask(model, tok, PROMPTS[0], **kwargs)
    with pytest.raises(ufb_mlx.UFBError, match="no mask"):
        fill_mask(model, tok, ["Ducks ate bread."])
    with pytest.raises(ufb_mlx.UFBError, match="no prompts"):
        fill_mask(model, tok, [])


# ---------------------------------------------------------------------------------------
# CLI, as a subprocess


def cli(*args, stdin=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "ufb_mlx.generate", *args], cwd=REPO, env=env,
                          input=stdin, capture_output=True, text=True, timeout=120)


def test_cli_text_output():
    r = cli("--model", str(MLM), "--prompt", TWO_MASKS, "--top-k", "3")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == f"prompt: {TWO_MASKS}"
    assert [ln.split(" (")[0].strip() for ln in lines if ln.strip().startswith("mask ")] == ["mask 1", "mask 2"]
    assert len(lines) == 1 + 2 * (1 + 3) + 1 and lines[-1].startswith("completed: ")
    assert sum("<- chosen" in ln for ln in lines) == 2
    # The same step numbers and completion as --json gives.
    j = json.loads(cli("--model", str(MLM), "--prompt", TWO_MASKS, "--top-k", "3", "--json").stdout)["results"][0]
    text_steps = sorted(int(ln.rsplit("step ", 1)[1].rstrip("):")) for ln in lines if ln.strip().startswith("mask "))
    assert text_steps == sorted(m["step"] for m in j["masks"]) == [1, 2]
    assert lines[-1] == f"completed: {j['completed']}"
    stats = r.stderr.strip()
    assert len(stats.splitlines()) == 1 and "prompt tokens: 10" in stats
    assert "tokens/s" in stats and "peak memory" in stats


def test_cli_json_schema_and_stdin(mt):
    model, tok = mt
    r = cli("--model", str(MLM), "--prompt", "-", "--json", "--strategy", "parallel", stdin=TWO_MASKS + "\n")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out) == {"model", "fff_mode", "strategy", "top_k", "temperature", "seed", "results", "stats"}
    assert out["strategy"] == "parallel" and out["top_k"] == 5 and out["fff_mode"] == "conditional"
    assert set(out["stats"]) == {"prompt_tokens", "encoded_tokens", "forward_passes", "seconds",
                                 "tokens_per_s", "peak_memory_mb"}
    assert out["stats"]["prompt_tokens"] == 10 and out["stats"]["tokens_per_s"] > 0
    (res,) = out["results"]
    assert set(res) == {"prompt", "tokens", "masks", "completed"}
    for m in res["masks"]:
        assert set(m) == {"position", "span", "step", "candidates", "chosen"}
        assert all(set(c) == {"token", "token_id", "prob"} for c in m["candidates"])
    assert_same(out["results"], fill_mask(model, tok, TWO_MASKS, strategy="parallel"))


def test_cli_prompts_file_batched_and_seeded(mt, tmp_path):
    model, tok = mt
    f = tmp_path / "prompts.txt"
    f.write_text("\n".join(PROMPTS[:2]) + "\n\n" + PROMPTS[2] + "\n")
    r = cli("--model", str(MLM), "--prompts-file", str(f), "--batch-size", "2", "--json",
            "--temperature", "0.5", "--seed", "3")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert [x["prompt"] for x in out["results"]] == PROMPTS  # the blank line is skipped
    # The same as one prompt per pass, in another process: batching and the seed (drawn per
    # prompt index) are reproducible.
    assert_same(out["results"], fill_mask(model, tok, PROMPTS, temperature=0.5, seed=3, batch_size=1))
    assert_same(out["results"][:1], fill_mask(model, tok, PROMPTS[0], temperature=0.5, seed=3))


def test_cli_help():
    r = cli("--help")
    assert r.returncode == 0 and "--prompts-file" in r.stdout and "--fff-mode" in r.stdout


@pytest.mark.parametrize("case", ["no-mask", "too-long", "no-model", "empty-file", "missing-file", "top-k"])
def test_cli_errors_are_one_line(case, tmp_path):
    model = ["--model", str(MLM)]
    args = {
        "no-mask": model + ["--prompt", "Ducks ate bread."],
        "too-long": model + ["--prompt", "the river " * 20 + "[MASK]"],
        "no-model": ["--model", str(tmp_path / "no-such-model"), "--prompt", "a [MASK]"],
        "empty-file": model + ["--prompts-file", str(tmp_path / "empty.txt")],
        "missing-file": model + ["--prompts-file", str(tmp_path / "missing.txt")],
        "top-k": model + ["--prompt", "a [MASK]", "--top-k", "0"],
    }[case]
    (tmp_path / "empty.txt").write_text("\n  \n")
    r = cli(*args)
    assert r.returncode != 0
    assert r.stdout == ""
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr
