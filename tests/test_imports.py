"""The import graph of docs/architecture.md: no circles, the schema a leaf, a gossip actor
without the federated strategies."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] == "strategies":
        parts = ["fedens", "strategies", *parts[1:]]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def runtime_imports(path: Path) -> set[str]:
    """fedens modules ``path`` imports anywhere (module level or in functions), except under
    ``if TYPE_CHECKING:``."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                found.add(child.module)
                found.update(f"{child.module}.{a.name}" for a in child.names)
            visit(child)

    visit(ast.parse(path.read_text()))
    return {m for m in found if m.startswith("fedens")}


def graph() -> dict[str, set[str]]:
    files = [*(ROOT / "fedens").rglob("*.py"), *(ROOT / "strategies").rglob("*.py")]
    names = {module_name(f): f for f in files}
    # an edge to a package means its __init__; "from pkg import mod" to the module itself
    return {n: {m for m in runtime_imports(f) if m in names and m != n} for n, f in names.items()}


def test_no_import_circles() -> None:
    g = graph()
    # a package importing its own submodules (a registry's __init__ loading its entries) is how a
    # package is built, not a circle: drop the parent -> child edges
    g = {n: {m for m in deps if not m.startswith(n + ".")} for n, deps in g.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(g.get(n, ())):
            if state.get(m) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(m):] + [m]))
            if m not in state:
                dfs(m)
        stack.pop()
        state[n] = 2

    for n in sorted(g):
        if n not in state:
            dfs(n)


def test_leaves_stay_leaves() -> None:
    g = graph()
    assert g["fedens.scenario"] <= {"fedens.options", "fedens.decentralized.topology"}
    assert g["fedens.options"] == set() and g["fedens.registry"] == set()
    assert g["fedens.algorithms.vca"] <= {"fedens.options"} and g["fedens.algorithms.arrays"] == set()


def test_a_gossip_actor_imports_no_federated_strategy_and_the_schema_no_torch() -> None:
    code = ("import sys, fedens.client_app, fedens.decentralized.node, fedens.decentralized.rules; "
            "print(any(m.startswith('fedens.strategies') for m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
    code = "import sys, fedens.scenario; print('torch' in sys.modules, 'fedens.learners' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split() == ["False", "False"]
