"""Test-time scaling end to end on the test world: the generate CLI, MLflow logging, the evaluator."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from evaluators.suite import EvalSettings, Evaluator
from orchestrator import generate
from orchestrator.config import UserError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a photo of a red circle\n\na blue square above a green triangle\nthree yellow circles\n")
    return path


def test_generate_tteo_writes_each_configuration_and_logs_to_mlflow(t2i_checkpoint, prompts, tmp_path, capsys):
    from orchestrator import tracking

    out, uri = tmp_path / "out", f"sqlite:///{tmp_path}/mlflow.db"
    assert generate.main([str(t2i_checkpoint), "--prompts", str(prompts), "--out", str(out), "--tteo",
                          "--bon", "2,3", "--iters", "0,3", "--lr", "0.2", "--threads", "1",
                          "--tracking-uri", uri]) == 0
    printed = capsys.readouterr().out
    folders = {"bon2": (2, 0), "bon2_tteo3": (2, 3), "bon3": (3, 0), "bon3_tteo3": (3, 3)}
    for name, (bon, iters) in folders.items():
        data = json.loads((out / name / "samples.json").read_text())
        assert data["test_time"]["bon"] == bon and data["test_time"]["iters"] == iters
        assert data["test_time"]["rewards"] == {"quality": 1.0, "clip": 0.2}    # the run's terms
        assert data["test_time"]["select"] == {"clip": 1.0, "quality": 1.0}    # world stand-ins
        assert [r["prompt"] for r in data["images"]] == [
            "a photo of a red circle", "a blue square above a green triangle", "three yellow circles"]
        for record in data["images"]:
            assert 0 <= record["start"] < bon and 0 <= record["iterate"] < max(iters, 1)
            assert set(record["scores"]) == {"clip", "quality"}
            assert Image.open(out / name / record["file"]).mode == "RGB"
        assert len(data["trace"]["clip"]) == max(iters, 1) and data["seconds_per_prompt"] > 0
        assert (out / name / "grid.png").is_file()
        assert name in printed                                   # the Table 6-style summary
    exp = tracking._client(uri).get_experiment_by_name("softdimo-generate")
    run, = tracking._client(uri).search_runs([exp.experiment_id])
    assert run.data.metrics["tts/bon3_tteo3/seconds_per_prompt"] > 0
    assert "tts/bon2/quality" in run.data.metrics and run.data.params["iters"] == "0,3"
    artifacts = {a.path for a in tracking._client(uri).list_artifacts(run.info.run_id, "tts/bon2")}
    assert {"tts/bon2/grid.png", "tts/bon2/samples.json", "tts/bon2/000000.png"} <= artifacts


@pytest.mark.parametrize("extra, message", [
    (["--bon", "0"], "--bon: must be >= 1"),
    (["--lr", "-0.1"], "--lr must be > 0"),
    (["--rewards", "clip=1,aesthetic=1"], "--rewards: unknown reward 'aesthetic'"),
    (["--select", "clip=x"], "--select: 'clip=x' is not NAME=WEIGHT"),
])
def test_generate_tteo_bad_options(t2i_checkpoint, prompts, tmp_path, extra, message):
    with pytest.raises(UserError, match=message):
        generate.main([str(t2i_checkpoint), "--prompts", str(prompts), "--out", str(tmp_path), "--tteo", *extra])


def test_generate_tteo_bad_inputs_exit_2_with_one_line(t2i_checkpoint, c2i_checkpoint, prompts, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    cases = [([str(t2i_checkpoint), "--prompts", str(empty)], "no prompts in the file"),
             ([str(c2i_checkpoint), "--prompts", str(prompts)], "class-conditional")]
    for args, message in cases:
        proc = subprocess.run([sys.executable, "-m", "orchestrator.generate", *args, "--out",
                               str(tmp_path / "o"), "--tteo", "--bon", "4", "--iters", "4"],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0] and lines[0].startswith("error: ")


def test_evaluator_reports_metrics_with_and_without_test_time_scaling(t2i_checkpoint, c2i_checkpoint):
    settings = EvalSettings(metrics=["world_fid", "geneval_world", "world_clip"], num_images=8,
                            geneval_prompts_per_task=1, images_per_prompt=1,
                            test_time={"bon": 2, "iters": 2, "lr": 0.2})
    ev = Evaluator(settings)
    out = ev.evaluate(t2i_checkpoint)
    for metric in ("geneval_world", "world_clip"):
        assert f"eval/{metric}" in out and f"eval/tts/{metric}" in out
    assert len([k for k in out if k.startswith("eval/tts/geneval_world/")]) == 6
    assert "eval/tts/world_fid" not in out and out["eval/tts/seconds_per_prompt"] > 0
    assert ev.evaluate(t2i_checkpoint) == {**out, "eval/tts/seconds_per_prompt": pytest.approx(
        out["eval/tts/seconds_per_prompt"], rel=10)}                     # fixed seeds
    c2i = Evaluator(EvalSettings(metrics=["world_clip"], num_images=8, test_time={"bon": 2})).evaluate(c2i_checkpoint)
    assert not any(k.startswith("eval/tts/") for k in c2i)              # no prompts to scale for


def test_evaluator_accepts_world_reward_names_and_checks_real_ones(t2i_checkpoint, monkeypatch):
    from evaluators.networks.weights import WeightsMissing

    monkeypatch.delenv("SOFTDIMO_WEIGHTS", raising=False)
    tt = {"bon": 2, "iters": 2, "rewards": {"clip": 1.0, "quality": 0.02}}
    out = Evaluator(EvalSettings(metrics=["world_clip"], num_images=4, test_time=tt)).evaluate(t2i_checkpoint)
    assert "eval/tts/world_clip" in out
    with pytest.raises(WeightsMissing, match="hps_v21"):
        Evaluator(EvalSettings(metrics=["world_clip"], test_time={"bon": 2, "select": {"hps_v21": 1.0}}))
