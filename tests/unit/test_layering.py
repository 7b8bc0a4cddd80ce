"""The package's import direction: models <- checkpoints <- sampling <- eval <- commands, and no cycles.

Every ``import`` of every module counts, those inside functions too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import lit_star

PACKAGE = Path(lit_star.__file__).parent

# Which top-level parts of lit_star each part may import (itself always allowed).
ALLOWED = {
    "models": set(),
    "checkpoints": {"models"},
    # data: the reference's image transforms (models.edit_source), shared with the sampler.
    "data": {"models"},
    "worlds": {"data"},
    "distributed": {"models"},
    "sampling": {"models", "checkpoints", "data"},
    "eval": {"models", "checkpoints", "data", "worlds", "sampling"},
    # LightningModules: models and loaders, plus the data layer, sharding plans and pure metrics.
    "modules": {"models", "checkpoints", "data", "distributed", "eval"},
    "thread_budget": set(),
    "resume": {"data"},
    "training": {"data", "thread_budget", "resume"},
    # Sweep expansion, launching and collection: fit arguments are checked with the training CLI's parser.
    "sweeps": {"training", "thread_budget"},
    "benchmarks": {"models", "checkpoints", "data", "worlds", "sampling", "distributed", "modules"},
    # distributed: the curriculum's preflight checks the compile toolchain a fit step will need.
    "commands": {"models", "checkpoints", "data", "worlds", "sampling", "eval", "modules", "benchmarks",
                 "thread_budget", "training", "sweeps", "distributed"},
    "cli": {"training", "commands"},
    "__main__": {"cli"},
    "__init__": set(),
    # Research probes may import the core; nothing imports them.
    "experiments": {"models", "checkpoints", "data", "worlds", "sampling", "eval", "modules", "commands"},
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.startswith("lit_star.")}


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}


def _part(module: str) -> str:
    return module.split(".")[1] if "." in module else "__init__"


def test_every_import_points_down_the_layers():
    graph = _graph()
    assert {_part(m) for m in graph} <= set(ALLOWED), f"unlisted parts: {sorted({_part(m) for m in graph} - set(ALLOWED))}"
    wrong = sorted(
        f"{module} imports {target}"
        for module, targets in graph.items()
        for target in targets
        if _part(target) != _part(module) and _part(target) not in ALLOWED[_part(module)]
    )
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_no_import_cycles():
    graph = _graph()
    cycles, state = [], {}

    def visit(module: str, stack: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target, stack + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)
