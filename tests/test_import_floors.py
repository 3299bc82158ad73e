"""The house's floors (README "Where things are"): nothing imports upward, and no modules import each other.

toolkit, atomicio and kernels are the ground floor; patcher and converters stand on it side by side and
never import each other; launch is on top. bench and tests may import anything, so they are not checked.
Every import counts, including those inside functions: a lazy import still ties the floors together.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FLOOR = {"toolkit": 0, "atomicio": 0, "kernels": 0, "patcher": 1, "converters": 1, "launch": 2}


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, module: str, known: set[str]) -> set[str]:
    """The project modules `path` imports (a `from package import submodule` counts the submodule)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            found.add(source)
            found.update(f"{source}.{alias.name}" for alias in node.names if f"{source}.{alias.name}" in known)
    return {name for name in found if name.split(".")[0] in FLOOR and name != module}


def _graph() -> dict[str, set[str]]:
    files = {_module_name(path): path for package in FLOOR for path in (REPO / package).rglob("*.py")}
    known = set(files)
    graph = {}
    for module, path in files.items():
        targets = set()
        for name in _imports(path, module, known):
            # `from converters.hf.safetensors_io import X` names a module; `import a.b.c` may name a package
            while name not in known and "." in name:
                name = name.rpartition(".")[0]
            if name in known:
                targets.add(name)
        graph[module] = targets
    return graph


def test_no_package_imports_upward_or_sideways():
    wrong = []
    for module, targets in _graph().items():
        home = module.split(".")[0]
        for target in targets:
            there = target.split(".")[0]
            if there != home and FLOOR[there] >= FLOOR[home]:
                wrong.append(f"{module} -> {target}")
    assert not wrong, "imports that go up or across a floor:\n" + "\n".join(sorted(wrong))


def test_no_module_cycle():
    graph = _graph()
    done: set[str] = set()
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            cycles.append(" -> ".join(path[path.index(module):] + [module]))
            return
        if module in done:
            return
        for target in sorted(graph[module]):
            # a module importing its own package's __init__ is not a cycle in practice (the package loads first)
            if not module.startswith(target + "."):
                visit(target, path + [module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])
    assert not cycles, "modules that import each other:\n" + "\n".join(cycles)
