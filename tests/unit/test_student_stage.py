"""The sweep file's ``student`` section (the paper's two-stage recipe): expansion, checks, dry run."""
import json

import pytest

from orchestrator.config import UserError
from orchestrator.sweep import plan_resources
from orchestrator.sweeping.dry_run import format_dry_run
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


ARMS = """arms:
  plain: {}
  gumbel: {embedding.kind: gumbel_st, gan.weight: 5}
search: {seed: {grid: [0, 1]}}
"""


def test_arms_are_named_override_sets_crossed_with_the_search(tmp_path):
    spec = load(tmp_path, ARMS)
    assert [t.label for t in spec.trials] == ["arm=plain seed=0", "arm=plain seed=1",
                                             "arm=gumbel seed=0", "arm=gumbel seed=1"]
    assert [t.overrides["arm"] for t in spec.trials] == ["plain", "plain", "gumbel", "gumbel"]
    assert [t.config["embedding"]["kind"] for t in spec.trials] == ["soft", "soft", "gumbel_st", "gumbel_st"]
    assert spec.trials[2].config["gan"]["weight"] == 5.0
    assert "arms:        plain, gumbel" in format_dry_run(spec)
    spec = load(tmp_path, ARMS, ["sweep.arms.plain.gan.weight=7", "sweep.arms.new.gan.weight=3"])
    assert spec.trials[0].config["gan"]["weight"] == 7.0 and len(spec.trials) == 6


@pytest.mark.parametrize("body,needle", [
    ("arms: {a: {gan.weigth: 1}}\n", r"s.yaml: arms.a.gan.weigth: value 1: "),
    ("arms: {a: {gan.weight: -1}}\n", r"s.yaml: arms.a.gan.weight: value -1"),
    ("arms: {a: {seed: 1}}\nsearch: {seed: {grid: [0]}}\n", r"arms.a.seed: also set by search.seed"),
    ("arms: {'../x': {}}\n", r"arms.../x: an arm's name may only use"),
])
def test_arm_errors_name_file_and_key(tmp_path, body, needle):
    with pytest.raises(UserError, match=needle):
        load(tmp_path, body)


def test_the_claims_sweeps_expand(tmp_path):
    from orchestrator.sweeping.spec import load_sweep
    from tests.unit.test_sweep_config import ROOT

    c2i = load_sweep(ROOT / "sweeps/claims/c2i.yaml", cwd=tmp_path)
    assert len(c2i.students) == 3 and len(c2i.trials) == 15
    assert {t.overrides["arm"] for t in c2i.trials} == {"dimo_only", "soft_gan", "gumbel_st", "mask_0", "mask_095"}
    assert all(t.config["train"]["steps"] == s.config["train"]["steps"] == 1500
               for t in c2i.trials for s in c2i.students)
    t2i = load_sweep(ROOT / "sweeps/claims/t2i.yaml", cwd=tmp_path)
    assert len(t2i.students) == 3 and [t.overrides["arm"] for t in t2i.trials][::3] == ["dimo_only", "reward"]
    assert all(s.config["reward"]["weight"] == 0 for s in t2i.students)
