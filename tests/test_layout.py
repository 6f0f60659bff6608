"""The architecture note in sdbatch/__init__.py is the code's layout: every module is listed once,
and each imports only modules listed below it (so there are no import circles)."""

from __future__ import annotations

import ast
import functools
import re

from conftest import REPO

import sdbatch

PACKAGE = REPO / "sdbatch"


def listed_modules() -> list[str]:
    """The note's modules, top to bottom."""
    block = sdbatch.__doc__.split("A module imports only modules listed")[1]
    return re.findall(r"^    ([a-z_][a-z_.]*) {2,}", block, flags=re.MULTILINE)


@functools.cache
def modules_in_the_package() -> frozenset[str]:
    return frozenset(
        ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        for path in PACKAGE.rglob("*.py")
        if path.name != "__init__.py"
    )


@functools.cache
def imported(module: str) -> frozenset[str]:
    """The sdbatch modules `module` imports when it runs (not those named only for type hints)."""
    tree = ast.parse((PACKAGE / (module.replace(".", "/") + ".py")).read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            node.body = []  # what a type checker alone reads
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sdbatch"):
            base = node.module.removeprefix("sdbatch").lstrip(".")
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if base else alias.name)
                found.add(base)
        elif isinstance(node, ast.Import):
            found.update(a.name.removeprefix("sdbatch.") for a in node.names if a.name != "sdbatch")
    return frozenset(name for name in found if name in modules_in_the_package())


def test_every_module_is_in_the_note_once():
    listed = listed_modules()
    assert len(listed) == len(set(listed)), [m for m in listed if listed.count(m) > 1]
    assert set(listed) == modules_in_the_package()


def upward_imports(order: list[str]) -> set[tuple[str, str]]:
    """(module, imported) pairs where the imported module is not below the importer."""
    return {
        (module, name)
        for position, module in enumerate(order)
        for name in imported(module)
        if order.index(name) <= position
    }


def test_modules_import_only_modules_below_them():
    assert upward_imports(listed_modules()) == set()


def test_the_check_catches_upward_imports():
    upside_down = listed_modules()[::-1]
    assert {("cli", "errors"), ("generation", "spec")} <= upward_imports(upside_down)
