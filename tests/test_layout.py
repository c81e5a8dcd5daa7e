"""The house: the foundation (`common/`) stands on nothing of ours, and no two modules
import each other, directly or round a longer loop."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("common", "fl_server", "fl_client", "strategies", "models", "simulation",
            "deploy", "benchmarks", "privacy")
ABOVE_THE_FOUNDATION = ("fl_server", "fl_client", "models", "simulation", "strategies")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(f): f for pkg in PACKAGES for f in (ROOT / pkg).rglob("*.py")
            if "__pycache__" not in f.parts}


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports anywhere in its body (function-level
    imports count: a cycle hidden in a function is still a cycle)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from .x import y
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            for target in targets:
                while target and target not in mods:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_between_modules():
    graph = import_graph()
    assert len(graph) > 40, "the walk should see every module of the project"
    assert cycles(graph) == []


def test_the_walk_finds_a_cycle_when_there_is_one():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_the_foundation_and_everything_below_the_cli_import_nothing_above_them():
    graph = import_graph()
    upward = sorted(f"{m} -> {n}" for m, deps in graph.items() for n in deps
                    if (m.split(".")[0] == "common" and n.split(".")[0] != "common")
                    or (n.split(".")[0] == "simulation"
                        and m.split(".")[0] in ("models", "fl_client", "fl_server", "strategies")))
    assert upward == []


def test_importing_the_foundation_pulls_in_none_of_the_packages_above_it():
    foundation = sorted(m for m in _modules() if m.split(".")[0] == "common")
    code = ("import json, sys\n" + "".join(f"import {m}\n" for m in foundation)
            + "print(json.dumps(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    loaded = json.loads(out.strip().splitlines()[-1])
    assert "common.data.scenes" in loaded and "common.records" in loaded
    assert [m for m in loaded if m.split(".")[0] in ABOVE_THE_FOUNDATION] == []


def test_checking_a_config_finds_the_workload_sections_without_loading_torch():
    code = ("import json, sys\nfrom common.config import load_config\n"
            "cfg = load_config('configs/distill_quickstart.yaml')\n"
            "print(json.dumps([cfg.distill.beta, 'torch' in sys.modules, sorted(sys.modules)]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    beta, torch_loaded, loaded = json.loads(out.strip().splitlines()[-1])
    assert beta == 0.001
    assert not torch_loaded  # python -m simulation still fails fast on a bad config
    # The loader found the rooms' config modules through the registry, and only those.
    rooms = sorted(m for m in loaded if m.startswith("models."))
    from common.workloads import WORKLOADS
    expected = sorted(m for path in WORKLOADS.values() for m in (path, f"{path}.config"))
    assert "models.taco.config" in expected and "models.diffusion.config" in expected
    assert rooms == expected
