"""docs/architecture.md's promises about the code's shape, kept true: no import cycle in
either package, and no module reaching into another module's private (``_name``) names."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"phoenix_operator": ROOT / "operator" / "phoenix_operator",
            "phoenix_trainer": ROOT / "trainer_image" / "phoenix_trainer"}


def modules() -> dict[str, tuple[Path, ast.Module]]:
    out = {}
    for pkg, root in PACKAGES.items():
        for path in root.rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join((pkg, *parts[:-1])) if parts[-1] == "__init__" else ".".join((pkg, *parts))
            out[name] = (path, ast.parse(path.read_text()))
    return out


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(mods) -> dict[str, set[str]]:
    """Each module's imports of modules of the two packages (lazy ones included)."""
    graph: dict[str, set[str]] = {}
    for name, (path, tree) in mods.items():
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                target = _resolve(name, path.name == "__init__.py", node)
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    deps.add(sub if sub in mods else target)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
        graph[name] = {d for d in deps if d in mods and d != name}
    return graph


def test_no_import_cycle_in_either_package():
    graph = imports(modules())
    # a package's __init__ importing its own submodules (lazy re-exports) is not a cycle
    graph = {m: {d for d in deps if not (m == d.rsplit(".", 1)[0] or d == m.rsplit(".", 1)[0])}
             for m, deps in graph.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(m, stack):
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles


def test_no_module_imports_another_modules_private_names():
    found = []
    for name, (path, tree) in modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("phoenix")):
                found += [f"{path.relative_to(ROOT)}:{node.lineno} {a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]
    assert not found, found
