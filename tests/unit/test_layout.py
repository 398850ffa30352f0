"""The sweep's typed contract: SweepLayout names the files the product writes, the context is frozen,
and the evaluation defaults live in evaluators.suite.EvalSettings alone.

The finished-sweep side (every path the layout names exists after a real sweep) is checked by
tests/e2e/test_sweep.py::check_layout on the shipped sweeps.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from orchestrator.sweeping.layout import SweepContext, SweepLayout, TrialScaling, TrialSpec
from orchestrator.sweeping.spec import load_sweep

ROOT = Path(__file__).resolve().parents[2]


def _sweep_file(tmp_path: Path) -> Path:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({
        "name": "s", "preset": str(ROOT / "sweeps/presets/tiny_c2i.yaml"), "output_dir": "out",
        "search": {"seed": {"grid": [0, 1]}}}))
    return path


def test_layout_names_every_file_of_a_sweep_folder(tmp_path):
    layout = SweepLayout.of(tmp_path, "s")
    trial = layout.trial("t001")
    named = {
        layout.marker: "s/.softdimo-sweep", layout.state: "s/sweep.json", layout.server: "s/mlflow_server.json",
        layout.parent_spool: "s/parent_spool.jsonl", layout.tune: "s/tune", layout.train: "s/train",
        trial.root: "s/trials/t001", trial.result: "s/trials/t001/result.json",
        trial.final: "s/trials/t001/final.json", trial.failure: "s/trials/t001/failure.json",
        trial.stopped: "s/trials/t001/stopped.json",
        trial.attempts: "s/trials/t001/attempts.jsonl", trial.spool: "s/trials/t001/spool.jsonl",
        trial.eval_spool: "s/trials/t001/eval_spool.jsonl", trial.eval_log: "s/trials/t001/eval.jsonl",
        trial.snapshot("step_00000002"): "s/trials/t001/eval/step_00000002",
        SweepLayout.lock_file(tmp_path, "s"): ".s.lock",
    }
    for path, rel in named.items():
        assert path == tmp_path / rel
    assert trial.key == "t001" and layout.name == "s"
    assert layout.trial_keys() == []
    (layout.trials / "t001").mkdir(parents=True)
    (layout.trials / "t000").mkdir()
    assert layout.trial_keys() == ["t000", "t001"]


def test_the_expanded_trials_write_where_the_layout_says(tmp_path):
    spec = load_sweep(_sweep_file(tmp_path), cwd=tmp_path)
    assert spec.layout == SweepLayout(tmp_path / "out" / "s") and spec.sweep_dir == spec.layout.root
    for trial in spec.trials:   # the training run of a trial writes its output_dir: the trial folder
        assert trial.config["output_dir"] == str(spec.layout.trial(trial.key).root)
        sent = trial.spec()
        assert TrialSpec.from_json(json.loads(json.dumps(sent.to_json()))) == sent


def test_the_sweep_driver_uses_the_layout_for_its_lock_and_overwrite_marker(tmp_path):
    from orchestrator import locks, sweep
    from orchestrator.config import UserError

    spec = load_sweep(_sweep_file(tmp_path), cwd=tmp_path)
    lock = sweep._lock(spec)
    try:
        assert lock == SweepLayout.lock_file(tmp_path / "out", "s")
    finally:
        locks.release(lock)
    spec.layout.root.mkdir(parents=True)
    args = type("Args", (), {"resume": False, "overwrite": True})()
    with pytest.raises(UserError, match=r"no \.softdimo-sweep file"):
        sweep._check_folder(spec, args)
    spec.layout.marker.touch()
    sweep._check_folder(spec, args)                 # a sweep's folder: deleted
    assert not spec.layout.root.exists()


def test_sweep_context_is_frozen_and_carries_the_planned_scaling(tmp_path):
    from orchestrator.sweep import sweep_context

    spec = load_sweep(_sweep_file(tmp_path), cwd=tmp_path)
    ctx = sweep_context(spec, "sqlite:///x.db", "1", "p", cpus_per_worker=0.49, threads_per_worker=1)
    assert isinstance(ctx, SweepContext) and ctx.layout == spec.layout
    assert ctx.scaling == TrialScaling(num_workers=1, use_gpu=False, cpus_per_worker=0.49,
                                       gpus_per_worker=1.0, threads_per_worker=1)
    assert ctx.evaluation.settings.metrics == spec.file.evaluation.metrics
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctx.name = "other"
    assert ctx.trial("t000") == spec.layout.trial("t000")


def test_sweep_evaluation_section_maps_onto_eval_settings(tmp_path):
    from evaluators.suite import EvalSettings
    from orchestrator.sweeping.schema import EvaluationSection, eval_settings

    section = EvaluationSection(metrics=["world_fid", "world_clip"], num_images=64, seed=3,
                                weights={"inception": "/w/i.pth"}, geneval_prompts_per_task=2)
    assert eval_settings(section) == EvalSettings(
        metrics=["world_fid", "world_clip"], num_images=64, seed=3, paths={"inception": "/w/i.pth"},
        geneval_prompts_per_task=2)
    shared = {f.name for f in dataclasses.fields(EvalSettings)}
    assert eval_settings(EvaluationSection()) == EvalSettings()   # the same defaults
    assert {"metrics", "num_images", "temperatures", "seed", "reference", "images_per_prompt",
            "geneval_prompts_per_task", "paths", "test_time"} <= shared


CHANGED_DEFAULTS = """
import dataclasses
import evaluators.suite as suite

