"""The mutation check (tools/mutants.py) is only as good as its snippets: each must still occur exactly once
in its file, or the mutant silently tests nothing after a refactor (two had gone stale before this test)."""

from __future__ import annotations

from pathlib import Path

from tests.tool_loading import load_tool

ROOT = Path(__file__).resolve().parent.parent


def test_every_mutant_snippet_occurs_exactly_once():
    mutants = load_tool("mutants")
    stale = {m.name: (ROOT / m.file).read_text().count(m.original) for m in mutants.MUTANTS
             if (ROOT / m.file).read_text().count(m.original) != 1}
    assert not stale, f"mutant snippets not found exactly once (name: count): {stale}"
