"""What `pip install strongroom` gives a user: every module `src/` imports comes with the package.

The imports are read from the source's syntax tree, not from a hand-kept list, so a new import of an
undeclared distribution fails here instead of in a user's `ModuleNotFoundError` at start-up. A
distribution declared only in an optional extra may be imported only inside a function (through
`strongroom.extras.require`), so the server starts without it.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import re
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from strongroom import extras

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "strongroom"

# Declared but never imported by name: loaded by another library at run time.
LOADED_BY_NAME = {
    "aiosqlite": "SQLAlchemy's sqlite+aiosqlite dialect imports it from the database URL",
}


@dataclass(frozen=True)
class Import:
    module: str  # top-level name, e.g. "sqlalchemy"
    path: Path
    line: int
    module_level: bool  # executed when the module is imported (not inside a function)


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9._-]+", requirement)
    assert match, requirement
    return _normalise(match.group(0))


def _declared() -> tuple[set[str], dict[str, set[str]]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {_requirement_name(r) for r in project["dependencies"]}
    optional = {
        extra: {_requirement_name(r) for r in requirements}
        for extra, requirements in project.get("optional-dependencies", {}).items()
    }
    return core, optional


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, path: Path, *, module_level: bool = True) -> Iterator[Import]:
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(alias.name.split(".")[0], path, node.lineno, module_level)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield Import(node.module.split(".")[0], path, node.lineno, module_level)
        elif isinstance(node, ast.If) and _is_type_checking(node):
            continue  # annotations only: never executed
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            yield from _imports(node, path, module_level=False)
        else:
            yield from _imports(node, path, module_level=module_level)


@functools.cache
def third_party_imports() -> list[Import]:
    found = []
    for path in sorted(SRC.rglob("*.py")):
        for imported in _imports(ast.parse(path.read_text(), str(path)), path):
            if imported.module in sys.stdlib_module_names or imported.module in {"strongroom", "__future__"}:
                continue
            found.append(imported)
    return found


@functools.cache
def _installed() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


def _distributions(module: str) -> set[str]:
    return {_normalise(d) for d in _installed().get(module, [])}


def test_every_import_of_src_is_a_declared_dependency():
    core, optional = _declared()
    in_extras = set().union(*optional.values())
    undeclared = []
    for imported in third_party_imports():
        distributions = _distributions(imported.module)
        where = f"{imported.path.relative_to(ROOT)}:{imported.line} imports {imported.module}"
        if not distributions:
            undeclared.append(f"{where}, which no installed distribution provides")
        elif not distributions & (core | in_extras):
            undeclared.append(f"{where} from {sorted(distributions)}, not in pyproject.toml")
    assert undeclared == []


def test_an_optional_dependency_is_never_imported_when_a_module_loads():
    core, optional = _declared()
    only_optional = set().union(*optional.values()) - core
    eager = [
        f"{i.path.relative_to(ROOT)}:{i.line} imports {i.module} at module level"
        for i in third_party_imports()
        if i.module_level and _distributions(i.module) & only_optional
    ]
    assert eager == []


def test_every_core_dependency_is_used():
    core, _ = _declared()
    imported = set().union(*(_distributions(i.module) for i in third_party_imports()))
    unused = core - imported - set(LOADED_BY_NAME)
    assert unused == set()


def test_the_detector_sees_eager_lazy_and_type_checking_imports():
    source = (
        "import httpx\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import matplotlib\n"
        "def f():\n    import orjson\nclass C:\n    import structlog\n"
    )
    found = {(i.module, i.module_level) for i in _imports(ast.parse(source), Path("x.py"))}
    assert found == {("httpx", True), ("typing", True), ("orjson", False), ("structlog", True)}


def test_a_missing_extra_names_it():
    with pytest.raises(extras.MissingExtra, match=r"pip install 'strongroom\[bench\]'"):
        extras.require("strongroom_no_such_module", extra="bench", feature="strongroom bench --plot")
    assert extras.require("json", extra="bench", feature="x").dumps([1]) == "[1]"
