"""The reproducers of issue 10 ("bad input never crashes and never loses data") for
loading and converting: each case that used to delete files, crash, read out of bounds,
hang or end in a traceback now ends in one line naming the problem (exit 2 from a CLI)
and leaves every file as it was."""

from __future__ import annotations

import json
import os
import socket
import struct
import threading
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import ufb_mlx
import ufb_ref
from conftest import CLS, MLM, REPO
from refusals import assert_one_line_error, copy_golden, edit_weights, run_cli, tree_state
from ufb_ref import fsio
from ufb_ref.checkpoint import SafetensorsFile, read_safetensors
from ufb_ref.errors import UFBError

# ---------------------------------------------------------------------------- convert --force


@pytest.fixture
def source(tmp_path) -> Path:
    """A Hub-layout model folder holding a file of the user's besides the model."""
    src = copy_golden(tmp_path, name="S")
    (src / "notes.txt").write_text("the user's notes")
    return src


def convert_cli(*args):
    return run_cli(["convert.py", *args])


def test_force_onto_the_input_folder_deletes_nothing(source):
    before = tree_state(source.parent)
    assert_one_line_error(convert_cli("--hf-path", source, "--mlx-path", source, "--force"), "overlaps the input")
    assert tree_state(source.parent) == before


def test_force_onto_the_parent_of_the_input_deletes_nothing(source, tmp_path):
    (tmp_path / "unrelated.txt").write_text("keep me")
    before = tree_state(tmp_path)
    assert_one_line_error(convert_cli("--hf-path", source, "--mlx-path", tmp_path, "--force"), "overlaps the input")
    assert tree_state(tmp_path) == before


def test_force_into_a_folder_inside_the_input_is_refused(source):
    (source / "sub").mkdir()
    before = tree_state(source)
    assert_one_line_error(convert_cli("--hf-path", source, "--mlx-path", source / "sub", "--force"), "overlaps")
    assert tree_state(source) == before


@pytest.mark.parametrize("kind", ["file", "symlink", "dot", "cwd", "unrelated", "unmarked-model"])
def test_force_replaces_only_a_model_folder_convert_wrote(tmp_path, kind):
    out = tmp_path / "out"
    cwd = REPO
    if kind == "file":
        out.write_text("a file")
        needle = "is a file"
    elif kind == "symlink":
        (tmp_path / "target").mkdir()
        out.symlink_to(tmp_path / "target")
        needle = "symlink"
    elif kind == "dot":
        out, cwd, needle = Path("."), tmp_path, "does not name a folder"
    elif kind == "cwd":  # the current folder by its absolute name
        out.mkdir()
        cwd, needle = out, "current folder"
    elif kind == "unrelated":  # a folder convert wrote, with a file of the user's added
        assert convert_cli("--hf-path", MLM, "--mlx-path", out).returncode == 0
        (out / "mine.txt").write_text("mine")
        needle = "'mine.txt'"
    else:  # a model folder without the marker (written by hand, or by something else)
        copy_golden(tmp_path, name="out")
        needle = "not a model folder written by this project"
    before = tree_state(tmp_path)
    proc = run_cli([REPO / "convert.py", "--hf-path", MLM, "--mlx-path", out, "--force"], cwd=cwd)
    assert_one_line_error(proc, needle)
    assert tree_state(tmp_path) == before


