"""The layering in docs/architecture.md, enforced: every `src` module imports only modules of its own room or of
rooms in lower layers (imports inside functions included), and the module import graph has no cycle."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
# room -> layer, bottom to top (docs/architecture.md)
LAYERS = {
    "errors": 0, "atomic": 0, "checkpoint": 0, "run_files": 0, "plotting": 0,
    "wkv": 1, "rwkv6": 1, "loss": 1, "data": 1, "quant": 1,
    "adapters": 2,
    "model": 3, "config": 3, "export": 3,
    "evaluation": 4,
    "training": 5,
    "diagnostics": 6,
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _room(module: str) -> str:
    return module.split(".")[1]


def _imports() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in sorted(SRC.rglob("*.py")):
        name = _module_name(path)
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("src"):
                targets.add(node.module)
            elif isinstance(node, ast.Import):
                targets.update(a.name for a in node.names if a.name.startswith("src."))
        graph[name] = {t for t in targets if t != "src"}
    return graph


def test_every_room_is_placed_in_a_layer() -> None:
    rooms = {_room(m) for m in _imports() if m != "src"}
    assert rooms == set(LAYERS), f"rooms without a layer: {rooms - set(LAYERS)}; stale: {set(LAYERS) - rooms}"


@pytest.mark.parametrize("module", sorted(m for m in _imports() if m != "src"))
def test_no_module_imports_upward(module: str) -> None:
    for target in _imports()[module]:
        assert LAYERS[_room(target)] <= LAYERS[_room(module)], f"{module} imports {target}, a higher layer"


def test_no_import_cycle() -> None:
    graph = _imports()
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            nxt = nxt if nxt in graph else nxt.rsplit(".", 1)[0]  # "from src.x import y" where y is a name
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path, node, nxt]))
            if nxt in graph and not state.get(nxt):
                visit(nxt, [*path, node])
        state[node] = 2

    for module in sorted(graph):
        if not state.get(module):
            visit(module, [])
