"""End-to-end training on the tiny test world: checkpoints, grids, resume, frozen layers, costs."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from orchestrator.config import load_config, to_dict
from trainers import steps as steps_module
from trainers.loop import train
from trainers.state import build_context

ROOT = Path(__file__).resolve().parents[2]
C2I = ROOT / "sweeps" / "presets" / "tiny_c2i.yaml"
T2I = ROOT / "sweeps" / "presets" / "tiny_t2i.yaml"
TINY = ["world.spec=test", "train.grid_size=16", "train.batch_size=8", "gan.layers=[-1]"]


def run(preset, out, *overrides, resume=False, ctx=None):
    cfg = load_config(preset, [*TINY, f"output_dir={out}", *overrides])
    return train(cfg, to_dict(cfg), resume=resume, ctx=ctx, progress=False), cfg


@pytest.fixture(scope="module")
def c2i_ctx(test_world):
    cfg = load_config(C2I, TINY)
    return build_context(cfg, progress=False)


def test_c2i_run_writes_checkpoint_grid_and_keeps_embedding_frozen(tmp_path, c2i_ctx):
    result, cfg = run(C2I, tmp_path, "train.steps=3", "train.checkpoint_every=2", ctx=c2i_ctx)
    ckpt = result.checkpoint
    assert ckpt.name == "step_00000003"
    for name in ("generator", "ema", "auxiliary", "discriminator", "optim", "rng"):
        assert (ckpt / f"{name}.safetensors").is_file()
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["step"] == 3 and meta["images_seen"] == 3 * cfg.train.batch_size
    assert meta["config"]["gan"]["weight"] == cfg.gan.weight and len(meta["config_hash"]) == 16
    assert Image.open(result.grid).size[0] > 32
    teacher = c2i_ctx.teacher.backbone.state_dict()
    student = load_file(str(ckpt / "generator.safetensors"))
    assert torch.equal(student["tok_emb.weight"], teacher["tok_emb.weight"].cpu())
    changed = [k for k in student if not torch.equal(student[k], teacher[k].cpu())]
    assert any(k.startswith("blocks.") for k in changed) and "head.weight" in changed
    assert {"loss/dimo", "loss/auxiliary", "loss/gan_generator", "loss/discriminator"} <= set(result.metrics)


def test_resume_is_bitwise_identical(tmp_path, c2i_ctx):
    common = ("train.checkpoint_every=2", "generator.init_mask_ratio=[0.3,0.8]")
    straight, _ = run(C2I, tmp_path / "a", "train.steps=4", *common, ctx=c2i_ctx)
    run(C2I, tmp_path / "b", "train.steps=2", *common, ctx=c2i_ctx)
    resumed, _ = run(C2I, tmp_path / "b", "train.steps=4", *common, resume=True, ctx=c2i_ctx)
    assert resumed.checkpoint.name == straight.checkpoint.name == "step_00000004"
    for name in ("generator", "ema", "auxiliary", "discriminator", "optim", "rng"):
        a = load_file(str(straight.checkpoint / f"{name}.safetensors"))
        b = load_file(str(resumed.checkpoint / f"{name}.safetensors"))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_resume_refuses_a_different_config(tmp_path, c2i_ctx):
    from trainers.loop import ResumeError

    run(C2I, tmp_path, "train.steps=1", ctx=c2i_ctx)
    with pytest.raises(ResumeError):
        run(C2I, tmp_path, "train.steps=2", "gan.weight=5", resume=True, ctx=c2i_ctx)


def _count_calls(monkeypatch, ctx):
    calls = {"discriminate": 0, "decode_probs": 0}
    real_discriminate, real_decode = steps_module.discriminate, ctx.teacher.decode_probs

    def discriminate(*args, **kwargs):
        calls["discriminate"] += 1
        return real_discriminate(*args, **kwargs)

    def decode_probs(p, cond=None):
        calls["decode_probs"] += 1
        return real_decode(p, cond)

    monkeypatch.setattr(steps_module, "discriminate", discriminate)
    monkeypatch.setattr(ctx.teacher, "decode_probs", decode_probs)
    return calls


def test_zero_weights_cost_no_forward_pass(tmp_path, monkeypatch, c2i_ctx):
    calls = _count_calls(monkeypatch, c2i_ctx)
    result, _ = run(C2I, tmp_path / "off", "train.steps=2", "gan.weight=0", "reward.weight=0",
                    ctx=c2i_ctx)
    # The only soft decode is the final sample grid's soft-vs-hard diagnostic, none in the steps.
    assert calls == {"discriminate": 0, "decode_probs": 1}
    assert "loss/gan_generator" not in result.metrics and "loss/discriminator" not in result.metrics
    # The GAN starts at step 2: one generator-side and one discriminator-side call in step 2 only.
    run(C2I, tmp_path / "late", "train.steps=3", "gan.weight=1", "gan.start_step=2", ctx=c2i_ctx)
    assert calls["discriminate"] == 2 and calls["decode_probs"] == 2


def test_t2i_reward_run_logs_rewards(tmp_path, test_world):
    seen = []
    cfg = load_config(T2I, [*TINY, f"output_dir={tmp_path}", "train.steps=2", "train.log_every=1"])
    from trainers.loop import Hooks

    train(cfg, to_dict(cfg), hooks=Hooks(on_metrics=lambda step, m: seen.append(m)), progress=False)
    step_metrics = [m for m in seen if "loss/total" in m]
    assert len(step_metrics) == 2
    assert {"reward/clip", "reward/quality", "loss/reward"} <= set(step_metrics[-1])
    assert all(torch.isfinite(torch.tensor(m["loss/total"])) for m in step_metrics)
    grid_metrics = [m for m in seen if "ema/soft_hard_decode_mse" in m]
    assert len(grid_metrics) == 1 and grid_metrics[0]["ema/soft_hard_decode_mse"] >= 0


@pytest.mark.parametrize("variant", [
    ["embedding.kind=gumbel_st"], ["dimo.soft_input=true"], ["dimo.divergence=jeffreys", "dimo.beta=-0.2"],
    ["dimo.divergence=rkl", "embedding.temperature=2.0", "dimo.mask_clamp=[0.1,0.9]"],
])
def test_ablation_options_run(tmp_path, c2i_ctx, variant):
    result, _ = run(C2I, tmp_path, "train.steps=1", *variant, ctx=c2i_ctx)
    assert all(torch.isfinite(torch.tensor(v)) for k, v in result.metrics.items() if k.startswith("loss/"))


def test_generate_cli(tmp_path, test_world, c2i_ctx):
    run(C2I, tmp_path / "run", "train.steps=1", ctx=c2i_ctx)
    out = tmp_path / "samples"
    env = {**__import__("os").environ}
    cmd = [sys.executable, "-m", "orchestrator.generate", str(tmp_path / "run"), "--out", str(out),
           "--num", "5", "--temperature", "0.5"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert len(list(out.glob("0*.png"))) == 5 and (out / "grid.png").is_file()
    records = json.loads((out / "samples.json").read_text())["images"]
    assert [r["condition"] for r in records][:2] == ["a photo of a red circle", "a photo of a green circle"]
    prompts = tmp_path / "p.txt"
    prompts.write_text("a photo of a red circle\n")
    bad = subprocess.run(cmd[:-2] + ["--prompts", str(prompts)], cwd=ROOT, capture_output=True,
                         text=True, env=env, timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_real_network_rewards_come_from_the_scorer_factory(tmp_path, test_world):
    """reward.terms naming HPS trains through the factory's differentiable scorer (a tiny real
    open_clip ViT stands in for ViT-H-14 here); without staged weights the CLI stops at once."""
    import open_clip

    from evaluators.networks.clip_scores import HpsScorer

    torch.manual_seed(0)
    tiny = open_clip.create_model("ViT-B-32", pretrained=None)   # built from code, random weights
    scorer = HpsScorer.from_model(tiny, version="v2.1")
    made = []

    def factory(name, device):
        made.append(name)
        return scorer

    overrides = [*TINY, f"output_dir={tmp_path}", "train.steps=2", "train.log_every=1",
                 "reward.terms=[{name: hps_v21, weight: 1.0}]"]
    cfg = load_config(T2I, overrides)
    ctx = build_context(cfg, progress=False, reward_factory=factory)
    seen = []
    from trainers.loop import Hooks

    train(cfg, to_dict(cfg), ctx=ctx, hooks=Hooks(on_metrics=lambda s, m: seen.append(m)), progress=False)
    assert made == ["hps_v21"]
    assert all("reward/hps_v21" in m for m in seen if "loss/total" in m)
    cmd = [sys.executable, "-m", "orchestrator.train", str(T2I), *overrides, "--quiet"]
    env = {**__import__("os").environ, "SOFTDIMO_WEIGHTS": str(tmp_path / "none")}
    bad = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.count("\n") == 1 and "hps_v21" in bad.stderr and "reward.terms" in bad.stderr