def test_killed_convert_leaves_temporaries_that_the_next_convert_removes(tmp_path):
    """SIGKILL in the middle of writing the weights (the worst moment), then a normal
    convert to the same folder: the half-written temporary folder is gone."""
    out = tmp_path / "out"
    script = (
        "import os, signal\n"
        "import mlx.core as mx\n"
        "import convert\n"
        "def killed(path, arrays, metadata=None):\n"
        "    open(path, 'wb').write(b'half a file')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "mx.save_safetensors = killed\n"
        f"convert.convert({str(MLM)!r}, {str(out)!r})\n"
    )
    proc = run_cli(["-c", script])
    assert proc.returncode == -9
    stale = [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
    assert len(stale) == 1
    assert [f.read_bytes() for f in stale[0].iterdir() if "model.safetensors" in f.name] == [b"half a file"]
    assert not out.exists()
    assert convert_cli("--hf-path", MLM, "--mlx-path", out).returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no lock file left
    ufb_ref.load(out)


def test_a_weights_file_cut_short_by_a_full_disk_is_never_renamed_into_place(tmp_path, monkeypatch):
    """MLX's writer reports no error when the disk fills (it wrote to /dev/full without
    one): convert reads the written header back and refuses the cut file."""
    import mlx.core as mx

    import convert

    real = mx.save_safetensors

    def cut_short(path, arrays, metadata=None):
        real(path, arrays, metadata=metadata)
        data = Path(path).read_bytes()
        Path(path).write_bytes(data[: len(data) // 2])
    monkeypatch.setattr(mx, "save_safetensors", cut_short)
    with pytest.raises(UFBError, match="corrupted safetensors file"):
        convert.convert(str(MLM), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # no output, no lock file


def test_stale_temporaries_of_live_writers_and_other_folders_are_kept(tmp_path):
    out = tmp_path / "out"
    mine = tmp_path / f".out.tmp-{os.getpid()}-0123abcd"          # a live process (this one)
    other = tmp_path / ".other.tmp-999999999-0123abcd"              # another folder's
    users = tmp_path / ".out.tmp-notes"                             # not our pattern
    for p in (mine, other, users):
        p.mkdir()
    dead = tmp_path / ".out.tmp-999999999-89abcdef"                 # no such process
    dead.mkdir()
    assert fsio.clean_stale_temporaries(out) == [dead]
    assert mine.exists() and other.exists() and users.exists() and not dead.exists()


def test_folder_lock_refuses_a_second_writer(tmp_path):
    with fsio.folder_lock(tmp_path / "out"):
        with pytest.raises(UFBError, match="being written by another process"):
            with fsio.folder_lock(tmp_path / "out"):
                pass
    with fsio.folder_lock(tmp_path / "out"):  # released
        assert (tmp_path / ".out.lock").exists()  # only while held
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError), fsio.folder_lock(tmp_path / "out"):
        raise RuntimeError("the run failed")
    assert list(tmp_path.iterdir()) == []


def test_folder_lock_is_not_fooled_by_a_lock_file_removed_under_it(tmp_path, monkeypatch):
    """The holder removes the lock file when it lets go: a process that opened the old file
    just before must not count the lock it then gets on that removed file, or it and the
    next process (which creates a new file) would both write the folder."""
    lock = tmp_path / ".out.lock"
    real_open, opened = os.open, []

    def open_then_lose_the_race(path, flags, mode=0o777):
        fd = real_open(path, flags, mode)
        if not opened:  # the old holder removes the file, a newcomer creates another
            opened.append(fd)
            os.unlink(path)
            os.close(real_open(path, os.O_RDWR | os.O_CREAT))
        return fd

    monkeypatch.setattr(fsio.os, "open", open_then_lose_the_race)
    with fsio.folder_lock(tmp_path / "out"):
        monkeypatch.setattr(fsio.os, "open", real_open)
        assert len(opened) == 1
        with pytest.raises(UFBError, match="being written by another process"):
            with fsio.folder_lock(tmp_path / "out"):
                pass
    assert not lock.exists()


def test_atomic_folder_keeps_the_old_folder_when_writing_fails(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "a").write_text("old")
    with pytest.raises(RuntimeError):
        with fsio.atomic_folder(out, replace=True) as tmp:
            (tmp / "a").write_text("new")
            raise RuntimeError("disk full")
    assert (out / "a").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ---------------------------------------------------------------------------- token ids


def _set_tokenizer(folder: Path, edit) -> None:
    tok = json.loads((folder / "tokenizer.json").read_text())
    edit(tok)
    (folder / "tokenizer.json").write_text(json.dumps(tok))


@pytest.mark.parametrize("new_id", [899, 10**9])  # vocab_size of the golden model: 899
def test_tokenizer_ids_beyond_the_vocabulary_are_refused(tmp_path, new_id):
    src = copy_golden(tmp_path)
    _set_tokenizer(src, lambda t: t["model"]["vocab"].update({"zebra": new_id}))
    needle = f"has id {new_id}, outside the model's vocabulary (vocab_size 899)"
    assert_one_line_error(convert_cli("--hf-path", src, "--mlx-path", tmp_path / "out"), needle)
    assert not (tmp_path / "out").exists()
    for load in (ufb_ref.load, ufb_mlx.load):
        with pytest.raises(UFBError, match="outside the model's vocabulary"):
            load(src)


def test_template_ids_beyond_the_vocabulary_are_refused_when_encoding(tmp_path):
    """Special tokens of the post-processor carry their own ids, outside get_vocab()."""
    src = copy_golden(tmp_path)
    _set_tokenizer(src, lambda t: t["post_processor"]["special_tokens"]["<sep>"].update(ids=[5000]))
    _, tok = ufb_ref.load(src)
    with pytest.raises(UFBError, match="emitted id 5000, outside the model's vocabulary"):
        tok("the river")


def test_template_naming_an_undefined_special_token_is_refused_at_load(tmp_path):
    """Found by the fuzz suite: `tokenizers` loads such a file, then panics (a Rust
    backtrace on stderr) on the first text it encodes."""
    src = copy_golden(tmp_path)
    _set_tokenizer(src, lambda t: t["post_processor"]["special_tokens"].pop("<sep>"))
    needle = "the post-processor's single template uses special token '<sep>', which it does not define"
    assert_one_line_error(convert_cli("--hf-path", src, "--mlx-path", tmp_path / "out"), needle)
    with pytest.raises(UFBError, match="which it does not define"):
        ufb_ref.load(src)


@pytest.mark.parametrize("bad", [899, -1, 10**9, 2**40])
def test_mlx_model_checks_token_ids_like_the_reference(bad):
    model, _ = ufb_mlx.load(MLM)
    ref, _ = ufb_ref.load(MLM)
    ids = np.array([[1, 7, bad]], dtype=np.int64)
    for m in (model, ref):
        with pytest.raises(UFBError, match=r"input_ids outside the vocabulary \[0, 899\)"):
            m(ids)


@pytest.mark.parametrize("ids, message", [
    (np.zeros((1, 3), np.float32), r"input_ids must be an integer array \(batch, seq\), got \S*float32 \(1, 3\)$"),
    (np.zeros((1, 1, 3), np.int32), r"input_ids must be an integer array \(batch, seq\), got \S*int32 \(1, 1, 3\)$"),
    (np.zeros((1, 33), np.int32), r"^sequence length 33 exceeds max_seq_length 32$"),
    (np.zeros((33,), np.int32), r"^sequence length 33 exceeds max_seq_length 32$"),
], ids=["float", "3-d", "long", "long-1-d"])
def test_mlx_arrays_get_the_reference_checks_of_dtype_and_shape(ids, message):
    """One definition of the checks (ufb_ref.inputs): an MLX array, checked without
    reading its values, gets the same message as host data in either model."""
    model, _ = ufb_mlx.load(MLM)
    ref, _ = ufb_ref.load(MLM)
    for m, x in ((model, mx.array(ids)), (model, ids), (ref, ids)):
        with pytest.raises(UFBError, match=message):
            m(x)


@pytest.mark.parametrize("bad", [899, -1, 2**31 - 1])
def test_unknown_ids_in_an_mlx_array_poison_their_sequence(bad):
    """An MLX array is not checked on the host (that would sync every forward): the
    unknown id reads no memory outside the table, and its sequence's logits are NaN
    while the other sequences are exactly as in the same batch without it."""
    model, _ = ufb_mlx.load(MLM)
    good = np.array([[1, 7, 9, 12]], dtype=np.int32)
    ids = mx.array(np.concatenate([good, [[1, 7, bad, 12]]]).astype(np.int32))
    out = np.array(model(ids))
    assert np.isnan(out[1]).all()
    np.testing.assert_array_equal(out[0], np.array(model(mx.array(np.concatenate([good, good]))))[0])


def test_huge_text_is_refused_before_tokenising():
    _, tok = ufb_ref.load(MLM)
    with pytest.raises(UFBError, match="50000000 characters long, more than the model's max_seq_length 32"):
        tok.encode("word " * 10_000_000)


def test_invalid_utf8_text_is_one_line():
    _, tok = ufb_ref.load(MLM)
    text = b"the river \xff\xfe".decode("utf-8", "surrogateescape")
    with pytest.raises(UFBError, match="not valid UTF-8"):
        tok.encode(text)


# ---------------------------------------------------------------------------- safetensors


def raw_file(path: Path, header: bytes, body: bytes = b"") -> Path:
    path.write_bytes(struct.pack("<Q", len(header)) + header + body)
    return path


F4 = np.arange(4, dtype=np.float32).tobytes()


def _entry(begin, end, shape=(4,), dtype="F32"):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}


MALFORMED = {
    "duplicate-key": (b'{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},'
                      b'"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}', F4, "duplicate key 'a'"),
    "aliased": (json.dumps({"a": _entry(0, 16), "b": _entry(0, 16)}).encode(), F4, "overlaps another tensor"),
    "overlapping": (json.dumps({"a": _entry(0, 16), "b": _entry(8, 24)}).encode(), F4 + F4[:8], "overlaps"),
    "gap": (json.dumps({"a": _entry(8, 24)}).encode(), F4 + F4[:8], "leaves a gap"),
    "trailing-bytes": (json.dumps({"a": _entry(0, 16)}).encode(), F4 + b"xx", "cover 16 of the 18 data bytes"),
    "metadata-not-strings": (json.dumps({"__metadata__": {"k": 1}, "a": _entry(0, 16)}).encode(), F4, "__metadata__"),
    "metadata-list": (json.dumps({"__metadata__": ["x"], "a": _entry(0, 16)}).encode(), F4, "__metadata__"),
    "float-shape": (json.dumps({"a": _entry(0, 16, shape=(4.0,))}).encode(), F4, "shape"),
    "negative-shape": (json.dumps({"a": _entry(0, 16, shape=(-4,))}).encode(), F4, "shape"),
    "nested-shape": (json.dumps({"a": {"dtype": "F32", "shape": [[4]], "data_offsets": [0, 16]}}).encode(), F4,
                     "shape"),
    "bool-shape": (json.dumps({"a": _entry(0, 16, shape=(True,))}).encode(), F4, "shape"),
    "shape-overflow": (json.dumps({"a": _entry(0, 16, shape=(2**32, 2**32, 2**32))}).encode(), F4, "needs"),
    "shape-overflow-int64": (json.dumps({"a": _entry(0, 0, shape=(2**62, 4))}).encode(), b"", "needs"),
    "float-offsets": (json.dumps({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0.0, 16.0]}}).encode(), F4,
                      "data_offsets"),
    "string-offsets": (json.dumps({"a": {"dtype": "F32", "shape": [4], "data_offsets": ["0", "16"]}}).encode(), F4,
                       "data_offsets"),
    "reversed-offsets": (json.dumps({"a": _entry(16, 0)}).encode(), F4, "data_offsets"),
    "dtype-list": (json.dumps({"a": _entry(0, 16, dtype=["F32"])}).encode(), F4, "dtype"),
    "unknown-dtype": (json.dumps({"a": _entry(0, 16, dtype="F128")}).encode(), F4, "unsupported dtype"),
    "entry-not-object": (json.dumps({"a": [0, 16]}).encode(), F4, "needs dtype, shape and data_offsets"),
    "deep-header": (b"[" * 100_000 + b"]" * 100_000, b"", "corrupted safetensors"),
    "deep-object": (b'{"a":' * 100_000 + b"1" + b"}" * 100_000, b"", "corrupted safetensors"),
    "header-array": (b"[]", b"", "not a JSON object"),
    "header-not-utf8": (b'{"\xff":1}', b"", "not JSON"),
    "header-longer-than-file": (b"", b"", "shorter than its header"),
}


