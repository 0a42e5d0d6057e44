"""The packages' layers, read from their import statements: study -> trainables -> analysis, no
arrow back, no import circle, Ray only at the edge, torch never in analysis.

A test rather than a convention because a back-arrow is one line in any module, and the cost
shows up far away: `energyat query` importing torch, a worker importing the CLI, a circle that
breaks only on one import order."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

PACKAGES = ("study", "trainables", "analysis")
# what each package may import of the others
ALLOWED = {"study": {"study", "trainables", "analysis"}, "trainables": {"trainables", "analysis"}, "analysis": {"analysis"}}
RAY_AT_THE_EDGE = {"trainables.tune_adapter"}  # besides study/: the one trainable adapter


def _modules() -> dict[str, Path]:
    return {f"{pkg}.{f.stem}": f for pkg in PACKAGES for f in sorted((ROOT / pkg).glob("*.py")) if f.stem != "__init__"}


def _imports(path: Path, *, top_level_only: bool) -> set[str]:
    """The modules `path` imports (absolute names); at module level only, or anywhere."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)  # `from study import runner`
    return found


@pytest.mark.parametrize("module", sorted(_modules()))
def test_a_module_imports_only_its_own_layer_and_those_below(module: str) -> None:
    package = module.split(".")[0]
    for name in _imports(_modules()[module], top_level_only=False):
        other = name.split(".")[0]
        if other in PACKAGES:
            assert other in ALLOWED[package], f"{module} imports {name}: {package}/ may import only {sorted(ALLOWED[package])}"


@pytest.mark.parametrize("module", sorted(_modules()))
def test_ray_only_in_study_and_the_adapter_and_torch_never_in_analysis(module: str) -> None:
    names = {n.split(".")[0] for n in _imports(_modules()[module], top_level_only=False)}
    if not module.startswith("study.") and module not in RAY_AT_THE_EDGE:
        assert "ray" not in names, f"{module} imports ray"
    if module.startswith("analysis."):
        assert "torch" not in names, f"{module} imports torch"


def test_no_import_circle_among_the_modules() -> None:
    modules = _modules()
    # function-local imports count too: they close a circle as surely, only later
    graph = {m: {n for n in _imports(p, top_level_only=False) if n in modules} for m, p in modules.items()}
    state: dict[str, str] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = "open"
        for n in sorted(graph[m]):
            assert state.get(n) != "open", "import circle: " + " -> ".join([*path[path.index(n):], n]) if n in path else n
            if n not in state:
                visit(n, [*path, n])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_spec_checks_and_a_trial_need_neither_ray_nor_optuna_nor_duckdb() -> None:
    # `energyat train` runs where only torch, numpy and pyarrow are (a GPU machine that reaches no
    # registry, benchmarks/gpu_check.py): parsing a whole study spec must not import the others
    code = (
        "import sys; from study.spec import load_spec; import trainables.engine; "
        "load_spec('examples/quickstart.yaml'); print(sorted(m for m in ('ray', 'optuna', 'duckdb') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout
