"""The two-stage recipe end to end: a sweep's students, then its trials from their seed's student.

Real Ray (Tune + Train, num_cpus=2), a real MLflow store, the test world; files, runs and weights
are checked, never timings.
"""
import json
from pathlib import Path

import pytest
import torch
import yaml

from orchestrator import sweep, tracking
from orchestrator.sweeping.layout import SweepLayout
from tests.e2e.test_sweep import ROOT, mlflow_children, ray_session, tiny  # noqa: F401 (fixture)
from trainers import checkpoint as ckpt

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def two_stage_file(folder: Path) -> Path:
    """2 seeds x 2 arms. The trials' learning rates are ~0, so a trial's first generator must be
    its seed's student's EMA; the students learn (their own rates), so the two seeds' students differ."""
    body = {"name": "two", "preset": str(ROOT / "sweeps/presets/tiny_c2i.yaml"),
            "base": {"train.lr_generator": 1e-12, "train.lr_auxiliary": 1e-12},
            "student": {"overrides": {"gan.weight": 0, "train.steps": 2,
                                      "train.lr_generator": 1e-4, "train.lr_auxiliary": 1e-4}},
            "search": {"seed": {"grid": [0, 1]}, "gan.mask_range": {"grid": [[0, 0.5], [0, 0.95]]}},
            "evaluation": {"metrics": ["world_fid"]}}
    path = folder / "two.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def test_students_train_once_per_seed_and_every_trial_starts_from_its_seeds_student(tmp_path, ray_session):
    args = [str(two_stage_file(tmp_path)), *tiny(tmp_path), "train.steps=1"]
    assert sweep.main(args) == 0
    layout = SweepLayout(tmp_path / "two")
    state = json.loads(layout.state.read_text())
    assert [s["key"] for s in state["students"]] == ["student-seed0", "student-seed1"]
    assert layout.trial_keys() == ["student-seed0", "student-seed1", "t000", "t001", "t002", "t003"]

    students = {}
    for key in ("student-seed0", "student-seed1"):
        files = layout.trial(key)
        assert files.root.parent == layout.students
        result = json.loads(files.result.read_text())
        assert result["step"] == 2 and len(files.attempts.read_text().splitlines()) == 1   # trained once
        students[key] = Path(result["checkpoint"])
        assert students[key] == layout.final_checkpoint(key, 2)
        assert "init_from" not in ckpt.read_meta(students[key])
        assert [json.loads(line)["step"] for line in files.eval_log.read_text().splitlines()] == [2]
    weights = {k: ckpt.load_weights(p, "ema") for k, p in students.items()}
    assert any(not torch.equal(weights["student-seed0"][n], weights["student-seed1"][n])
               for n in weights["student-seed0"])                       # so the check below can fail

    for trial in state["trials"]:
        seed, key = trial["config"]["seed"], trial["key"]
        source = students[f"student-seed{seed}"]
        result = json.loads(layout.trial(key).result.read_text())
        first = Path(result["checkpoint"])
        meta = ckpt.read_meta(first)
        assert meta["init_from"]["checkpoint"] == str(source.resolve()) and meta["init_from"]["step"] == 2
        e_src = ckpt.load_weights(source, "ema")     # θ and its EMA start from the student's EMA
        for name in ("generator", "ema"):
            mine = ckpt.load_weights(first, name)
            assert all(torch.allclose(mine[n], e_src[n], atol=1e-6) for n in e_src), (key, name)
        assert layout.trial(key).eval_log.is_file()

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    runs = {r.data.tags[tracking.TAG_TRIAL]: r for r in mlflow_children(uri, "two")}
    assert sorted(runs) == layout.trial_keys()
    assert all(r.info.status == "FINISHED" for r in runs.values())
    for key, run in runs.items():
        student = key.startswith("student-")
        assert run.data.tags[tracking.TAG_STAGE] == ("student" if student else "search")
        assert ("init_from" in run.data.params) != student
        assert tracking.metric_history(uri, run.info.run_id, "eval/world_fid")
        if not student:
            seed = next(t["config"]["seed"] for t in state["trials"] if t["key"] == key)
            assert run.data.params["init_from"] == str(students[f"student-seed{seed}"])

    attempts = {k: layout.trial(k).attempts.read_text() for k in layout.trial_keys()}
    checkpoints = sorted(p.name for p in layout.train.glob("*/step_*"))
    assert sweep.main(args + ["--resume"]) == 0                # finished: nothing is trained again
    assert {k: layout.trial(k).attempts.read_text() for k in layout.trial_keys()} == attempts
    assert sorted(p.name for p in layout.train.glob("*/step_*")) == checkpoints
    assert len(mlflow_children(uri, "two")) == 6                # and no run is duplicated
