"""Config schema, presets, overrides and the one-line errors of the CLIs."""
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.config import UserError, from_dict, load_config, to_dict
from trainers.config import Config, config_hash

ROOT = Path(__file__).resolve().parents[2]
PRESETS = sorted((ROOT / "sweeps" / "presets").glob("tiny_*.yaml"))


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_presets_load_and_round_trip(preset):
    cfg = load_config(preset)
    assert isinstance(cfg, Config)
    again = from_dict(to_dict(cfg), "dict")
    assert to_dict(again) == to_dict(cfg)


def test_overrides_apply_with_types():
    cfg = load_config(PRESETS[0], ["train.steps=7", "gan.mask_range=[0.0,0.95]",
                                   "generator.init_mask_ratio=[0.1,0.9]", "embedding.kind=gumbel_st",
                                   "reward.terms=[{name: clip, weight: 0.2}]"])
    assert cfg.train.steps == 7
    assert cfg.gan.mask_range == [0.0, 0.95]
    assert cfg.generator.init_mask_ratio == [0.1, 0.9]
    assert cfg.embedding.kind == "gumbel_st"
    assert cfg.reward.terms[0].name == "clip" and cfg.reward.terms[0].weight == 0.2


@pytest.mark.parametrize("override, key", [
    ("train.stepz=3", "train.stepz"),
    ("train.steps=abc", "train.steps"),
    ("train.steps=0", "train.steps"),
    ("gan.mask_range=[0.6,0.2]", "gan.mask_range"),
    ("gan.mask_range=[0.0,1.5]", "gan.mask_range"),
    ("gan.weight=-1", "gan.weight"),
    ("embedding.temperature=0", "embedding.temperature"),
    ("embedding.kind=hard", "embedding.kind"),
    ("dimo.divergence=tv", "dimo.divergence"),
    ("reward.terms=[{name: nope, weight: 1}]", "reward.terms.0.name"),
    ("reward.terms=[{name: clip, weight: -1}]", "reward.terms.0.weight"),
    ("generator.init_mask_ratio=[0.2,0.1]", "generator.init_mask_ratio"),
])
def test_bad_values_name_file_and_key(override, key):
    with pytest.raises(UserError) as err:
        load_config(PRESETS[0], [override])
    message = str(err.value)
    assert str(PRESETS[0]) in message and key in message
    assert "\n" not in message


def test_unknown_key_in_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: 3\n  lr: 0.1\n")
    with pytest.raises(UserError, match=r"bad\.yaml: train\.lr"):
        load_config(bad)


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="file not found"):
        load_config(tmp_path / "nope.yaml")


def test_config_hash_changes_with_values():
    a = to_dict(load_config(PRESETS[0]))
    b = to_dict(load_config(PRESETS[0], ["gan.weight=2"]))
    assert config_hash(a) == config_hash(dict(a)) and config_hash(a) != config_hash(b)


@pytest.mark.parametrize("args, needle", [
    (["sweeps/presets/tiny_c2i.yaml", "gan.mask_range=[0.9,0.1]"], "gan.mask_range"),
    (["sweeps/presets/missing.yaml"], "missing.yaml: file not found"),
    (["sweeps/presets/tiny_c2i.yaml", "foo.bar=1"], "foo"),
])
def test_train_cli_exits_2_without_traceback(args, needle):
    proc = subprocess.run([sys.executable, "-m", "orchestrator.train", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_overrides_index_lists_and_extend_mappings():
    """The one override engine (train CLI and sweeps): list items by index, new keys in mapping fields."""
    from omegaconf import OmegaConf

    from orchestrator.config import apply_overrides

    cfg = load_config(ROOT / "sweeps/presets/tiny_t2i.yaml", ["reward.terms.1.weight=0.5"])
    assert cfg.reward.terms[1].weight == 0.5
    raw = apply_overrides(OmegaConf.structured(Config), ["teacher.paths.extra=/x", "teacher.options.size=3"], "t")
    assert raw.teacher.paths["extra"] == "/x" and raw.teacher.options["size"] == 3


@pytest.mark.parametrize("override, needle", [
    ("reward.terms.7.weight=0.5", "index 7 out of range"),
    ("reward.terms.x.weight=0.5", "reward.terms is a list: 'x' is not an index"),
    ("train.steps.x=1", "train.steps is a single value"),
    ("train.nope.x=1", "not a key of the training config"),
    ("=1", "is not of the form key=value"),
    ("train.steps=[1", "train.steps"),
])
def test_override_errors_are_one_line(override, needle):
    with pytest.raises(UserError) as err:
        load_config(ROOT / "sweeps/presets/tiny_t2i.yaml", [override])
    assert needle in str(err.value) and "\n" not in str(err.value)
