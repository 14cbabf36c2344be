"""Imports go one way: the models use generation and loading, never the reverse (not even inside a function),
so there is no circle between the models, generation and loading."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import kvzoo

PACKAGE = Path(kvzoo.__file__).parent
BELOW_THE_MODELS = ["generate.py", "likelihood.py", "conversation.py", "loading.py", "cache/io.py", "cache/slots.py"]


def runtime_imports(path: Path) -> set[str]:
    """Every module imported by `path`, at top level or inside functions, except under `if TYPE_CHECKING:`."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


@pytest.mark.parametrize("name", BELOW_THE_MODELS)
def test_generation_and_loading_never_import_the_models(name):
    imported = runtime_imports(PACKAGE / name)
    assert not {m for m in imported if m.startswith("kvzoo.models")}, imported


def test_the_checker_sees_imports_inside_functions():
    assert "kvzoo.models" in runtime_imports(PACKAGE / "models" / "base.py")  # `class_for` imports it in a function
