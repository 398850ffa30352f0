"""Evaluating checkpoints outside a sweep: the suite on the test world and the evaluate CLI."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from evaluators.suite import EvalSettings, Evaluator
from evaluators.networks.weights import WeightsMissing

ROOT = Path(__file__).resolve().parents[2]


def test_world_metrics_are_deterministic_and_pick_the_best_temperature(c2i_checkpoint):
    settings = EvalSettings(metrics=["world_fid", "world_clip"], num_images=48, temperatures=[0.5, 1.0, 3.0])
    ev = Evaluator(settings)
    a, b = ev.evaluate(c2i_checkpoint), ev.evaluate(c2i_checkpoint)
    assert a == b                                              # fixed seeds and conditions
    per_t = {t: a[f"eval/world_fid/T{t:g}"] for t in (0.5, 1.0, 3.0)}
    assert a["eval/temperature"] == min(per_t, key=per_t.get)
    assert a["eval/world_fid"] == min(per_t.values())
    assert -1.0 <= a["eval/world_clip"] <= 1.0


def test_geneval_world_on_a_text_to_image_checkpoint(t2i_checkpoint):
    out = Evaluator(EvalSettings(metrics=["geneval_world"], geneval_prompts_per_task=2,
                                 images_per_prompt=2)).evaluate(t2i_checkpoint)
    assert 0.0 <= out["eval/geneval_world"] <= 1.0
    tasks = [k for k in out if k.startswith("eval/geneval_world/")]
    assert len(tasks) == 6
    assert out["eval/geneval_world"] == pytest.approx(np.mean([out[k] for k in tasks]))
    assert 0.0 <= out["eval/geneval_world_se"] < 0.5      # the bootstrap over its 12 prompts


def test_inception_metrics_run_from_staged_files(c2i_checkpoint, tmp_path, monkeypatch):
    """IS and PRDC through the real Inception architecture (random weights staged as a file)."""
    from evaluators.networks.inception import InceptionV3

    torch.manual_seed(0)
    net = InceptionV3()
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    weights = tmp_path / "inception.pth"
    torch.save(net.state_dict(), weights)
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "ref.npz", mu=np.zeros(2048), sigma=np.eye(2048), arr_0=ref)
    monkeypatch.delenv("SOFTDIMO_WEIGHTS", raising=False)
    settings = EvalSettings(metrics=["is", "prdc"], num_images=12, batch=12,
                            reference=str(tmp_path / "ref.npz"), paths={"inception": str(weights)})
    out = Evaluator(settings).evaluate(c2i_checkpoint)
    assert 1.0 <= out["eval/is"] <= 1008
    for key in ("precision", "recall", "density", "coverage"):
        assert 0.0 <= out[f"eval/{key}"]
    from PIL import Image

    folder = tmp_path / "coco"                       # FID against a folder of reference images
    folder.mkdir()
    for i, img in enumerate(ref):
        Image.fromarray(img).save(folder / f"{i:03d}.png")
    fid = Evaluator(EvalSettings(metrics=["fid5k"], reference=str(folder), paths={"inception": str(weights)}))
    mu, sigma, feats = fid.reference()
    assert mu.shape == (2048,) and sigma.shape == (2048, 2048) and feats.shape == (12, 2048)
    with pytest.raises(WeightsMissing, match="hps_v21"):
        Evaluator(EvalSettings(metrics=["hps_v21"], num_images=4))    # before generating anything


def test_evaluate_cli_checkpoint_and_missing_weights(c2i_checkpoint, tmp_path):
    env = {**os.environ, "SOFTDIMO_WEIGHTS": str(tmp_path / "empty")}
    out = tmp_path / "res.json"
    ok = subprocess.run([sys.executable, "-m", "orchestrator.evaluate", str(c2i_checkpoint),
                         "--metrics", "world_fid,world_clip", "--num", "32", "--threads", "1",
                         "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    row = json.loads(out.read_text())["rows"][0]
    assert set(row["metrics"]) == {"eval/world_fid", "eval/world_fid_se", "eval/world_clip",
                                   "eval/temperature"}
    assert 0 < row["metrics"]["eval/world_fid_se"] < row["metrics"]["eval/world_fid"]
    bad = subprocess.run([sys.executable, "-m", "orchestrator.evaluate", str(c2i_checkpoint),
                          "--metrics", "imagereward", "--num", "4"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.count("\n") == 1 and "imagereward" in bad.stderr
    unknown = subprocess.run([sys.executable, "-m", "orchestrator.evaluate", str(c2i_checkpoint),
                              "--metrics", "fidd"], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=300)
    assert unknown.returncode == 2 and "fidd" in unknown.stderr


def test_teacher_baseline_through_the_suite_matches_the_world_route(test_world):
    """Evaluator.evaluate_teacher (any teacher, its own sampler) agrees with the world-FID route."""
    from evaluators.metrics.world_eval import eval_conditions, generate_images, teacher_sampler, world_fid
    from orchestrator.config import load_config
    from softdimo.world.scenes import class_names

    cfg = load_config(ROOT / "sweeps/presets/tiny_c2i.yaml", ["world.spec=test", "train.device=cpu"])
    out = Evaluator(EvalSettings(metrics=["world_fid"], num_images=24)).evaluate_teacher(cfg, 2, 2.0)
    teacher, reference = test_world.teacher("c2i"), test_world.reference("c2i")
    conds = eval_conditions(teacher, 24, len(class_names()), [])
    images = generate_images(teacher_sampler(teacher, 2, 2.0, 1.0, teacher.sampling["randomize"]),
                             teacher, conds, 0, progress=False)
    from evaluators.suite import to_uint8
    expected = world_fid(test_world.features, to_uint8(images), reference.images)
    assert out["eval/world_fid"] == pytest.approx(expected, rel=1e-6)
