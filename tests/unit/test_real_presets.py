"""The real teachers' presets: Table 5's values, and absent weights stop at once with one line."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.config import UserError, load_config

ROOT = Path(__file__).resolve().parents[2]
PRESETS = {"maskgit": "transformer", "maskbit": "generator", "meissonic": "folder",
           "maskgen_l": "generator", "amused_256": "folder", "amused_512": "folder"}


@pytest.fixture
def no_weights(monkeypatch, tmp_path):
    monkeypatch.setenv("SOFTDIMO_WEIGHTS", str(tmp_path / "empty"))


@pytest.mark.parametrize("name, first_key", PRESETS.items())
def test_absent_weights_fail_at_once_naming_the_file(name, first_key, no_weights, tmp_path):
    with pytest.raises(UserError) as err:
        load_config(ROOT / "sweeps/presets" / f"{name}.yaml")
    message = str(err.value)
    assert f"teacher.paths.{first_key}: {tmp_path / 'empty'}" in message and "\n" not in message


def test_preset_cli_exit_code_2(tmp_path):
    env = {**os.environ, "SOFTDIMO_WEIGHTS": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "orchestrator.train", "sweeps/presets/maskgit.yaml"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "teacher.paths.transformer" in proc.stderr


def stage(root: Path, preset: str) -> None:
    """Empty files at every path the preset names under $SOFTDIMO_WEIGHTS (existence is checked)."""
    import yaml

    body = yaml.safe_load((ROOT / "sweeps/presets" / f"{preset}.yaml").read_text())
    prefix = "${oc.env:SOFTDIMO_WEIGHTS,weights}/"
    values = list(body["teacher"]["paths"].values()) + list(body.get("data", {}).values())
    for value in values:
        path = root / value[len(prefix):]
        if path.suffix:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("x\n")
        else:
            path.mkdir(parents=True, exist_ok=True)


# Table 5: batch, steps, teacher CFG, r_init, divergence (β), sampling temperature, schedule, GAN weight,
# GAN mask range, heads, reward weight, learning rate
TABLE5 = {
    "maskgit": (256, 30000, 2.0, [0.6], ("jeffreys", -0.2), 12.0, "arccos", 100.0, [0.0, 0.5], 4, 0.0, 1e-5),
    "maskbit": (256, 50000, 1.5, [0.6], ("fkl", 0.0), 0.1, "arccos", 25.0, [0.0, 0.95], 4, 0.0, 1e-6),
    "meissonic": (16, 10000, 4.0, [0.6], ("fkl", 0.0), 0.5, "cosine", 0.0, None, None, 2000.0, 1e-6),
    "maskgen_l": (64, 50000, 4.0, [0.9], ("fkl", 0.0), 1.0, "arccos", 100.0, [0.0, 0.95], 6, 2000.0, 1e-6),
}


@pytest.mark.parametrize("name", TABLE5)
def test_presets_carry_table_5(name, monkeypatch, tmp_path):
    monkeypatch.setenv("SOFTDIMO_WEIGHTS", str(tmp_path))
    stage(tmp_path, name)
    cfg = load_config(ROOT / "sweeps/presets" / f"{name}.yaml")
    batch, steps, cfg_w, r_init, (div, beta), temp, sched, gan_w, gan_range, heads, rew_w, lr = TABLE5[name]
    assert (cfg.train.batch_size, cfg.train.steps, cfg.dimo.teacher_cfg) == (batch, steps, cfg_w)
    assert cfg.generator.init_mask_ratio == r_init and (cfg.dimo.divergence, cfg.dimo.beta) == (div, beta)
    # H.1: "All model temperatures are fixed to 1 during distillation"; Table 5's sampling
    # temperature is the generation one, and the centre of the evaluation sweep (H.5)
    assert cfg.generator.temperature == 1.0 and cfg.generator.eval_temperature == temp
    sweep = cfg.generator.eval_temperatures
    assert sorted(sweep) == list(sweep) and sweep[len(sweep) // 2] == temp and len(sweep) % 2 == 1
    assert cfg.train.warmup_steps == 100                       # H.1: linear warm-up of 100 steps
    assert cfg.dimo.mask_schedule == cfg.dimo.aux_mask_schedule == sched
    assert cfg.gan.weight == gan_w and cfg.reward.weight == rew_w
    if gan_w:
        assert cfg.gan.mask_range == gan_range and len(cfg.gan.layers) == heads
    if rew_w:
        weights = {t.name: t.weight for t in cfg.reward.terms}
        assert weights == {"imagereward": 1.0, "clip": 0.2}        # CLIP relative weight 0.2
    assert cfg.train.lr_generator == cfg.train.lr_auxiliary == lr
    assert cfg.train.ema_decay == 0.9999 and cfg.train.optimizer == "adam"
    assert str(tmp_path) in cfg.teacher.paths[next(iter(cfg.teacher.paths))]


def test_world_kinds_refuse_real_teacher_keys():
    with pytest.raises(UserError, match="teacher.paths: is for real teachers"):
        load_config(ROOT / "sweeps/presets/tiny_c2i.yaml", ["teacher.paths.folder=/x"])


def test_real_teacher_config_checks(monkeypatch, tmp_path):
    monkeypatch.setenv("SOFTDIMO_WEIGHTS", str(tmp_path))
    stage(tmp_path, "meissonic")
    preset = ROOT / "sweeps/presets/meissonic.yaml"
    with pytest.raises(UserError, match="data.tokens: the GAN"):
        load_config(preset, ["gan.weight=1"])
    with pytest.raises(UserError, match="reward.terms.0.name: 'quality' is the embedded world"):
        load_config(preset, ["reward.terms=[{name: quality, weight: 1}]"])
    with pytest.raises(UserError, match="teacher.paths.foldr: not a file of meissonic"):
        load_config(preset, ["teacher.paths.foldr=/x"])
    with pytest.raises(UserError, match="data.captions: .* is not an existing file"):
        load_config(preset, [f"data.captions={tmp_path}/nope.txt"])
