"""The weights registry: lookup order, one-line errors naming key and file, the README table."""

import pytest
import torch

from evaluators.networks.weights import (WEIGHT_FILES, WEIGHTS_ENV, StateDictMismatch, WeightsMissing,
                                expected_files, load_strict, resolve, set_offline_env)

BRIEF_KEYS = {"inception", "clean_fid_inception", "adm_ref", "clip_g14", "hps_v2", "hps_v21", "pickscore",
              "pickscore_proc", "imagereward", "imagereward_med", "bert_vocab", "geneval_meta",
              "mask2former", "clip_l14"}


pytestmark = pytest.mark.usefixtures("no_network")




@pytest.fixture
def staged(tmp_path, monkeypatch):
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path))
    return tmp_path


def stage(root, relative):
    path = root / relative
    if relative.endswith("/"):
        path.mkdir(parents=True)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    return path


def test_registry_has_the_shared_keys_with_folders_marked():
    assert set(WEIGHT_FILES) == BRIEF_KEYS
    assert {k for k, e in WEIGHT_FILES.items() if e.is_dir} == {"pickscore", "pickscore_proc",
                                                                "mask2former"}
    assert WEIGHT_FILES["hps_v21"].path == "hps/HPS_v2.1_compressed.pt"
    assert all(e.source and e.description for e in WEIGHT_FILES.values())


def test_resolve_finds_the_registered_file_then_its_alternatives(staged):
    main = stage(staged, WEIGHT_FILES["hps_v2"].path)
    assert resolve("hps_v2") == main
    alt = stage(staged, WEIGHT_FILES["clip_g14"].alternatives[0])
    assert resolve("clip_g14") == alt
    assert alt.suffix == ".bin"
    folder = stage(staged, WEIGHT_FILES["pickscore"].path)
    assert resolve("pickscore") == folder


def test_explicit_path_wins_and_must_exist(staged, tmp_path):
    stage(staged, WEIGHT_FILES["imagereward"].path)
    explicit = tmp_path / "elsewhere.pt"
    explicit.write_bytes(b"x")
    assert resolve("imagereward", explicit) == explicit
    with pytest.raises(WeightsMissing) as err:
        resolve("imagereward", tmp_path / "nope.pt")
    assert "nope.pt" in str(err.value) and err.value.key == "imagereward"


def test_missing_file_message_is_one_line_naming_key_file_and_source(staged):
    with pytest.raises(WeightsMissing) as err:
        resolve("hps_v21")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("hps_v21: ")
    assert str(staged / "hps/HPS_v2.1_compressed.pt") in message
    assert "xswu/HPSv2" in message and "$SOFTDIMO_WEIGHTS" in message
    assert isinstance(err.value, FileNotFoundError)
    assert err.value.path == staged / "hps/HPS_v2.1_compressed.pt"


def test_kind_matters_a_file_is_not_a_folder(staged):
    (staged / "pickscore").mkdir()
    (staged / "pickscore" / "PickScore_v1").write_bytes(b"x")
    with pytest.raises(WeightsMissing):
        resolve("pickscore")
    with pytest.raises(WeightsMissing, match="not an existing file"):
        resolve("imagereward_med", staged)


def test_unset_environment_says_so(monkeypatch):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    with pytest.raises(WeightsMissing, match=r"SOFTDIMO_WEIGHTS is not set") as err:
        resolve("inception")
    assert "pt_inception-2015-12-05-6726825d.pth" in str(err.value)


def test_unknown_key_lists_known_keys():
    with pytest.raises(KeyError, match="clip_g14.*hps_v21"):
        resolve("clip_h14")


def test_expected_files_is_a_markdown_table_of_every_key():
    lines = expected_files().splitlines()
    assert lines[0].startswith("| key |") and set(lines[1]) <= {"|", "-"}
    assert len(lines) == 2 + len(WEIGHT_FILES)
    for key, entry in WEIGHT_FILES.items():
        row = next(line for line in lines if line.startswith(f"| `{key}` |"))
        assert entry.path in row and row.count("|") == 5


def test_set_offline_env(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    set_offline_env()
    import os
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["TRANSFORMERS_OFFLINE"] == "1"


def test_load_strict_lists_missing_unexpected_and_shapes():
    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    good = {k: torch.randn_like(v) for k, v in net.state_dict().items()}
    load_strict(net, good, "good.pt")
    assert torch.equal(net[0].weight, good["0.weight"])
    bad = dict(good)
    del bad["1.bias"]
    bad["2.weight"] = torch.zeros(1)
    bad["0.weight"] = torch.zeros(4, 3)
    with pytest.raises(StateDictMismatch) as err:
        load_strict(net, bad, "bad.pt")
    message = str(err.value)
    assert "bad.pt" in message and "1.bias" in message and "2.weight" in message
    assert "0.weight (4, 3) != (2, 3)" in message
    assert torch.equal(net[0].weight, good["0.weight"])   # nothing loaded

