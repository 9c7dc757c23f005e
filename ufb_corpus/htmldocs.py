"""HTML manuals: the visible prose of each page (html.parser); code, pre blocks and
navigation are dropped and block elements become paragraph breaks."""

from __future__ import annotations

import fnmatch
import html.parser
import os
from pathlib import Path
from typing import Iterator, Sequence


_HTML_SKIP_TAGS = frozenset(
    "script style pre head nav header footer aside noscript textarea select button "
    "form svg math template iframe object code-block".split())
_HTML_BLOCK_TAGS = frozenset(
    "p div li ul ol dl dt dd h1 h2 h3 h4 h5 h6 table thead tbody tfoot tr td th "
    "blockquote section article main caption figure figcaption title body html "
    "address details summary center".split())
_HTML_BREAK_VOID = frozenset({"br", "hr"})
_HTML_VOID = frozenset("area base br col embed hr img input link meta param source track wbr".split())
_HTML_SKIP_CLASSES = frozenset(
    """navheader navfooter sphinxsidebar sphinxsidebarwrapper related footer sidebar
    headerlink highlight toc breadcrumb breadcrumbs nav-wrapper nav-chapters
    mobile-nav-chapters menu-bar sidetoc programlisting screen synopsis cmdsynopsis
    funcsynopsis literallayout doctest literal-block highlight-python3 highlight-python
    highlight-pycon highlight-c highlight-none highlight-sh highlight-shell
    highlight-default navigation topbar searchbox example-contents
    """.split())
_HTML_SKIP_IDS = frozenset(
    "sidebar menu-bar searchbar-outer search-results topleftheader contents index "
    "bookmarks searchbox".split())


class _HTMLText(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip_tag: str | None = None
        self._skip_depth = 0

    def _skipped(self, tag: str, attrs) -> bool:
        if tag in _HTML_SKIP_TAGS:
            return True
        for k, v in attrs:
            if not v:
                continue
            if k == "class" and not _HTML_SKIP_CLASSES.isdisjoint(v.lower().split()):
                return True
            if k == "id" and v.lower() in _HTML_SKIP_IDS:
                return True
        return False

    def handle_starttag(self, tag, attrs):
        if self._skip_tag is not None:
            if tag == self._skip_tag:
                self._skip_depth += 1
            return
        if tag in _HTML_VOID:
            if tag in _HTML_BREAK_VOID:
                self.parts.append("\n\n")
            return
        if self._skipped(tag, attrs):
            self._skip_tag, self._skip_depth = tag, 1
            return
        if tag in _HTML_BLOCK_TAGS:
            self.parts.append("\n\n")

    def handle_startendtag(self, tag, attrs):
        if self._skip_tag is None and (tag in _HTML_BLOCK_TAGS or tag in _HTML_BREAK_VOID):
            self.parts.append("\n\n")

    def handle_endtag(self, tag):
        if self._skip_tag is not None:
            if tag == self._skip_tag:
                self._skip_depth -= 1
                if self._skip_depth == 0:
                    self._skip_tag = None
            return
        if tag in _HTML_BLOCK_TAGS:
            self.parts.append("\n\n")

    def handle_data(self, data):
        if self._skip_tag is None:
            self.parts.append(data)


def html_to_text(markup: str) -> str:
    """Visible prose of an HTML page; code/pre/navigation dropped, blocks -> blank lines."""
    p = _HTMLText()
    p.feed(markup)
    p.close()
    return "".join(p.parts)


def read_html_tree(root: Path, base: str, include: Sequence[str] = ("*.html", "*.htm"),
                   exclude: Sequence[str] = ()) -> Iterator[tuple[str, str]]:
    """Yield (relative path, text) for every HTML file under root/base."""
    top = root / base
    if not top.is_dir():
        raise FileNotFoundError(f"{top} not found")
    files = []
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames.sort()
        for fn in sorted(filenames):
            rel = os.path.relpath(os.path.join(dirpath, fn), top).replace(os.sep, "/")
            if not any(fnmatch.fnmatch(fn, pat) for pat in include):
                continue
            if any(fnmatch.fnmatch(rel, pat) for pat in exclude):
                continue
            files.append(rel)
    for rel in files:
        raw = (top / rel).read_bytes()
        yield rel, html_to_text(raw.decode("utf-8", "replace"))
