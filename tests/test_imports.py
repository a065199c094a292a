"""The import contract: the package's modules import each other without a cycle, at the top of the file.

An import inside a function is for a heavy optional library (matplotlib, xgboost, Pillow), never to dodge
a cycle: a cycle means a piece sits in the wrong module. This test reads every module's imports with
``ast`` (what the installed package holds: ``passes/`` and ``targets/`` as ``ohq_tvm.passes`` and
``ohq_tvm.targets``) and fails naming the cycle, or the function that imports a module of the package.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import pkgutil
from collections.abc import Iterator, Mapping

import pytest

import ohq_tvm

PACKAGE = "ohq_tvm"

# (importing module, function, imported module) -> why it may import inside a function. Keep it short.
ALLOWED_FUNCTION_IMPORTS = {
    ("ohq_tvm", "__getattr__", "ohq_tvm.pipeline"): "`import ohq_tvm` loads no TVM until the API is used",
    ("ohq_tvm", "__getattr__", "ohq_tvm.board"): "`import ohq_tvm` loads no TVM until the API is used",
    ("ohq_tvm", "__getattr__", "ohq_tvm.config"): "`import ohq_tvm` loads no TVM until the API is used",
}


def package_sources() -> dict[str, str]:
    """Every module of the installed package (packages included) by dotted name, as source text."""
    names = [PACKAGE] + [info.name for info in pkgutil.walk_packages(ohq_tvm.__path__, f"{PACKAGE}.")]
    sources = {}
    for name in names:
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.origin is not None, f"{name} has no source file"
        with open(spec.origin, encoding="utf-8") as file:
            sources[name] = file.read()
    return sources


def _is_package(name: str, sources: Mapping[str, str]) -> bool:
    return any(other.startswith(f"{name}.") for other in sources)


def _imported(module: str, node: ast.Import | ast.ImportFrom, sources: Mapping[str, str]) -> list[str]:
    """The modules of the package that ``node`` (in ``module``) loads, with the packages that hold them
    (importing ``a.b.c`` runs ``a.b``'s ``__init__``), leaving out ``module``'s own packages (running
    already)."""
    if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
    else:
        if node.level:
            base = module if _is_package(module, sources) else module.rpartition(".")[0]
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            stem = f"{base}.{node.module}" if node.module else base
        else:
            stem = node.module or ""
        targets = [stem] + [f"{stem}.{alias.name}" for alias in node.names]
    found = []
    for target in targets:
        parts = target.split(".")
        for end in range(1, len(parts) + 1):
            name = ".".join(parts[:end])
            running = module == name or module.startswith(f"{name}.")
            if name in sources and not running and name not in found:
                found.append(name)
    return found


def _type_checking_only(node: ast.stmt) -> bool:
    test = getattr(node, "test", None) if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(body: list[ast.stmt], function: str | None) -> Iterator[tuple[str | None, ast.stmt]]:
    """``(enclosing function or None, import statement)`` for every import ``body`` runs, at any depth;
    blocks under ``if TYPE_CHECKING:`` never run."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield function, node
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield from _imports(node.body, f"{function}.{node.name}" if function else node.name)
        elif not _type_checking_only(node):
            for field in ("body", "orelse", "finalbody", "handlers", "cases"):
                inner = getattr(node, field, None)
                if isinstance(inner, list):
                    yield from _imports(inner, function)


def import_graph(sources: Mapping[str, str]) -> tuple[dict[str, set[str]], list[tuple[str, str, str, int]]]:
    """The package's modules each module loads when it is imported, and every import of a package module
    made inside a function as ``(module, function, imported module, line)``."""
    graph: dict[str, set[str]] = {name: set() for name in sources}
    in_functions = []
    for module, source in sources.items():
        for function, node in _imports(ast.parse(source).body, None):
            for target in _imported(module, node, sources):
                if function is None:
                    graph[module].add(target)
                else:
                    in_functions.append((module, function, target, node.lineno))
    return graph, in_functions


def find_cycle(graph: Mapping[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or ``None``; modules and edges taken in sorted order."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                return [*path[path.index(target) :], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[module] = "done"
        path.pop()
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


# Deprecated aliases of renamed modules: importing them warns, by design (tests/test_build_alias.py).
DEPRECATED_ALIASES = {"ohq_tvm.build": "ohq_tvm.codegen"}


@pytest.fixture(scope="module")
def sources() -> dict[str, str]:
    return package_sources()


@pytest.mark.filterwarnings("ignore:ohq_tvm.build is deprecated:DeprecationWarning")
def test_every_module_imports(sources):
    for name in sources:
        if name != f"{PACKAGE}.__main__":  # runs the command
            importlib.import_module(name)
    assert {"ohq_tvm.calibration", "ohq_tvm.samples", "ohq_tvm.passes.apply_plan"} <= set(sources)
    assert "ohq_tvm.targets.registry" in sources
    assert {"ohq_tvm.codegen", "ohq_tvm.codegen.verify", *DEPRECATED_ALIASES} <= set(sources)
    for alias, new in DEPRECATED_ALIASES.items():  # a plain module, not a package holding copies
        assert not _is_package(alias, sources) and _is_package(new, sources)


def test_the_package_has_no_import_cycle(sources):
    graph, _ = import_graph(sources)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or ())


def test_no_function_imports_a_module_of_the_package(sources):
    _, in_functions = import_graph(sources)
    found = {(module, function, target): line for module, function, target, line in in_functions}
    unexplained = [
        f"{module}.{function} (line {line}) imports {target}"
        for (module, function, target), line in sorted(found.items())
        if (module, function, target) not in ALLOWED_FUNCTION_IMPORTS
    ]
    assert not unexplained, (
        "import these at the top of the module; if that makes a cycle, move the piece that causes it: "
        + "; ".join(unexplained)
    )
    stale = sorted(set(ALLOWED_FUNCTION_IMPORTS) - set(found))
    assert not stale, f"allowed function-level imports that no longer exist: {stale}"


def test_the_checks_catch_a_cycle_and_a_function_level_import():
    fake = {
        "ohq_tvm": "",
        "ohq_tvm.plan": "from .layers import LayerInfo\n",
        "ohq_tvm.layers": "from .passes.layer_id import layer_bindings\n",
        "ohq_tvm.passes": "from .apply_plan import ApplyPlan\n",
        "ohq_tvm.passes.layer_id": "import tvm\n",
        "ohq_tvm.passes.apply_plan": (
            "from typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n    from ohq_tvm.plan import Plan\n"
            "def error():\n    from ohq_tvm.plan import PlanError\n"
        ),
    }
    graph, in_functions = import_graph(fake)
    assert graph["ohq_tvm.layers"] == {"ohq_tvm.passes", "ohq_tvm.passes.layer_id"}
    assert find_cycle(graph) is None
    assert in_functions == [("ohq_tvm.passes.apply_plan", "error", "ohq_tvm.plan", 5)]
    fake["ohq_tvm.passes.apply_plan"] = "from ..plan import PlanError\n"
    cycle = find_cycle(import_graph(fake)[0])
    assert cycle == [
        "ohq_tvm.layers",
        "ohq_tvm.passes",
        "ohq_tvm.passes.apply_plan",
        "ohq_tvm.plan",
        "ohq_tvm.layers",
    ]
