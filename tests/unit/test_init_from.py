"""``init.checkpoint``: the two-stage recipe (θ and its EMA from a Di[M]O run's EMA, ψ from its ψ; η
and optimizers fresh)."""
import json

import pytest
import torch

from orchestrator.config import UserError, load_config, to_dict
from trainers import checkpoint as ckpt
from trainers.config import ConfigValueError
from trainers.loop import train
from tests.unit.test_golden_losses import ROOT


def _cfg(out, *extra):
    return load_config(ROOT / "sweeps/presets/tiny_c2i.yaml",
                       ["world.spec=test", "train.steps=2", "train.batch_size=8", "train.grid_size=4",
                        "train.checkpoint_every=2", f"output_dir={out}", "train.device=cpu", *extra])


def test_a_run_starts_from_another_runs_student_with_a_fresh_discriminator(test_world, tmp_path):
    # trains η too, so a stage-1 η would show below; no warm-up, so θ moves away from its EMA
    stage1 = _cfg(tmp_path / "dimo", "train.warmup_steps=0", "train.lr_generator=1e-3")
    first = train(stage1, to_dict(stage1), progress=False).checkpoint
    still = ["train.steps=1", "train.checkpoint_every=1", "train.lr_generator=1e-12",
             "train.lr_auxiliary=1e-12", "train.lr_discriminator=1e-12"]
    stage2 = _cfg(tmp_path / "gan", f"init.checkpoint={tmp_path / 'dimo'}", *still)
    second = train(stage2, to_dict(stage2), progress=False).checkpoint
    meta = ckpt.read_meta(second)
    assert meta["step"] == 1 and meta["init_from"]["step"] == 2
    assert meta["init_from"]["checkpoint"] == str(first.resolve())
    # θ, its EMA and ψ started from stage 1 (lr ~ 0: unchanged): θ and the EMA from stage 1's EMA,
    # the paper's "provided one-step generator" (so the restarted EMA warm-up starts at θ)
    e1, g1 = ckpt.load_weights(first, "ema"), ckpt.load_weights(first, "generator")
    assert any(not torch.allclose(e1[k], g1[k], atol=1e-5) for k in e1)   # so the checks can fail
    for name, source in (("generator", "ema"), ("ema", "ema"), ("auxiliary", "auxiliary")):
        a, b = ckpt.load_weights(first, source), ckpt.load_weights(second, name)
        assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), name
    assert meta["init_from"]["generator"] == "ema"
    fresh = _cfg(tmp_path / "fresh", *still)
    fresh_disc = ckpt.load_weights(train(fresh, to_dict(fresh), progress=False).checkpoint,
                                   "discriminator")
    d2, d1 = ckpt.load_weights(second, "discriminator"), ckpt.load_weights(first, "discriminator")
    assert all(torch.allclose(d2[k], fresh_disc[k], atol=1e-6) for k in d2)   # η as a fresh run's
    assert any(not torch.allclose(d2[k], d1[k], atol=1e-6) for k in d2)      # not stage 1's
    assert json.loads((tmp_path / "gan" / "config.json").read_text())["init"]["checkpoint"]


def test_init_checkpoint_errors_name_the_key(test_world, tmp_path):
    with pytest.raises(UserError, match=r"init.checkpoint: .*no checkpoint found"):
        _cfg(tmp_path / "x", f"init.checkpoint={tmp_path / 'nothing'}")
    t2i = load_config(ROOT / "sweeps/presets/tiny_t2i.yaml",
                      ["world.spec=test", "train.steps=1", "train.batch_size=8", "train.grid_size=4",
                       "train.checkpoint_every=1", f"output_dir={tmp_path / 't2i'}", "train.device=cpu"])
    train(t2i, to_dict(t2i), progress=False)
    cfg = _cfg(tmp_path / "c2i", f"init.checkpoint={tmp_path / 't2i'}")
    with pytest.raises(ConfigValueError, match="trained on teacher 'world_t2i'"):
        train(cfg, to_dict(cfg), progress=False)
