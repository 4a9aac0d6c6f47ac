"""The package's structure: one layer order, written once in the README, and every import obeys it.

Imports are read with `ast` from the source, so function-local imports and imports under TYPE_CHECKING
count like any other: a lower layer that reaches up lazily is still tied to what is above it.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "skipbench"
MAX_LINES = 500


def module_names() -> dict[str, Path]:
    """Dotted name -> file, for every module of the package (a package is named by its __init__.py)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def owner(name: str, modules: dict[str, Path]) -> str | None:
    """The package module an imported dotted name lives in (a name imported from a module is that module)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every skipbench module `name` imports, anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # `from skipbench.launch import plan` imports the module skipbench.launch.plan.
            targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source
                       for alias in node.names]
        else:
            continue
        found |= {owner(target, modules) for target in targets if target.split(".")[0] == "skipbench"}
    found.discard(None)
    found.discard(name)
    return found


def graph() -> dict[str, set[str]]:
    modules = module_names()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def readme_layers() -> list[list[str]]:
    """The README's layer list: one numbered item per layer, lowest first; each `name` in backticks is a module
    or package of skipbench (relative to it; `skipbench` itself is the package's __init__); what stands in
    parentheses describes it."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- layers -->(.*?)<!-- /layers -->", text, re.S)
    assert block, "README.md has no <!-- layers --> block"
    layers = []
    for item in re.split(r"\n\s*\d+\. ", "\n" + block[1].strip()):
        names = re.findall(r"`([a-z_.]+)`", re.sub(r"\([^)]*\)", "", item))
        if names:
            layers.append(names)
    return layers


def layer_of(module: str, layers: list[list[str]]) -> int | None:
    """The layer a module belongs to: the most specific name in the list that is it or a package above it."""
    relative = "skipbench" if module == "skipbench" else module.removeprefix("skipbench.")
    best, depth = None, -1
    for index, names in enumerate(layers):
        for name in names:
            if relative == name or (name != "skipbench" and relative.startswith(name + ".")):
                if name.count(".") > depth:
                    best, depth = index, name.count(".")
    return best


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in edges.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle() -> None:
    assert cycles(graph()) == []


def test_every_module_is_in_one_readme_layer() -> None:
    layers = readme_layers()
    assert len(layers) >= 10
    listed = [name for names in layers for name in names]
    assert len(listed) == len(set(listed)), "a name appears in two layers"
    modules = module_names()
    assert [name for name in modules if layer_of(name, layers) is None] == []
    # Every name the README lists exists, so the list cannot drift from the code unnoticed.
    assert [name for name in listed if owner("skipbench" if name == "skipbench" else f"skipbench.{name}", modules)
            != ("skipbench" if name == "skipbench" else f"skipbench.{name}")] == []


def test_imports_go_down_the_readme_layers() -> None:
    layers = readme_layers()
    upward = []
    for module, targets in graph().items():
        if module.startswith("skipbench.cli"):
            continue  # the top: it may import anything (lazily, to keep --help fast)
        for target in targets:
            if layer_of(target, layers) > layer_of(module, layers):
                upward.append(f"{module} (layer {layer_of(module, layers) + 1}) imports {target} "
                              f"(layer {layer_of(target, layers) + 1})")
    assert upward == []


LAZY_IMPORTERS = ("skipbench.cli", "skipbench.methods")  # --help must not load torch (see the README)


def test_only_the_cli_and_the_registry_import_inside_functions() -> None:
    modules = module_names()
    found = []
    for name, path in modules.items():
        if name.startswith(LAZY_IMPORTERS):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    if isinstance(inner, (ast.Import, ast.ImportFrom)):
                        names = [alias.name for alias in inner.names] if isinstance(inner, ast.Import) else [
                            inner.module or ""]
                        if inner.__class__ is ast.ImportFrom and inner.level or any(
                                n.split(".")[0] == "skipbench" for n in names):
                            found.append(f"{name}:{inner.lineno}")
    assert found == []


def test_no_module_over_500_lines() -> None:
    long = {name: len(path.read_text().splitlines()) for name, path in module_names().items()}
    assert {name: lines for name, lines in long.items() if lines > MAX_LINES} == {}


def test_package_inits_only_reexport() -> None:
    """A package's __init__.py holds imports, __all__, a docstring and constants (the version), no logic."""
    for path in PACKAGE.rglob("__init__.py"):
        for node in ast.parse(path.read_text()).body:
            allowed = isinstance(node, (ast.Import, ast.ImportFrom)) or (
                isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)) or (
                isinstance(node, ast.Assign) and isinstance(node.value, (ast.Constant, ast.List, ast.Tuple))
                and all(isinstance(element, ast.Constant) for element in getattr(node.value, "elts", [])))
            assert allowed, f"{path.relative_to(ROOT)} line {node.lineno}: {ast.dump(node)[:80]}"


@pytest.mark.parametrize("source, expected", [
    ("import skipbench.spec", {"skipbench.spec"}),
    ("from skipbench.launch import plan", {"skipbench.launch.plan"}),
    ("from skipbench.launch import run", {"skipbench.launch"}),
    ("def f():\n    from skipbench.summary import load_summary", {"skipbench.summary"}),
    ("if TYPE_CHECKING:\n    from skipbench.store import RunStore", {"skipbench.store"}),
    ("from . import spec", {"skipbench.spec"}),
    ("import numpy", set()),
])
def test_import_reader_sees_every_kind_of_import(tmp_path, source: str, expected: set[str]) -> None:
    path = tmp_path / "probe.py"
    path.write_text(source)
    assert imports_of("skipbench.probe", path, module_names()) == expected


def test_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
