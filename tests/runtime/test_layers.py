"""The runtime's import graph reads top-down (docs/architecture.md, "Runtime layers"): each module
imports only modules of its own package or of a lower layer, and no files import each other in a
loop. Read from the source (imports inside functions included), so nothing is imported here."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "runtime" / "ling_runtime"
# Top-down; an entry is a top-level module or package of ling_runtime.
LAYERS = [
    ["__main__"],
    ["cli"],
    ["server"],
    ["engine"],
    ["distributed"],
    ["runner", "builtin"],
    ["model", "tiny"],
    ["loader", "settings"],
    ["kernels", "config", "text", "telemetry", "__init__"],
]
RANK = {entry: i for i, layer in enumerate(LAYERS) for entry in layer}


def module_file(name: str) -> Path | None:
    """The file of `ling_runtime.a.b` (a module or a package's __init__.py), if it is in the tree."""
    parts = name.split(".")[1:]
    base = ROOT.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imports(path: Path) -> set[Path]:
    """Files of ling_runtime that `path` imports (at module level or inside functions)."""
    out: set[Path] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from ling_runtime.x import y`: the module x.y when y is one, else a name of x.
            names = [
                f"{node.module}.{a.name}" if module_file(f"{node.module}.{a.name}") else node.module
                for a in node.names
            ]
        for name in names:
            target = module_file(name) if name.split(".")[0] == "ling_runtime" else None
            if target is not None and target != path:
                out.add(target)
    return out


def entry(path: Path) -> str:
    rel = path.relative_to(ROOT)
    return rel.parts[0].removesuffix(".py")


def graph() -> dict[Path, set[Path]]:
    return {path: imports(path) for path in sorted(ROOT.rglob("*.py"))}


def test_every_top_level_module_has_a_layer() -> None:
    entries = {entry(p) for p in ROOT.rglob("*.py")}
    assert entries <= set(RANK), f"place {sorted(entries - set(RANK))} in LAYERS (and the map)"


def test_no_module_imports_one_above_it() -> None:
    upward = [
        f"{src.relative_to(ROOT)} -> {dst.relative_to(ROOT)}"
        for src, targets in graph().items()
        for dst in targets
        if entry(src) != entry(dst) and RANK[entry(src)] >= RANK[entry(dst)]
    ]
    assert not upward, "imports that do not run downward:\n" + "\n".join(upward)


def test_no_import_cycles() -> None:
    edges = graph()
    state: dict[Path, int] = {}  # 1: on the current path, 2: done
    stack: list[Path] = []
    cycles: list[str] = []

    def visit(node: Path) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                loop = [*stack[stack.index(nxt) :], nxt]
                cycles.append(" -> ".join(str(p.relative_to(ROOT)) for p in loop))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in edges:
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)
