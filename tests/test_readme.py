"""The README's examples run as written and print what the README shows.

- ```python blocks run in order in one namespace (a session, as a reader would paste them); when a ```text
  block follows one, the printed output must match it, `...` standing for any text (whitespace runs compare
  equal, so wrapped output still matches).
- `kvzoo ...` lines of ```bash blocks run through `kvzoo.cli.main` on the default model, in a temporary
  directory. Lines with `<placeholders>` are templates (the README says so) and are the only ones skipped.
  To keep the test short, the work is shrunk (SHORTER): `--max-new-tokens` is lowered on generate/chat
  lines, the demo gets a short document and one question, eval one tiny instance of one task, bench one
  32-token context and no `--compile` (compiling the decode step alone takes minutes on a CPU;
  tests/test_compile.py covers it). `chat` reads one message from standard input. A ```text block after a
  one-line ```bash block is its expected output.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from kvzoo.cli import main

README = Path(__file__).resolve().parent.parent / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```\n", re.S | re.M)
PLACEHOLDER = re.compile(r"<[^<>\s]+>")
SHORTER = {
    "generate": ["--max-new-tokens", "12"],
    "chat": ["--max-new-tokens", "12"],
    "demo": ["--questions", "1", "--doc-tokens", "300"],
    "eval": ["--n", "1", "--tasks", "nll", "--context-len", "48", "--continuation-len", "4", "--budgets", "0.5",
             "--methods", "h2o", "--batch-size", "1"],
    "bench": ["--contexts", "32", "--steps", "16", "--warmup", "1", "--methods", "h2o:budget=0.5"],
}
DROPPED = {"bench": {"--compile"}}


def blocks() -> list[tuple[str, str]]:
    """(language, body) of every fenced block, in order."""
    return [(m.group(1), m.group(2)) for m in FENCE.finditer(README.read_text(encoding="utf-8"))]


def with_expected(language: str) -> list[tuple[str, str | None]]:
    """Blocks of `language`, each with the ```text block right after it (None if there is none)."""
    found = blocks()
    return [(body, found[i + 1][1] if i + 1 < len(found) and found[i + 1][0] == "text" else None)
            for i, (lang, body) in enumerate(found) if lang == language]


def matches(expected: str, actual: str) -> bool:
    norm = lambda s: " ".join(s.split())  # noqa: E731
    pattern = ".*?".join(re.escape(part) for part in norm(expected).split("..."))
    return re.fullmatch(pattern, norm(actual), re.S) is not None


def cli_lines() -> list[tuple[str, str | None]]:
    lines = []
    for body, expected in with_expected("bash"):
        commands = [line for line in body.splitlines() if line.startswith(("kvzoo ", "python -m kvzoo "))]
        runnable = [line for line in commands if not PLACEHOLDER.search(line)]
        lines += [(line, expected if len(commands) == 1 else None) for line in runnable]
    return lines


def test_the_readme_has_examples_and_templates_are_marked():
    assert len(with_expected("python")) >= 4 and len(cli_lines()) >= 8
    text = README.read_text(encoding="utf-8")
    assert "Lines with `<placeholders>` are templates" in text
    assert "../" not in text and "METHODS.md" not in text  # self-contained


def test_matching_of_expected_output():
    assert matches("The capital ... Paris.", "The capital of\nFrance is  Paris.")
    assert not matches("The capital ... Paris.", "The capital of France is Lyon.")
    assert matches("...\n8 ['length']", "Once upon a time\n8 ['length']")


def test_python_blocks_run_and_print_what_the_readme_shows(capsys):
    namespace: dict = {"__name__": "__readme__"}
    for i, (code, expected) in enumerate(with_expected("python")):
        exec(compile(code, f"README.md python block {i + 1}", "exec"), namespace)
        out = capsys.readouterr().out
        if expected is not None:
            assert matches(expected, out), f"block {i + 1} printed:\n{out}\nthe README shows:\n{expected}"


@pytest.mark.parametrize("line, expected", cli_lines(), ids=[" ".join(line.split()[:3]) for line, _ in cli_lines()])
def test_cli_lines_run_and_print_what_the_readme_shows(line, expected, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)  # --out directories and the like
    argv = shlex.split(line, comments=True)
    argv = argv[3:] if argv[:3] == ["python", "-m", "kvzoo"] else argv[1:]
    argv = [a for a in argv if a not in DROPPED.get(argv[0], ())] + SHORTER.get(argv[0], [])
    if argv[0] == "chat":
        monkeypatch.setattr("sys.stdin", io.StringIO("What is the capital of France?\n"))
    code = 0
    with contextlib.suppress(SystemExit):  # --version / --help exit through argparse
        code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.out.strip(), f"{line!r} printed nothing"
    if expected is not None:
        assert matches(expected, captured.out), f"{line!r} printed:\n{captured.out}\nthe README shows:\n{expected}"
