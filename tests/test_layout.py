"""The layout of docs/architecture.md: every package has a layer, no import runs up the
layer order, no two modules import each other (directly or round a longer loop), and
the foundation (`common/`) loads nothing above it."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The layer order: a module imports only from its own layer or the ones below it.
LAYERS = {
    "common": 0,  # config, data sources, run records
    "models": 1, "privacy": 1,  # models, losses, training steps; attacks, accountants, defences
    "strategies": 2,  # aggregation
    "fl_client": 3, "fl_server": 3,  # the Flower apps
    "simulation": 4, "deploy": 4, "reports": 4,  # what runs the apps or drives the models
    "benchmarks": 5,
}
PACKAGES = tuple(LAYERS)
ABOVE_THE_FOUNDATION = tuple(p for p in PACKAGES if p not in ("common", "benchmarks"))


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


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Imports from a module to one of a higher layer."""
    return sorted(f"{m} -> {n}" for m, deps in graph.items() for n in deps
                  if LAYERS[n.split(".")[0]] > LAYERS[m.split(".")[0]])


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {p: set() for p in PACKAGES}
    for m, deps in graph.items():
        out[m.split(".")[0]] |= {n.split(".")[0] for n in deps} - {m.split(".")[0]}
    return out


def test_every_top_level_package_has_a_layer():
    found = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()} - {"tests"}
    assert found == set(LAYERS), f"give {sorted(found - set(LAYERS))} a layer"


def test_no_import_runs_up_the_layers_and_no_two_packages_import_each_other():
    graph = import_graph()
    assert upward_imports(graph) == []
    assert cycles(package_graph(graph)) == []  # e.g. models <-> privacy, in one layer


def test_the_walk_finds_an_import_that_runs_up():
    graph = {"models.a": {"common.b"}, "common.b": {"fl_client.c"}, "fl_client.c": set()}
    assert upward_imports(graph) == ["common.b -> fl_client.c"]


def test_no_import_cycle_between_modules():
    graph = import_graph()
    assert len(graph) > 40, "the walk should see every module of the project"
    assert cycles(graph) == []


def test_the_walk_finds_a_cycle_when_there_is_one():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


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
    # The loader found the workloads' config modules through the registry, and only those.
    found = sorted(m for m in loaded if m.startswith("models."))
    from common.workloads import WORKLOADS
    expected = sorted(m for path in WORKLOADS.values() for m in (path, f"{path}.config"))
    assert "models.taco.config" in expected and "models.diffusion.config" in expected
    assert found == expected
