"""The layers of the repository, read from the code's own imports (docs/architecture.md draws them):
preresnet.kernels <- preresnet <- bench, train.py, eval.py, hubconf.py, with
no import circle anywhere, function-local imports included, and no module over 600 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"preresnet.kernels": 0, "preresnet": 1, "bench": 2, "train": 2, "eval": 2, "hubconf": 2}
MAX_LINES = 600
# what a product module may import inside a function: optional dependencies, DALI and Triton (the
# kernels: preresnet.models' fused path and the kernel package's own names load it on first use, so
# that Triton is optional and finds TRITON_INTERPRET set before it is imported)
DEFERRED_OK = ("nvidia", "triton", ".kernels", ".preact_conv")


def module_files() -> dict[str, Path]:
    files = {}
    for path in [*ROOT.glob("preresnet/**/*.py"), *ROOT.glob("bench/*.py"),
                 *(ROOT / name for name in ("train.py", "eval.py", "hubconf.py"))]:
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1].startswith("test_") or "tests" in parts or parts[-1] == "conftest":
            continue
        if parts[-1] == "__init__":
            parts = parts[:-1]
        files[".".join(parts)] = path
    return files


def imports(name: str, path: Path, known: dict[str, Path]) -> list[tuple[str, bool, int]]:
    """(module of this repository imported, whether inside a function, line) for every import in path."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    inner = {id(node) for function in ast.walk(tree) if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef))
             for node in ast.walk(function) if isinstance(node, (ast.Import, ast.ImportFrom))}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            # `from . import x` imports the submodule x, not the package
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.append((target, id(node) in inner, node.lineno))
    return found


def layer(name: str) -> int:
    return max(rank for prefix, rank in LAYERS.items() if name == prefix or name.startswith(prefix + "."))


@pytest.fixture(scope="module")
def graph():
    known = module_files()
    return known, {name: imports(name, path, known) for name, path in known.items()}


def test_imports_only_point_down(graph):
    known, edges = graph
    upward = [f"{name} (line {line}) imports {target}" for name, found in edges.items() for target, _, line in found
              if layer(target) > layer(name)]
    assert not upward, upward


def test_no_import_circles(graph):
    """Tarjan's strongly connected components of the import graph: each must be one module."""
    known, edges = graph
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target, _, _ in edges[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                circles.append(sorted(component))

    for node in known:
        if node not in index:
            visit(node)
    assert not circles, circles


def test_the_registry_is_a_leaf(graph):
    _, edges = graph
    assert {target for target, _, _ in edges["preresnet.registry"]} <= {"preresnet.errors", "preresnet"}
    assert {target for target, _, _ in edges["preresnet.wording"]} <= {"preresnet"}


def test_the_kernels_import_nothing_of_the_package_above_them(graph):
    _, edges = graph
    above = [(name, target) for name, found in edges.items() if name.startswith("preresnet.kernels")
             for target, _, _ in found if not target.startswith("preresnet.kernels") and target != "preresnet"]
    assert not above, above


def test_product_modules_defer_only_optional_imports():
    """Inside a function, a preresnet module imports only an optional dependency (deferred so that
    the package works without it), never a module of its own to step round a circle."""
    deferred = []
    for path in ROOT.glob("preresnet/**/*.py"):
        tree = ast.parse(path.read_text())
        for function in ast.walk(tree):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom):
                    names = ["." * node.level + node.module] if node.module else \
                        ["." * node.level + alias.name for alias in node.names]
                else:
                    continue
                deferred += [f"{path.relative_to(ROOT)}:{node.lineno} {name}" for name in names
                             if not name.startswith(DEFERRED_OK)]
    assert not deferred, deferred


def test_no_module_is_over_600_lines():
    long = {str(path.relative_to(ROOT)): n for path in module_files().values()
            if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_the_installed_package_holds_no_tools_or_bench():
    setup = (ROOT / "setup.py").read_text()
    assert "package_dir" not in setup and 'include=["preresnet", "preresnet.*"]' in setup
