"""Long natural text for evaluation that works offline on any fresh machine.

The built-in corpus is the prose of CPython's own documentation topics (`pydoc_data.topics`, shipped with
every CPython since 3.x and used by `help()`): about 280k characters (~65k tokens of the default model) of
English technical prose once the code blocks and headings are dropped. `--source PATH` takes any UTF-8 text
file, or a directory whose *.txt / *.md files are read in sorted order.
"""

from __future__ import annotations

import re
from pathlib import Path

from kvzoo.errors import KvzooError

BUILTIN_SOURCE = "builtin:pydoc-topics"
_HEADING_RULE = re.compile(r"[*=\-~^]+")


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
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".md") and p.is_file())
        if not files:
            raise KvzooError(f"--source {path}: the directory holds no .txt or .md file")
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
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise KvzooError(f"--source {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
