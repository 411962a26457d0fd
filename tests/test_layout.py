"""The architecture's rules that import contracts cannot see (``lint-imports`` checks the
imports themselves; see docs/architecture.md)."""

from __future__ import annotations

import ast
import pathlib
import re
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


def private_attributes(path: pathlib.Path) -> List[str]:
    """Every ``anything._name`` in ``path``: a private attribute of a module or an object."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return sorted(f"{path.name} line {node.lineno}: {ast.unparse(node)}" for node in ast.walk(tree)
                  if isinstance(node, ast.Attribute) and node.attr.startswith("_")
                  and not node.attr.startswith("__"))


def test_the_command_line_uses_only_public_names() -> None:
    """The ``kaibantrace`` command works through what ``Telemetry`` and the other layers
    offer in public (``send_waiting``, ``drain``, ``delivery_status``, ``app_id``, ...),
    never a client's private state, so the layers below can change without breaking it."""
    assert [use for path in sorted((PACKAGE / "_cli").glob("*.py"))
            for use in private_attributes(path)] == []


def test_the_public_names_check_finds_a_private_attribute(tmp_path: pathlib.Path) -> None:
    """A control: an object's private attribute is found too, not only a module's."""
    sample = tmp_path / "sample.py"
    sample.write_text("def f(client):\n    return client._route()\n", encoding="utf-8")
    assert private_attributes(sample) == ["sample.py line 2: client._route"]


MAX_MODULE_LINES = 400
MAX_CLASS_LINES = 250


def test_no_module_or_class_is_too_long_to_read() -> None:
    """Small modules, each with one job: none over 400 lines, no class over 250, so a
    newcomer can read any room of the package in one sitting."""
    too_long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        name = path.relative_to(PACKAGE)
        if len(text.splitlines()) > MAX_MODULE_LINES:
            too_long.append(f"{name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef) and node.end_lineno is not None:
                length = node.end_lineno - node.lineno + 1
                if length > MAX_CLASS_LINES:
                    too_long.append(f"{name}: class {node.name}, {length} lines")
    assert too_long == []


def _contract(name: str) -> str:
    """The text of one import contract in pyproject.toml (read as text: Python 3.9 and 3.10
    have no TOML reader, and the contract's strings are all that is needed)."""
    text = (PACKAGE.parent / "pyproject.toml").read_text(encoding="utf-8")
    start = text.index(f'name = "{name}"')
    end = text.find("[[tool.importlinter.contracts]]", start)
    return text[start:end if end != -1 else len(text)]


def test_the_transport_contract_names_every_other_module_of_delivery() -> None:
    """A module added to ``_delivery`` is forbidden to the transport too, or this fails:
    the contract lists them by name, so a new one could otherwise slip past it."""
    contract = _contract("The transport imports nothing above it")
    forbidden = contract[contract.index("forbidden_modules"):]
    listed = set(re.findall(r'"kaibantrace\._delivery\.(\w+)"', forbidden))
    modules = {path.stem for path in (PACKAGE / "_delivery").glob("*.py")}
    assert listed == modules - {"__init__", "transport"}


def test_the_contracts_list_no_exceptions() -> None:
    """Every import follows the contracts: none is waved through with ``ignore_imports``."""
    text = (PACKAGE.parent / "pyproject.toml").read_text(encoding="utf-8")
    assert "ignore_imports" not in text[text.index("[tool.importlinter]"):]
