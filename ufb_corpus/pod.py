"""Perl POD: prose paragraphs by heading, with formatting codes resolved and verbatim
(code) paragraphs, ``=begin`` regions and non-POD code dropped."""

from __future__ import annotations

import fnmatch
import html
import re
from pathlib import Path
from typing import Iterator, Sequence

from .text import PARA_SPLIT_RE, collapse_ws


def _pod_link(content: str) -> str:
    if "|" in content:
        return content.split("|", 1)[0]
    content = content.strip()
    if content.startswith(("http:", "https:", "ftp:", "mailto:")):
        return content
    name, _, section = content.partition("/")
    section = section.strip().strip('"')
    name = name.strip().strip('"')
    if section and name:
        return f"{section} in {name}"
    return section or name


_POD_ENTITIES = {"lt": "<", "gt": ">", "verbar": "|", "sol": "/", "quot": '"', "amp": "&"}


def _pod_apply(code: str, content: str) -> str:
    if code in "XZ":
        return ""
    if code == "E":
        c = content.strip()
        if c in _POD_ENTITIES:
            return _POD_ENTITIES[c]
        try:
            if c.lower().startswith("0x"):
                return chr(int(c, 16))
            if c.isdigit():
                return chr(int(c, 8) if c.startswith("0") else int(c))
        except ValueError:
            return ""
        return html.unescape(f"&{c};")
    if code == "L":
        return _pod_link(content)
    return content  # B I C F S and unknown codes


def _pod_parse(s: str, i: int, closer: str | None) -> tuple[str, int]:
    """Parse formatting codes from s[i:] until ``closer`` (None: end of string)."""
    out = []
    n = len(s)
    while i < n:
        if closer is not None:
            if closer == ">" and s[i] == ">":
                return "".join(out), i + 1
            if closer != ">" and s[i].isspace():
                m = re.compile(r"\s+" + re.escape(closer)).match(s, i)
                if m:
                    return "".join(out), m.end()
        c = s[i]
        if c.isupper() and i + 1 < n and s[i + 1] == "<":
            j = i + 1
            while j < n and s[j] == "<":
                j += 1
            k = j - (i + 1)
            if k == 1:
                inner, i = _pod_parse(s, j, ">")
            elif j < n and s[j].isspace():
                inner, i = _pod_parse(s, j, ">" * k)
                inner = inner.strip()
            else:  # not a valid multi-bracket code: treat literally
                out.append(s[i:j])
                i = j
                continue
            out.append(_pod_apply(c, inner))
            continue
        out.append(c)
        i += 1
    return "".join(out), i


def pod_strip_codes(text: str) -> str:
    return _pod_parse(text, 0, None)[0]


def pod_to_sections(text: str) -> list[tuple[str, str]]:
    """Split a POD document into (heading, prose) sections.

    Verbatim (indented) paragraphs, ``=begin``/``=end`` regions, ``=for`` and
    non-POD code are dropped; headings become section boundaries; ``=item``
    labels are kept as their own paragraphs.
    """
    sections: list[tuple[str, list[str]]] = [("", [])]
    in_pod = False
    begin_depth = 0
    for para in PARA_SPLIT_RE.split(text.replace("\r\n", "\n")):
        if not para.strip():
            continue
        if para.startswith("="):
            m = re.match(r"=(\w+)\s*(.*)", para, re.S)
            if not m:
                continue
            cmd, rest = m.group(1), m.group(2)
            if cmd == "cut":
                in_pod = False
                continue
            in_pod = True
            if cmd == "begin":
                begin_depth += 1
            elif cmd == "end":
                begin_depth = max(0, begin_depth - 1)
            elif begin_depth:
                continue
            elif cmd.startswith("head"):
                sections.append((collapse_ws(pod_strip_codes(rest)), []))
            elif cmd == "item":
                label = re.sub(r"^(\*|\d+\.?)\s*", "", rest.strip())
                if label:
                    sections[-1][1].append(pod_strip_codes(label))
            continue
        if not in_pod or begin_depth:
            continue
        if para[:1] in (" ", "\t"):
            continue  # verbatim / code
        sections[-1][1].append(pod_strip_codes(para))
    return [(h, "\n\n".join(ps)) for h, ps in sections if ps]


def read_pod_dir(root: Path, pattern: str, exclude: Sequence[str] = ()) -> Iterator[tuple[str, str]]:
    files = sorted(root.glob(pattern))
    if not files:
        raise FileNotFoundError(f"no files match {root}/{pattern}")
    for path in files:
        if any(fnmatch.fnmatch(path.name, pat) for pat in exclude):
            continue
        text = path.read_text("utf-8", "replace")
        for n, (head, body) in enumerate(pod_to_sections(text)):
            yield f"{path.name}#{n}", body
