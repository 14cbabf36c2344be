"""The mutation check (tools/mutants.py) is only as good as its snippets: each must still occur exactly once
in its file, or the mutant silently tests nothing after a refactor (two had gone stale before this test)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_mutant_snippet_occurs_exactly_once():
    spec = importlib.util.spec_from_file_location("kvzoo_mutants", ROOT / "tools" / "mutants.py")
    assert spec is not None and spec.loader is not None
    mutants = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mutants  # its dataclasses look their module up
    spec.loader.exec_module(mutants)
    stale = {m.name: (ROOT / m.file).read_text().count(m.original) for m in mutants.MUTANTS
             if (ROOT / m.file).read_text().count(m.original) != 1}
    assert not stale, f"mutant snippets not found exactly once (name: count): {stale}"
