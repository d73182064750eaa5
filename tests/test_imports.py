"""The house's import rules, read from the source: imports run one way and form no cycle.

Layers, bottom to top: ``errors``/``utils``/``registry`` -> ``models`` -> ``convert``/``checkpoint``
-> ``data`` -> ``train`` -> entry points (``main``, ``recipes``, tools). A module may import its own
layer or lower ones; ``data``, ``models``, ``convert`` and ``registry`` never import ``train``.
Every import counts, including those inside functions (a lazy import hides a cycle, it does not
remove it).
"""

from __future__ import annotations

import ast
from pathlib import Path

JVIT = Path(__file__).resolve().parents[1] / "jvit"

# Lower number = lower layer. A module's layer is that of its longest matching prefix.
LAYERS = {
    "jvit.errors": 0,
    "jvit.utils": 1,
    "jvit.registry": 1,
    "jvit.models": 2,
    "jvit.convert": 3,
    "jvit.checkpoint": 3,
    "jvit.data": 4,
    "jvit.train": 5,
}
NEVER_IMPORT_TRAIN = ("jvit.data", "jvit.models", "jvit.convert", "jvit.registry")


def module_name(path: Path) -> str:
    parts = path.relative_to(JVIT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every jvit module ``path`` imports (``from jvit.x import y`` counts as ``jvit.x.y`` when that
    is a module, else ``jvit.x``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "jvit"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "jvit":
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in MODULES else node.module)
    return found


MODULES = {module_name(p): p for p in JVIT.rglob("*.py")}
GRAPH = {name: imports(path) for name, path in MODULES.items()}


def layer(name: str) -> int | None:
    matches = [prefix for prefix in LAYERS if name == prefix or name.startswith(prefix + ".")]
    return LAYERS[max(matches, key=len)] if matches else None


def test_graph_sees_the_known_edges():
    assert "jvit.train.config" in GRAPH["jvit.train.loop"]
    assert "jvit.registry" in GRAPH["jvit.models.sot"]


def test_lower_layers_never_import_higher_ones():
    upward = [
        f"{src} (layer {layer(src)}) imports {dst} (layer {layer(dst)})"
        for src, targets in GRAPH.items()
        for dst in targets
        if layer(src) is not None and layer(dst) is not None and layer(dst) > layer(src)
    ]
    assert not upward, "\n".join(upward)
    to_train = [
        f"{src} imports {dst}"
        for src, targets in GRAPH.items()
        for dst in targets
        if src.startswith(NEVER_IMPORT_TRAIN) and dst.startswith("jvit.train")
    ]
    assert not to_train, "\n".join(to_train)


def test_no_import_cycles():
    # Package __init__ modules that only re-export (jvit, jvit.models, ...) are edges like any other.
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(GRAPH.get(node, ())):
            if nxt == node or nxt not in GRAPH:
                continue
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])
    assert not cycles, "\n".join(cycles)
