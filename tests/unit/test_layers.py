"""The dependency rules of the README's layout section, checked on every import statement.

math (softdimo/math) imports torch, numpy and the standard library only; the models (the rest of
softdimo/) never import trainers, evaluators or orchestrator; trainers never import evaluators or
orchestrator, evaluators never import orchestrator; Ray appears only in orchestrator (its sweep
machinery and the evaluator pool), MLflow only in orchestrator/tracking.
"""
import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MATH = ROOT / "softdimo" / "math"
PROJECT = {"softdimo", "trainers", "evaluators", "orchestrator"}
# what each top-level package may import from the project besides itself
LAYERS = {"softdimo": set(), "trainers": {"softdimo"}, "evaluators": {"softdimo", "trainers"}}


def imports(path: Path) -> set:
    """Dotted names of the modules ``path`` imports (absolute imports; relative ones resolved)."""
    names = set()
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            names.add(base)
    return names


def roots(path: Path) -> set:
    return {n.split(".")[0] for n in imports(path)}


def test_math_modules_import_only_torch_numpy_and_the_standard_library():
    files = sorted(MATH.glob("*.py"))
    assert {f.stem for f in files} >= {"soft_embedding", "masking", "dimo", "gan", "reward", "ema",
                                       "diagnostics"}
    for file in files:
        outside = {n for n in imports(file) if not n.startswith("softdimo.math") and n != "softdimo"}
        bad = {n.split(".")[0] for n in outside} - {"torch", "numpy"} - set(sys.stdlib_module_names)
        assert not bad, (file, bad)


def test_the_math_package_init_loads_no_torch():
    # the config schema reads the choice names from it without loading torch
    assert not imports(MATH / "__init__.py")


@pytest.mark.parametrize("package", sorted(LAYERS))
def test_lower_layers_never_import_upper_ones(package):
    for file in (ROOT / package).rglob("*.py"):
        found = roots(file) & PROJECT - {package}
        assert found <= LAYERS[package], (file, found)


def test_models_never_import_trainers_evaluators_or_orchestrator():
    for file in (ROOT / "softdimo").rglob("*.py"):
        assert not roots(file) & {"trainers", "evaluators", "orchestrator"}, file


# Ray lives at the orchestration edge (the sweep, its trials, the nodes they run on, the tokenizer's
# Ray Data job and the evaluator pool), MLflow in the one tracking package (the design card, ARCHITECTURE.md §2).
RAY_EDGE = {"sweep.py", "stages.py", "trial.py", "pool.py", "pg_cleanup.py", "cluster.py", "tokenize.py"}
MLFLOW_EDGE = "tracking"


def test_ray_and_mlflow_stay_at_their_edges():
    for file in ROOT.rglob("*.py"):
        rel = file.relative_to(ROOT)
        if rel.parts[0] not in PROJECT:
            continue
        found = roots(file)
        if "mlflow" in found:
            assert rel.parts[:2] == ("orchestrator", MLFLOW_EDGE), file
        if "ray" in found:
            assert rel.parts[0] == "orchestrator" and file.name in RAY_EDGE, file


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _cycle(graph: dict) -> list:
    """One import cycle of ``graph`` (module -> modules it imports), or [] when it has none."""
    state: dict = {}

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt, stack)):
                return found
        state[node] = "done"
        stack.pop()
        return []

    for node in sorted(graph):
        if node not in state and (found := visit(node, [])):
            return found
    return []


def test_the_world_package_has_no_import_cycle():
    # lazy (function-level) imports count too: layout at the bottom, store (the loader) on top
    files = sorted((ROOT / "softdimo" / "world").glob("*.py"))
    known = {_module(f) for f in files}
    graph = {_module(f): {n for n in imports(f) if n in known} for f in files}
    assert not _cycle(graph), _cycle(graph)


def test_test_modules_have_unique_names():
    """tests/unit, tests/e2e and tests/gpu are not packages: pytest imports each test file by its
    base name, so two files of one name stop a full run at collection."""
    names = [p.name for p in (ROOT / "tests").glob("*/test_*.py")]
    assert sorted(n for n in set(names) if names.count(n) > 1) == []