@pytest.mark.parametrize("case", list(MALFORMED), ids=list(MALFORMED))
def test_malformed_safetensors_headers_are_refused(tmp_path, case):
    header, body, needle = MALFORMED[case]
    path = tmp_path / "model.safetensors"
    if case == "header-longer-than-file":
        path.write_bytes(struct.pack("<Q", 10**6) + b"{}")
        needle = "exceeds the file size"
    else:
        raw_file(path, header, body)
    with pytest.raises(UFBError, match="corrupted safetensors|unsupported dtype") as e:
        SafetensorsFile(path)
    assert needle in str(e.value) and len(str(e.value).splitlines()) == 1 and str(path) in str(e.value)


@pytest.mark.parametrize("raw,body,want", [
    (b'{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}    ', F4, {"a": (4,)}),  # space padding
    (b'{"__metadata__":null,"b":{"dtype":"F32","shape":[],"data_offsets":[16,20]},'
     b'"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"e":{"dtype":"F32","shape":[0,3],"data_offsets":[20,20]}}',
     F4 + F4[:4], {"a": (4,), "b": (), "e": (0, 3)}),
], ids=["padded", "null-metadata-scalar-empty-unordered"])
def test_what_the_format_allows_is_read(tmp_path, raw, body, want):
    """Padding spaces after the header, MLX's "__metadata__": null, scalars, empty
    tensors, entries listed out of offset order."""
    tensors, _ = read_safetensors(raw_file(tmp_path / "x.safetensors", raw, body))
    assert {k: v.shape for k, v in tensors.items()} == want
    np.testing.assert_array_equal(tensors["a"], np.arange(4, dtype=np.float32))


