"""Long natural text for evaluation that works offline on any fresh machine.

The built-in corpus is the prose of CPython's own documentation topics (`pydoc_data.topics`, shipped with
every CPython since 3.x and used by `help()`): about 280k characters (~65k tokens of the default model) of
English technical prose once the code blocks and headings are dropped. `--source PATH` takes any UTF-8 text
file, or a directory whose *.txt / *.md / *.html files are read in sorted order. An HTML file (e.g. a book's
single-page print.html) is read as its prose: the text of its paragraphs, list items and headings, with
preformatted code blocks, scripts, styles and navigation dropped.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

from kvzoo.errors import KvzooError

BUILTIN_SOURCE = "builtin:pydoc-topics"
_HEADING_RULE = re.compile(r"[*=\-~^]+")
TEXT_SUFFIXES = (".txt", ".md")
HTML_SUFFIXES = (".html", ".htm")


def builtin_corpus() -> str:
    """The prose paragraphs of CPython's documentation topics (code blocks and heading rules dropped)."""
    import pydoc_data.topics

    paragraphs = []
    for name in sorted(pydoc_data.topics.topics):
        for para in re.split(r"\n\s*\n", pydoc_data.topics.topics[name]):
            lines = [line for line in para.split("\n") if line.strip()]
            if not lines or all(line.startswith("   ") for line in lines):  # an indented code block
                continue
            if _HEADING_RULE.fullmatch(lines[-1].strip()):  # "Title\n*****"
                continue
            paragraphs.append(" ".join(line.strip() for line in lines))
    return "\n\n".join(paragraphs)


def read_source(source: str | Path | None) -> str:
    """The text of `source`: None or BUILTIN_SOURCE for the built-in corpus, else a file or a directory."""
    if source is None or str(source) == BUILTIN_SOURCE:
        return builtin_corpus()
    path = Path(source).expanduser()
    if path.is_dir():
        suffixes = TEXT_SUFFIXES + HTML_SUFFIXES
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in suffixes and p.is_file())
        if not files:
            raise KvzooError(f"--source {path}: the directory holds no .txt, .md or .html file")
        text = "\n\n".join(_read(p) for p in files)
    elif path.is_file():
        text = _read(path)
    else:
        raise KvzooError(f"--source {path}: no such file or directory")
    if not text.strip():
        raise KvzooError(f"--source {path}: the text is empty")
    return text


def _read(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise KvzooError(f"--source {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return html_prose(text) if path.suffix.lower() in HTML_SUFFIXES else text


def html_prose(html: str) -> str:
    """The prose of an HTML page: one paragraph per block element (p, li, headings, ...), whitespace
    collapsed, entities decoded; everything inside pre, script, style, nav, head and svg dropped (code
    blocks are not the prose the eval measures; inline code inside a sentence is kept)."""
    parser = _ProseParser()
    parser.feed(html)
    parser.close()
    return "\n\n".join(parser.paragraphs)


class _ProseParser(HTMLParser):
    SKIPPED = frozenset({"pre", "script", "style", "nav", "head", "svg", "template"})
    BLOCKS = frozenset({"p", "li", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote", "dd", "dt", "td", "th",
                        "div", "section", "article", "main", "tr", "br", "hr", "table", "ul", "ol", "dl"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[str] = []
        self._pieces: list[str] = []
        self._skipping = 0  # depth inside skipped elements

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self.SKIPPED:
            self._skipping += 1
        elif tag in self.BLOCKS:
            self._end_paragraph()

    def handle_endtag(self, tag: str) -> None:
        if tag in self.SKIPPED:
            self._skipping = max(0, self._skipping - 1)
        elif tag in self.BLOCKS:
            self._end_paragraph()

    def handle_data(self, data: str) -> None:
        if not self._skipping:
            self._pieces.append(data)

    def close(self) -> None:
        super().close()
        self._end_paragraph()

    def _end_paragraph(self) -> None:
        text = " ".join("".join(self._pieces).split())
        self._pieces = []
        if text:
            self.paragraphs.append(text)
