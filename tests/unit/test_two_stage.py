"""The sweep file's ``student`` section (the paper's two-stage recipe): expansion, checks, dry run."""
import json

import pytest

from orchestrator.config import UserError
from orchestrator.sweep import plan_resources
from orchestrator.sweeping.spec import format_dry_run
from tests.unit.test_sweep_config import load

TWO_STAGE = """student: {overrides: {gan.weight: 0, train.steps: 15}}
search:
  seed: {grid: [3, 1]}
  gan.mask_range: {grid: [[0, 0.5], [0, 0.95]]}
base: {train.steps: 20}
"""


def test_one_student_per_seed_and_every_trial_starts_from_its_seeds_student(tmp_path):
    spec = load(tmp_path, TWO_STAGE)
    assert [s.key for s in spec.students] == ["student-seed3", "student-seed1"]   # trial order
    assert [s.label for s in spec.students] == ["student gan.weight=0.0 train.steps=15 seed=3",
                                                "student gan.weight=0.0 train.steps=15 seed=1"]
    for student in spec.students:
        c = student.config
        assert c["gan"]["weight"] == 0.0 and c["train"]["steps"] == 15 and c["init"]["checkpoint"] is None
        assert c["output_dir"] == str(spec.sweep_dir / "students" / student.key)
        assert c["gan"]["mask_range"] == [0.0, 0.5]      # the preset's: no search value in a student
    for trial in spec.trials:
        seed = trial.config["seed"]
        assert trial.config["init"]["checkpoint"] == str(
            spec.sweep_dir / "train" / f"student-seed{seed}" / "step_00000015")
        assert trial.config["train"]["steps"] == 20 and trial.config["gan"]["weight"] > 0
    assert [s["key"] for s in json.loads(json.dumps(spec.to_json()))["students"]] == [
        "student-seed3", "student-seed1"]
    assert spec.stages() == [spec.students, spec.trials]


def test_without_a_student_section_nothing_changes(tmp_path):
    spec = load(tmp_path, "search: {seed: {grid: [0, 1]}}\n")
    assert spec.students == [] and spec.stages() == [spec.trials]
    assert all(t.config["init"]["checkpoint"] is None for t in spec.trials)


def test_student_overrides_from_the_command_line(tmp_path):
    spec = load(tmp_path, "search: {seed: {grid: [0]}}\n",
                ["sweep.student.overrides.gan.weight=0", "sweep.student.overrides.train.steps=7"])
    assert [s.label for s in spec.students] == ["student gan.weight=0.0 train.steps=7 seed=0"]
    assert spec.trials[0].config["init"]["checkpoint"].endswith("student-seed0/step_00000007")
    assert load(tmp_path, TWO_STAGE, ["sweep.student=null"]).students == []


@pytest.mark.parametrize("body,overrides,needle", [
    ("student: {overrides: {gan.weigth: 0}}\n", [], r"s.yaml: student.overrides.gan.weigth: value 0: "),
    ("student: {overides: {gan.weight: 0}}\n", [], r"student.overides"),
    ("student: {overrides: {seed: 4}}\n", [], r"student.overrides.seed: a student's seed is its trials'"),
    ("student: {overrides: {train.steps: 0}}\n", [], r"student.overrides.train.steps: value 0: "),
    ("student: {overrides: {}}\nsearch: {init.checkpoint: {grid: [a]}}\n", [],
     r"search.init.checkpoint: the student section sets every trial's init.checkpoint"),
])
def test_student_section_errors_name_file_and_key(tmp_path, body, overrides, needle):
    with pytest.raises(UserError, match=needle):
        load(tmp_path, body, overrides)


def test_init_checkpoint_in_base_is_refused_with_a_student_section(tmp_path):
    run = tmp_path / "run" / "checkpoints" / "step_00000001"
    run.mkdir(parents=True)
    (run / "meta.json").write_text("{}")
    with pytest.raises(UserError, match=r"base.init.checkpoint: the student section"):
        load(tmp_path, f"student: {{overrides: {{}}}}\nbase: {{init.checkpoint: {tmp_path / 'run'}}}\n")


def test_dry_run_lists_the_students_before_the_trials(tmp_path):
    text = format_dry_run(load(tmp_path, TWO_STAGE))
    assert "students:    2 (one per training seed" in text
    order = [text.index(k + "  ") for k in ("student-seed3", "student-seed1", "t000", "t003")]
    assert order == sorted(order)


def test_students_of_different_seeds_run_side_by_side(tmp_path):
    spec = load(tmp_path, TWO_STAGE + "evaluation: {num_images: 0}\nmetric: loss/dimo\n")
    assert plan_resources(spec, {"CPU": 2.0}, len(spec.students)) == (2, 0.98, 1)   # one thread each, both cores busy
    assert plan_resources(spec, {"CPU": 4.0}, len(spec.students)) == (2, 1.99, 2)
    one = load(tmp_path, "student: {overrides: {}}\nsearch: {gan.weight: {grid: [1, 2]}}\n"
                         "evaluation: {num_images: 0}\nmetric: loss/dimo\n")
    assert len(one.students) == 1 and plan_resources(one, {"CPU": 2.0}, 1) == (1, 1.99, 2)
