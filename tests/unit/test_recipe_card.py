"""docs/recipes.md agrees with every real preset: each key the preset sets has a row, and every
row's value is the value the preset loads with (defaults included)."""
import re
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from orchestrator.config import load_config
from tests.unit.test_real_presets import stage

ROOT = Path(__file__).resolve().parents[2]
CARD = ROOT / "docs/recipes.md"
PRESETS = ("maskgit", "maskbit", "maskgen_l", "meissonic", "amused_256", "amused_512")
WEIGHTS = "${oc.env:SOFTDIMO_WEIGHTS,weights}/"
ROW = re.compile(r"^\| `([\w.]+)` \| `(.*)` \| (.+) \|$")


def card_rows(name: str) -> dict:
    """{key: (value text, source)} of the section '## <name>.yaml'."""
    section = CARD.read_text().split(f"\n## {name}.yaml\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        m = ROW.match(line)
        if m:
            assert m.group(1) not in rows, f"{name}: {m.group(1)} twice"
            rows[m.group(1)] = (m.group(2), m.group(3).strip())
    return rows


def leaves(node: dict, prefix: str = ""):
    for key, value in node.items():
        if isinstance(value, dict):
            yield from leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


@pytest.mark.parametrize("name", PRESETS)
def test_card_matches_the_preset(name, monkeypatch, tmp_path):
    monkeypatch.setenv("SOFTDIMO_WEIGHTS", str(tmp_path))
    stage(tmp_path, name)
    raw = yaml.safe_load((ROOT / "sweeps/presets" / f"{name}.yaml").read_text())
    loaded = OmegaConf.create(OmegaConf.to_container(OmegaConf.structured(
        load_config(ROOT / "sweeps/presets" / f"{name}.yaml"))))
    rows = card_rows(name)
    missing = [key for key in leaves(raw) if key not in rows]
    assert not missing, f"{name}: keys without a row in docs/recipes.md: {missing}"
    for key, (text, source) in rows.items():
        value = OmegaConf.select(loaded, key, default="<absent>")
        value = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
        if text.startswith("$SOFTDIMO_WEIGHTS/"):
            assert value == str(tmp_path / text[len("$SOFTDIMO_WEIGHTS/"):]), key
        else:
            expected = yaml.safe_load(text)
            assert value == expected, f"{name}: {key} is {value!r} in the preset, {expected!r} on the card"
        assert source and "TODO" not in source, f"{name}: {key} has no source"


def test_every_real_preset_has_a_card():
    presets = {p.stem for p in (ROOT / "sweeps/presets").glob("*.yaml") if not p.stem.startswith("tiny")}
    assert presets == set(PRESETS)
    for name in PRESETS:
        assert f"\n## {name}.yaml\n" in CARD.read_text()


def test_a_wrong_value_is_caught(monkeypatch, tmp_path):
    """The parser reads the cards: a changed value no longer matches."""
    rows = card_rows("maskgit")
    assert rows["generator.eval_temperature"][0] == "12.0" and rows["generator.temperature"][0] == "1.0"
    assert yaml.safe_load(rows["gan.layers"][0]) == [5, 11, 17, 23]
