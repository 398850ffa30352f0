"""The dependency rule: the loss maths imports torch only; Ray and MLflow stay out of the core."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MATH = ["soft_embedding", "masking", "dimo", "gan", "reward", "ema", "diagnostics"]
LAYERS = {"softdimo": {"trainers"}, "trainers": {"softdimo", "trainers"},
          "evaluators": {"softdimo", "trainers", "evaluators"}}


def imported_roots(path: Path) -> set:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("name", MATH)
def test_math_modules_import_only_torch(name):
    roots = imported_roots(ROOT / "trainers" / f"{name}.py") - {"__future__", "math", "typing",
                                                                 "collections"}
    assert roots <= {"torch"}, roots


@pytest.mark.parametrize("package", sorted(LAYERS))
def test_lower_layers_never_import_upper_ones_or_ray_mlflow(package):
    project = {"softdimo", "trainers", "evaluators", "orchestrator"}
    for file in (ROOT / package).rglob("*.py"):
        roots = imported_roots(file)
        assert not roots & {"ray", "mlflow"}, file
        assert roots & project <= LAYERS[package] | {package}, (file, roots & project)


# Ray lives at the orchestration edge, MLflow in the one tracking module (the design card).
RAY_EDGE = {"sweep.py", "trial.py", "pool.py", "pg_cleanup.py", "tokenize.py"}
MLFLOW_EDGE = {"tracking"}         # the orchestrator/tracking package


def test_ray_and_mlflow_stay_at_their_edges():
    for file in (ROOT / "orchestrator").rglob("*.py"):
        roots = imported_roots(file)
        if "mlflow" in roots:
            assert file.relative_to(ROOT / "orchestrator").parts[0] in MLFLOW_EDGE, file
        if "ray" in roots:
            assert file.name in RAY_EDGE, file
