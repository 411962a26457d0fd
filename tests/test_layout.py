"""The architecture's rules that import contracts cannot see (``lint-imports`` checks the
imports themselves; see docs/architecture.md)."""

from __future__ import annotations

import ast
import pathlib
from typing import List

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "kaibantrace"


def private_uses(path: pathlib.Path) -> List[str]:
    """``module._name`` uses in ``path`` of the private names of modules it imports."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    modules = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            modules.update(alias.asname or alias.name for alias in node.names)
    return sorted(f"line {node.lineno}: {node.value.id}.{node.attr}" for node in ast.walk(tree)
                  if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                  and node.value.id in modules and node.attr.startswith("_")
                  and not node.attr.startswith("__"))


def test_the_testing_helpers_use_only_public_names_of_the_machinery() -> None:
    """``kaibantrace.testing`` is what authors' tests lean on: it goes through functions the
    client offers, not its private state, so the client can change without breaking it."""
    assert private_uses(PACKAGE / "testing.py") == []


def test_the_check_finds_a_private_use(tmp_path: pathlib.Path) -> None:
    """A control: the same check does find one."""
    sample = tmp_path / "sample.py"
    sample.write_text("from .x import client\nclient._captures.append(1)\n", encoding="utf-8")
    assert private_uses(sample) == ["line 2: client._captures"]