@dataclasses.dataclass
class Changed(suite.EvalSettings):
    metrics: list = dataclasses.field(default_factory=lambda: ["world_clip"])
    num_images: int = 123
    seed: int = 7
    geneval_prompts_per_task: int = 3
    images_per_prompt: int = 2

suite.EvalSettings = Changed
from orchestrator import evaluate
from orchestrator.sweeping.schema import EvaluationSection, eval_settings

section = EvaluationSection()
assert (section.metrics, section.num_images, section.seed) == (["world_clip"], 123, 7), section
assert (section.geneval_prompts_per_task, section.images_per_prompt) == (3, 2), section
assert eval_settings(section) == Changed()
args = evaluate.parser().parse_args(["ckpt"])
assert (args.metrics, args.seed, args.geneval_prompts_per_task) == ("world_clip", 7, 3), args
print("ok")
"""


def test_an_eval_default_changed_in_eval_settings_shows_in_the_sweep_schema_and_the_cli():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", CHANGED_DEFAULTS], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_a_trial_the_scheduler_stops_ends_killed_not_failed(tmp_path):
    """ASHA's stop reaches the trial's fit() as an error, possibly after the sweep closed the run:
    the marker the driver writes first makes the trial's own late status KILLED."""
    from types import SimpleNamespace

    from orchestrator.sweep import sweep_context
    from orchestrator.sweeping.trial import StopMarker, failed_status

    spec = load_sweep(_sweep_file(tmp_path), cwd=tmp_path)
    ctx = sweep_context(spec, "sqlite:///x.db", "1", "p", cpus_per_worker=1, threads_per_worker=1)
    marker = StopMarker(ctx)
    stopped, done = ctx.trial("t000"), ctx.trial("t001")
    assert failed_status(ctx.storage, stopped) == "FAILED"     # restarts exhausted, no stop
    done.root.mkdir(parents=True)
    done.result.write_text("{}")
    for key in ("t000", "t001"):
        marker.on_trial_complete(0, [], SimpleNamespace(config={"trial": {"key": key}}))
    assert json.loads(stopped.stopped.read_text())["time"] > 0
    assert failed_status(ctx.storage, stopped) == "KILLED"
    assert not done.stopped.exists()                   # a finished trial is not marked


@pytest.mark.parametrize("steps, count, expected", [
    (300, 4, [150, 200, 250, 300]), (800, 4, [400, 533, 667, 800]), (300, 1, [300]),
    (5, 3, [3, 4, 5]), (2, 4, [1, 2]), (1, 4, [1])])
def test_late_steps_spread_the_evaluations_over_the_second_half(steps, count, expected):
    from orchestrator.sweeping.layout import late_steps, second_half
    assert late_steps(steps, count) == expected
    # the report's second half of a run evaluated at those steps (and some earlier) is exactly them
    records = [{"step": s} for s in sorted(set(range(1, steps // 2)) | set(expected))]
    assert [r["step"] for r in second_half(records)] == expected


def test_the_loop_checkpoints_and_reports_at_the_callers_extra_steps(test_world, tmp_path):
    """Hooks.checkpoint_at: a checkpoint (and a report with it) at the asked steps, besides
    train.checkpoint_every's; that is what lets a sweep evaluate its late checkpoints."""
    from orchestrator.config import load_config, to_dict
    from trainers.loop import Hooks, train

    cfg = load_config(ROOT / "sweeps/presets/tiny_c2i.yaml",
                      ["world.spec=test", "train.steps=4", "train.batch_size=8", "train.grid_size=4",
                       "train.checkpoint_every=100", "train.log_every=100", "train.keep_checkpoints=5",
                       f"output_dir={tmp_path}", "train.device=cpu"])
    saved = {}
    hooks = Hooks(report=lambda step, metrics, path: saved.setdefault(step, path), checkpoint_at=frozenset({2}))
    train(cfg, to_dict(cfg), hooks=hooks, progress=False)
    assert sorted(saved) == [2, 4] and all(p is not None and p.is_dir() for p in saved.values())