def test_bfloat16_is_widened(tmp_path):
    bf = (np.array([1.0, -2.5, 3.0], np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()
    path = raw_file(tmp_path / "x.safetensors", json.dumps({"w": _entry(0, 6, (3,), "BF16")}).encode(), bf)
    tensors, dtypes = read_safetensors(path)
    assert dtypes == {"w": "BF16"} and tensors["w"].dtype == np.float32
    np.testing.assert_array_equal(tensors["w"], [1.0, -2.5, 3.0])


@pytest.mark.parametrize("claimed", [2 * 2**30, 5 * 2**30])
def test_a_sparse_file_claiming_gigabytes_is_refused_before_reading(tmp_path, claimed):
    """A few KB on disk, a header claiming a multi-GiB embedding: refused on the header
    (shape against the config) with the CLI limited to 1.5 GiB of address space."""
    src = copy_golden(tmp_path)
    key = "encoder.embedding.word_embedding.weight"
    tensors = read_safetensors(src / "model.safetensors")[0]
    del tensors[key]
    header, blobs, at = {}, [], 0
    for k, v in tensors.items():
        header[k] = _entry(at, at + v.nbytes, v.shape)
        blobs.append(np.ascontiguousarray(v, dtype=np.float32).tobytes())
        at += v.nbytes
    header[key] = _entry(at, at + claimed, (claimed // 4,))
    path = raw_file(src / "model.safetensors", json.dumps(header).encode(), b"".join(blobs))
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size + claimed)
    assert path.stat().st_blocks * 512 < 2**20  # sparse: the claim costs no disk
    proc = convert_cli("--hf-path", src, "--mlx-path", tmp_path / "out")
    assert_one_line_error(proc, f"'{key}' has shape ({claimed // 4},), expected (899, 64)")


# ---------------------------------------------------------------------------- non-finite weights


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nonfinite_weights_are_refused_naming_the_tensor(tmp_path, value):
    src = copy_golden(tmp_path)
    key = "encoder.layers.1.ffn.linear_in.weight"

    def poison(t):
        t[key] = t[key].copy()
        t[key][3, 5] = value
    edit_weights(src, poison)
    needle = f"tensor '{key}' holds 1 non-finite value"
    for load in (ufb_ref.load, ufb_mlx.load):
        with pytest.raises(UFBError, match=needle):
            load(src)
    assert_one_line_error(convert_cli("--hf-path", src, "--mlx-path", tmp_path / "out"), needle, "--allow-nonfinite")
    model, _ = ufb_ref.load(src, allow_nonfinite=True)  # asked for: loads as it is
    assert not np.isfinite(model.weights[key]).all()
    mlx_model, _ = ufb_mlx.load(src, allow_nonfinite=True)
    assert not np.isfinite(np.array(mlx_model.encoder.layers[1].ffn.linear_in.weight)).all()
    proc = convert_cli("--hf-path", src, "--mlx-path", tmp_path / "out", "--allow-nonfinite")
    assert proc.returncode == 0, proc.stderr
    gen = run_cli(["-m", "ufb_mlx.generate", "--model", str(src), "--prompt", "a [MASK] b", "--json"])
    assert_one_line_error(gen, needle, "--allow-nonfinite")
    gen = run_cli(["-m", "ufb_mlx.generate", "--model", str(src), "--prompt", "a [MASK] b", "--json",
                   "--allow-nonfinite"])
    assert gen.returncode == 0 and json.loads(gen.stdout)  # strict JSON even with NaN scores


# ---------------------------------------------------------------------------- config values

# (flat field of a converted config, its place in the Hub config, bad value, needle)
CONFIG_CASES = [
    ("fff_depth", "arch.intermed_depth", "3", "'fff_depth' must be an integer, got '3' (str)"),
    ("fff_depth", "arch.intermed_depth", 3.0, "'fff_depth' must be an integer, got 3.0 (float)"),
    ("fff_depth", "arch.intermed_depth", True, "'fff_depth' must be an integer"),
    ("fff_depth", "arch.intermed_depth", 40, "'fff_depth' must be in [0, 30], got 40"),
    ("pad_token_id", "arch.embedding.pad_token_id", 1e30, "'pad_token_id' must be an integer"),
    ("pad_token_id", "arch.embedding.pad_token_id", 899, "pad_token_id 899 is outside the vocabulary"),
    ("norm_eps", "arch.norm_eps", -1, "'norm_eps' must be a number in (0.0, 1.0], got -1"),
    ("norm_eps", "arch.norm_eps", float("nan"), "'norm_eps' must be a number"),
    ("norm_eps", "arch.norm_eps", "abc", "'norm_eps' must be a number"),
    ("max_seq_length", "arch.embedding.max_seq_length", 1e7, "'max_seq_length' must be an integer, got 10000000.0"),
    ("max_seq_length", "arch.embedding.max_seq_length", 10**9, "'max_seq_length' must be in [1, 65536]"),
    ("vocab_size", "arch.embedding.vocab_size", 10**10, "'vocab_size' must be in"),
    ("hidden_size", "arch.hidden_size", [64], "'hidden_size' must be an integer, got [64]"),
    ("num_layers", "arch.num_transformer_layers", 2**70, "'num_layers' must be in [1, 1024], got an integer of"),
]


def _put(cfg: dict, dotted: str, value) -> None:
    *path, last = dotted.split(".")
    for part in path:
        cfg = cfg[part]
    cfg[last] = value


@pytest.mark.parametrize("flat_key,hub_key,value,needle", CONFIG_CASES,
                         ids=[f"{c[0]}={str(c[2])[:12]}" for c in CONFIG_CASES])
def test_config_values_of_the_wrong_type_or_range(tmp_path, converted_mlm, flat_key, hub_key, value, needle):
    hub = copy_golden(tmp_path, name="hub")
    cfg = json.loads((hub / "config.json").read_text())
    if hub_key == "arch.hidden_size":
        cfg["arch"]["embedding"]["embedding_dim"] = value  # the two must agree
    _put(cfg, hub_key, value)
    (hub / "config.json").write_text(json.dumps(cfg))
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in Path(converted_mlm).iterdir():
        (flat / p.name).write_bytes(p.read_bytes())
    cfg = json.loads((flat / "config.json").read_text())
    cfg[flat_key] = value
    (flat / "config.json").write_text(json.dumps(cfg))
    for folder in (hub, flat):
        with pytest.raises(UFBError, match="config.json") as e:
            ufb_ref.load(folder)
        assert needle in str(e.value) and len(str(e.value)) < 300


@pytest.mark.parametrize("text,needle", [
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('{"a":' * 100_000 + "1" + "}" * 100_000, "nested too deeply"),
    ('{"hidden_size": ' + "9" * 5001 + "}", "not valid JSON"),
    ("\xff", "not valid JSON"),
])
def test_pathological_config_json(tmp_path, text, needle):
    src = copy_golden(tmp_path)
    (src / "config.json").write_bytes(text.encode("latin-1") if text == "\xff" else text.encode())
    with pytest.raises(UFBError, match=needle):
        ufb_ref.load(src)


def test_hub_config_architectures_and_id2label_types(tmp_path):
    src = copy_golden(tmp_path, CLS)
    cfg = json.loads((src / "config.json").read_text())
    for key, value, needle in [("architectures", 5, "'architectures' must be a list"),
                               ("id2label", ["neg", "pos"], "'id2label' must be an object"),
                               ("id2label", {"0": 1, "1": 2, "2": 3}, "'id2label' must map class numbers")]:
        (src / "config.json").write_text(json.dumps({**cfg, key: value}))
        with pytest.raises(UFBError, match=needle):
            ufb_ref.load(src)


# ---------------------------------------------------------------------------- Hub ids


@pytest.mark.parametrize("repo_id", ["own er/na me", "owner/..", "owner/name@rev", "a" * 97 + "/b"])
def test_invalid_hub_ids_are_one_line(repo_id):
    with pytest.raises(UFBError, match="neither a local folder nor a valid Hub repo id"):
        ufb_ref.load(repo_id)


def test_empty_model_path_is_not_the_current_folder():
    with pytest.raises(UFBError, match="model path is empty"):
        ufb_ref.load("")


def test_a_hub_that_never_answers_times_out_naming_the_id(tmp_path):
    """A server that accepts connections and never replies (on this machine's loopback):
    the CLI gives up after HF_HUB_ETAG_TIMEOUT seconds with one line naming the id."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held, stop = [], threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                pass
    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        t0 = time.monotonic()
        proc = run_cli(["convert.py", "--hf-path", "owner/silent-model", "--mlx-path", tmp_path / "out"],
                       extra_env={"HF_ENDPOINT": f"http://127.0.0.1:{server.getsockname()[1]}",
                                  "HF_HUB_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "0",
                                  "HF_HUB_ETAG_TIMEOUT": "1"}, timeout=90)
        elapsed = time.monotonic() - t0
    finally:
        stop.set()
        thread.join()
        for c in held:
            c.close()
        server.close()
    assert_one_line_error(proc, "'owner/silent-model'", "no reply within 1 s")
    assert elapsed < 60  # it gave up: without the timeout it waited for ever
    assert not (tmp_path / "out").exists()
