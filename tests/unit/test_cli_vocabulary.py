"""One flag vocabulary across the verbs, and library code imported from library modules, not CLIs."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CLIS = ("train", "sweep", "generate", "evaluate", "report", "tokenize", "prepare", "claims")


def _options(verb: str) -> dict:
    import importlib

    p = importlib.import_module(f"orchestrator.{verb}").parser()
    return {opt: action for action in p._actions for opt in action.option_strings}


def test_out_is_a_folder_in_every_verb_and_evaluate_writes_its_json_with_json():
    for verb in ("generate", "tokenize", "report"):
        assert "folder" in _options(verb)["--out"].help, verb
    evaluate = _options("evaluate")
    assert "--json" in evaluate and evaluate["--out"].dest == "json_legacy"   # deprecated alias
    from orchestrator.evaluate import parser

    assert parser().parse_args(["ckpt", "--out", "r.json"]).json_legacy == "r.json"
    assert parser().parse_args(["ckpt", "--json", "r.json"]).json == "r.json"


def test_every_verb_with_progress_bars_takes_quiet():
    for verb in ("train", "sweep", "generate", "evaluate", "tokenize", "prepare"):
        assert "--quiet" in _options(verb), verb


def test_generate_and_evaluate_share_the_test_time_options():
    generate, evaluate = _options("generate"), _options("evaluate")
    for flag in ("--tteo", "--bon", "--iters", "--lr", "--rewards", "--select"):
        assert generate[flag].default == evaluate[flag].default, flag


def test_no_module_imports_from_a_cli_module():
    """reward_factory (evaluators.suite), find_checkpoint and the --tteo options
    (orchestrator.cli_common) live in library modules; a verb's module is imported by nobody."""
    offenders = []
    for path in [*ROOT.glob("orchestrator/**/*.py"), *ROOT.glob("evaluators/**/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module in {f"orchestrator.{c}" for c in CLIS}:
                if path.stem not in CLIS or node.module != f"orchestrator.{path.stem}":
                    offenders.append(f"{path.relative_to(ROOT)}: from {node.module} import ...")
    assert offenders == []
