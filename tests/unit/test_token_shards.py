"""Token shards (trainers/shards.py): written atomically, read back memory-mapped, validated
against the teacher when ``data.tokens`` names a manifest."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from trainers.config import Config, ConfigValueError, check_values
from trainers.shards import (CAPTIONS, FORMAT, MANIFEST, ShardError, TokenShards, shard_name,
                             shard_record, write_shard)


def make_shards(folder, sizes=(5, 0, 7), L=6, vocab=100, captions=True, seed=0):
    """Shards of ``sizes`` rows (shard_size 8: the missing rows were "bad"), manifest and captions."""
    g = np.random.default_rng(seed)
    records, all_tokens, index = [], [], 0
    for s, n in enumerate(sizes):
        tokens = g.integers(0, vocab, (n, L))
        idx = np.arange(s * 8, s * 8 + n)
        records.append(write_shard(folder, s, tokens, idx, idx % 3, 8, 8 - n, ["x.png: bad"] * (8 - n),
                                   vocab, L))
        all_tokens.append(tokens)
    manifest = {"format": FORMAT, "teacher": "world_c2i", "conditioning": "class", "seq_len": L,
                "vocab": vocab, "image_size": 32, "items": 8 * len(sizes), "shard_size": 8,
                "rows": sum(sizes), "bad": sum(8 - n for n in sizes), "classes": [],
                "captions": CAPTIONS if captions else None, "shards": records}
    (folder / MANIFEST).write_text(json.dumps(manifest))
    if captions:
        (folder / CAPTIONS).write_text("\n".join(f"caption {i}" for i in range(8 * len(sizes))) + "\n")
    return np.concatenate(all_tokens), records


def test_round_trip_memory_mapped_across_shards(tmp_path):
    tokens, records = make_shards(tmp_path)
    assert [r["rows"] for r in records] == [5, 0, 7] and records[1]["bad"] == 8
    assert not list(tmp_path.glob("*.tmp"))                       # written through a rename
    shards = TokenShards.open(tmp_path / MANIFEST)
    assert shards.shape == (12, 6) and len(shards) == 12
    assert isinstance(shards.parts[0], np.memmap) and shards.parts[0].dtype == np.int16
    assert torch.equal(shards[torch.arange(12)], torch.from_numpy(tokens))
    rows = torch.tensor([11, 0, 4, 5, 5])                         # across the boundary, repeated
    assert torch.equal(shards[rows], torch.from_numpy(tokens[rows.numpy()]))
    assert shards[3].shape == (1, 6) and shards[2:4].shape == (2, 6)
    assert shards.index.tolist() == [0, 1, 2, 3, 4] + list(range(16, 23))
    assert shards.captions[5] == "caption 16"                     # row 5 is input item 16
    assert shards.id_range() == (int(tokens.min()), int(tokens.max()))
    with pytest.raises(IndexError):
        shards[torch.tensor([12])]
    assert TokenShards.open(tmp_path).shape == (12, 6)            # the folder works too


def test_large_vocabularies_use_int32(tmp_path):
    write_shard(tmp_path, 0, np.array([[40000, 1]]), [0], [-1], 1, 0, [], 65536, 2)
    from safetensors import safe_open

    with safe_open(str(tmp_path / shard_name(0)), "pt") as f:
        assert f.get_tensor("tokens").dtype == torch.int32


def test_unreadable_manifests_and_missing_shards_name_the_file(tmp_path):
    make_shards(tmp_path)
    (tmp_path / "other.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ShardError, match="other.json: not a token manifest"):
        TokenShards.open(tmp_path / "other.json")
    (tmp_path / shard_name(2)).unlink()
    with pytest.raises(ShardError, match="shard-00002.safetensors is missing"):
        TokenShards.open(tmp_path / MANIFEST)


def test_world_trains_from_a_manifest(tmp_path, test_world):
    """shard_data: the world teacher accepts a matching manifest, rejects a foreign one."""
    from trainers.state import shard_data

    teacher = test_world.teacher("c2i")
    data = test_world.data("c2i")
    write_shard(tmp_path, 0, data.tokens[:10].numpy(), np.arange(10), data.labels[:10].numpy(), 10, 0, [],
                teacher.V, teacher.seq_len)
    manifest = {"format": FORMAT, "teacher": "world_t2i", "conditioning": "class",
                "seq_len": teacher.seq_len, "vocab": teacher.V, "image_size": 32, "items": 10,
                "shard_size": 10, "rows": 10, "bad": 0, "classes": [], "captions": None,
                "shards": [shard_record(tmp_path / shard_name(0))]}
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    source = shard_data(str(tmp_path / MANIFEST), teacher, "world_c2i", None, torch.device("cpu"))
    tokens, labels, prompts = source.sample(4, torch.Generator().manual_seed(0))
    assert tokens.shape == (4, teacher.seq_len) and tokens.dtype == torch.long
    assert set(labels.tolist()) <= set(data.labels[:10].tolist()) and len(prompts) == 4
    for bad in ({"teacher": "maskgit"}, {"seq_len": teacher.seq_len + 1}):
        (tmp_path / "bad.json").write_text(json.dumps({**manifest, **bad}))
        with pytest.raises(ConfigValueError, match="data.tokens"):
            shard_data(str(tmp_path / "bad.json"), teacher, "world_c2i", None, torch.device("cpu"))


def test_config_accepts_a_manifest_for_world_and_text_teachers():
    cfg = Config()
    cfg.data.tokens = "tokens/manifest.json"
    check_values(cfg)                                             # world_c2i: tokens may replace its own
    cfg.data.captions = "prompts.txt"
    with pytest.raises(ConfigValueError, match="data.captions"):
        check_values(cfg)
    cfg = Config()
    cfg.teacher.kind, cfg.gan.weight = "maskgen", 0.0
    cfg.reward.terms = []
    with pytest.raises(ConfigValueError, match="data.captions"):
        check_values(cfg)
    cfg.data.tokens = "tokens/manifest.json"                      # the manifest's captions serve
    check_values(cfg)
