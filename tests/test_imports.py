"""The engine's import structure: no import cycles between its modules (counting imports inside
functions too, which is where cycles hide), no module imports the CLI, and the dashboard's light
layer (reading run folders, scores and plans) does not import torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def engine_modules() -> dict[str, Path]:
    mods = {}
    for f in (ROOT / "engine").rglob("*.py"):
        parts = f.relative_to(ROOT).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return mods


def import_graph() -> dict[str, set[str]]:
    """module -> the engine modules it imports anywhere in its body (the most specific existing one)."""
    mods = engine_modules()

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, f in mods.items():
        for node in ast.walk(ast.parse(f.read_text())):
            names: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for n in names:
                if n.startswith("engine"):
                    r = resolve(n)
                    if r and r != m and not m.startswith(r + "."):  # a package's own __init__ is not a cycle
                        graph[m].add(r)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_planted_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_engine_has_no_import_cycle():
    assert cycles(import_graph()) == []


def test_no_engine_module_imports_the_cli():
    offenders = [m for m, deps in import_graph().items() if "engine.cli" in deps and m != "engine.cli"]
    assert offenders == []


def test_reading_runs_scores_and_plans_needs_no_torch():
    code = ("import sys; import engine.runs, engine.device_lock, engine.fileio, engine.errors, engine.jobs, "
            "engine.score_job, engine.importance, engine.plan, engine.estimate, engine.data, engine.paths, "
            "engine.procs, engine.run_files, engine.targets, engine.presets, engine.importance.scores, "
            "engine.search.store, engine.target_args, engine.data_args, engine.cli; "
            "from engine.importance import Scores; "
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))[:5]")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
