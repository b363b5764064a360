"""The rooms of launcher/runtime/ import one way, and no module imports itself back through others.

Bottom to top (a room may import the rooms below it, and itself):

    model     where the files are, meta build, methods, QLoRA, blocks, loading, tiny mode
    data      sources → columns → templates → the prepared, packed rows (packing.py)
    state     checkpoints, safe state, export
    parallel  the process group, one module per backend (native, zero), the optimizer, backends.py
    train     the loop, tasks, signals, metrics, trackers
    __main__  the orchestrator: plan → process group → data → model → loop → checkpoint

Every import counts, the ones inside functions too; an import under `if TYPE_CHECKING:` is a type
annotation, not a dependency, and does not.
"""

from __future__ import annotations

import ast
from pathlib import Path

RUNTIME = Path(__file__).resolve().parents[2] / "launcher" / "runtime"
PREFIX = "launcher.runtime."
ROOMS = ("model", "data", "state", "parallel", "train", "__main__")


def module_name(path: Path) -> str:
    parts = path.relative_to(RUNTIME.parent.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_lines(tree: ast.Module) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The runtime modules `path` imports, wherever in the file (not under TYPE_CHECKING)."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_lines(tree)
    found: set[str] = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)  # `from pkg import module`
    return {name for name in found if name in known}


def graph() -> dict[str, set[str]]:
    paths = sorted(RUNTIME.rglob("*.py"))
    known = {module_name(p) for p in paths}
    return {module_name(p): imports_of(p, known) - {module_name(p)} for p in paths}


def room(module: str) -> str:
    rest = module[len(PREFIX) :] if module.startswith(PREFIX) else ""
    return rest.split(".")[0] if rest else "__init__"


def back_edges(edges: dict[str, set[str]]) -> list[str]:
    """Imports from a room into a room above it, as 'a -> b (room -> room)'."""
    rank = {name: i for i, name in enumerate(ROOMS)}
    wrong = []
    for source, targets in edges.items():
        for target in targets:
            a, b = room(source), room(target)
            if b == "__init__" or a == "__init__":
                continue  # the package's empty __init__
            if rank[b] > rank[a]:
                wrong.append(f"{source} -> {target} ({a} -> {b})")
    return sorted(wrong)


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_every_runtime_module_lives_in_a_room() -> None:
    edges = graph()
    assert {room(m) for m in edges} <= {*ROOMS, "__init__"}, sorted({room(m) for m in edges})
    flat = sorted(p.name for p in RUNTIME.glob("*.py"))
    assert flat == ["__init__.py", "__main__.py"], f"modules directly in runtime/ besides the orchestrator: {flat}"


def test_rooms_import_downwards_only_and_modules_never_in_a_circle() -> None:
    edges = graph()
    assert sum(len(t) for t in edges.values()) > 50  # the parser sees the real imports
    assert back_edges(edges) == []
    assert cycles(edges) == []


def test_a_planted_back_edge_or_circle_is_caught() -> None:
    edges = {k: set(v) for k, v in graph().items()}
    edges["launcher.runtime.model.files"].add("launcher.runtime.train.loop")  # model reaching up into train
    assert back_edges(edges) == ["launcher.runtime.model.files -> launcher.runtime.train.loop (model -> train)"]
    assert any("launcher.runtime.model.files" in c for c in cycles(edges))  # train.loop reaches model.files back
    edges = {k: set(v) for k, v in graph().items()}
    edges["launcher.runtime.model.build"].add("launcher.runtime.model.methods")  # the old adapters <-> model circle
    assert cycles(edges) == [["launcher.runtime.model.build", "launcher.runtime.model.methods"]]
    assert back_edges(edges) == []  # one room: only the circle check sees it


def test_the_type_checking_exception_is_only_for_types(tmp_path: Path) -> None:
    planted = tmp_path / "planted.py"
    planted.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from launcher.runtime.train.loop import Context\n"
        "def f():\n    from launcher.runtime.train.tasks import build_task\n"
    )
    assert imports_of(planted, {"launcher.runtime.train.loop", "launcher.runtime.train.tasks"}) == {"launcher.runtime.train.tasks"}
