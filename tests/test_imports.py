"""calicache's own import graph, read from the source (function-local imports included): no
cycles, and the layers point one way: models <- adapters <- cache <- calibration <- bench <- commands."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "calicache"
# A lower layer never imports a higher one; training sits beside calibration (both use the cache,
# neither is used by it), tuning beside bench. Modules outside these packages (diffusion, metrics, data, ...) are
# not ranked.
LAYERS = {"models": 0, "adapters": 1, "cache": 2, "calibration": 3, "training": 3, "bench": 4, "tuning": 4,
          "commands": 5, "cli": 5}


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _resolve(name: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute module a relative `from ... import` names."""
    if not node.level:
        return node.module or ""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    base = package.split(".")
    base = base[: len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> dict[str, set[str]]:
    """module -> the calicache modules it imports (a package stands for its __init__)."""
    mods = modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, path, node)
                # `from . import x` / `from .pkg import mod` import submodules where they exist.
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for target in targets:
                while target and target not in mods:  # `import calicache.cache.engine` -> that module
                    target = target.rpartition(".")[0]
                if target.startswith(PACKAGE) and target != name:
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (cycle := visit(n)) is not None:
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)) is not None:
            return cycle
    return None


def layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


def test_the_graph_sees_relative_local_and_absolute_imports():
    g = import_graph()
    assert "calicache.cache.engine" in g["calicache.cache"]  # from .engine import ...
    assert "calicache.distributed" in g["calicache.commands.common"]  # function-local `from .. import distributed`
    assert "calicache.cache.methods" in g["calicache.cache.engine"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_layers_point_one_way():
    bad = sorted(f"{m} -> {n}" for m, targets in import_graph().items() for n in targets
                 if layer(m) is not None and layer(n) is not None and layer(n) > layer(m))
    assert not bad, "a lower layer imports a higher one:\n" + "\n".join(bad)


@pytest.mark.parametrize("module", ["calicache.metrics.frechet", "calicache.metrics.fidelity"])
def test_metrics_depend_on_nothing_of_ours_but_images(module):
    allowed = {"calicache.images", "calicache.metrics"}
    assert {n for n in import_graph()[module] if not n.startswith("calicache.metrics")} <= allowed
