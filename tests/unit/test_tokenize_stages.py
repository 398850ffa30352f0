"""orchestrator.tokenize's stages called directly (no Ray): listing the three input layouts,
decoding (bad images become counted errors), encoding, assembling shards, resuming, and the
one-line errors of bad input."""
from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from orchestrator.config import UserError
from orchestrator.tokenize import (EncodeBatch, ShardAssembler, decode_batch, finished_shards,
                                   parser, prepare_out, run)
from orchestrator.tokenize_inputs import InputError, decode_item, list_inputs
from softdimo.teachers.encoding import Preprocess
from trainers.shards import TokenShards, write_shard

PRE = Preprocess(8)


def png(seed: int, size=(8, 8)) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_class_folders_give_sorted_labels_and_a_flat_folder_none(tmp_path):
    for cls, n in (("n02", 2), ("n01", 1)):
        (tmp_path / "tree" / cls).mkdir(parents=True)
        for i in range(n):
            (tmp_path / "tree" / cls / f"{i}.png").write_bytes(png(i))
    (tmp_path / "tree" / "n01" / "notes.txt").write_text("not an image")
    items, classes = list_inputs([str(tmp_path / "tree")])
    assert classes == ["n01", "n02"] and [it["label"] for it in items] == [0, 1, 1]
    assert [it["index"] for it in items] == [0, 1, 2]
    items, classes = list_inputs([str(tmp_path / "tree" / "n02")])
    assert classes == [] and {it["label"] for it in items} == {-1}


def test_lists_resolve_relative_paths_and_name_bad_lines(tmp_path):
    (tmp_path / "a.png").write_bytes(png(0))
    (tmp_path / "l.jsonl").write_text('{"image": "a.png", "caption": "a red\\n circle"}\n\n'
                                      '{"image": "b.png", "label": 3}\n')
    items, _ = list_inputs([str(tmp_path / "l.jsonl")])
    assert items[0]["path"] == str(tmp_path / "a.png") and items[0]["caption"] == "a red circle"
    assert items[1]["label"] == 3                              # listed; decoding reports it missing
    (tmp_path / "l.tsv").write_text("image\tcaption\na.png\ttwo squares\n")
    assert [it["caption"] for it in list_inputs([str(tmp_path / "l.tsv")])[0]] == ["two squares"]
    (tmp_path / "bad.jsonl").write_text('{"image": "a.png"}\n{"caption": "no image"}\n')
    with pytest.raises(InputError, match=r"bad.jsonl:2: needs an \"image\""):
        list_inputs([str(tmp_path / "bad.jsonl")])
    with pytest.raises(InputError, match="does not exist"):
        list_inputs([str(tmp_path / "nope")])


def test_webdataset_members_are_read_by_offset(tmp_path):
    tar = tmp_path / "shard-000.tar"
    with tarfile.open(tar, "w") as tf:
        for key, data in (("s0.png", png(1)), ("s0.txt", b"a cat"), ("s0.cls", b"7"),
                          ("s1.jpg", b"\xff\xd8 not really a jpeg"), ("s1.json", b'{"caption": "dog"}')):
            info = tarfile.TarInfo(key)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    items, _ = list_inputs([str(tar)])
    assert [(it["caption"], it["label"]) for it in items] == [("a cat", 7), ("dog", -1)]
    image, error = decode_item(items[0], PRE)
    assert error == "" and np.array_equal(image, np.asarray(Image.open(io.BytesIO(png(1)))).transpose(2, 0, 1))
    image, error = decode_item(items[1], PRE)
    assert image is None and "shard-000.tar@" in error           # counted, not raised


def world_items(tmp_path, test_world, n=10, broken=(3,)):
    """n world images as PNG files (item i = image i), some of them broken."""
    data = test_world.data("c2i")
    items = []
    for i in range(n):
        p = tmp_path / f"{i}.png"
        if i in broken:
            p.write_bytes(b"\x89PNG truncated")
        else:
            Image.fromarray(data.images[i].permute(1, 2, 0).numpy()).save(p)
        items.append({"index": i, "path": str(p), "offset": -1, "size": -1,
                      "label": int(data.labels[i]), "caption": ""})
    return items, data


def test_decode_encode_assemble_skip_bad_images(tmp_path, test_world):
    items, data = world_items(tmp_path, test_world)
    cache = os.environ["SOFTDIMO_CACHE"]
    encode = EncodeBatch("world_c2i", {}, {"spec": "test", "cache_dir": cache}, "cpu")
    pre = encode.encoder.preprocess
    out = tmp_path / "out"
    out.mkdir()
    asm = ShardAssembler(out, 4, len(items), encode.encoder.V, encode.encoder.seq_len)
    cols = lambda rows: {k: np.asarray([r[k] for r in rows]) for k in rows[0]}
    for rows in (items[8:], items[:3], items[3:8]):               # batches arrive out of order
        asm.add(encode(decode_batch(cols(rows), pre)))
    assert sorted(asm.records) == [0, 1, 2] and not asm.rows
    assert asm.records[0]["bad"] == 1 and "3.png" in asm.records[0]["errors"][0]
    assert [asm.records[s]["rows"] for s in range(3)] == [3, 4, 2]
    from trainers.shards import FORMAT, MANIFEST

    (out / MANIFEST).write_text(json.dumps({"format": FORMAT, "seq_len": encode.encoder.seq_len,
                                            "shards": [asm.records[s] for s in range(3)]}))
    shards = TokenShards.open(out / MANIFEST)
    keep = [i for i in range(10) if i != 3]
    assert shards.index.tolist() == keep
    assert torch.equal(shards[torch.arange(9)], data.tokens[keep])
    assert torch.equal(shards.labels, data.labels[keep])
    assert sorted(finished_shards(out, 3)) == [0, 1, 2]


def test_resume_refuses_another_job(tmp_path):
    prepare_out(tmp_path / "o", {"teacher": "maskgit", "items": 3})
    prepare_out(tmp_path / "o", {"teacher": "maskgit", "items": 3})          # same job: fine
    with pytest.raises(UserError, match="another tokenization"):
        prepare_out(tmp_path / "o", {"teacher": "maskgit", "items": 4})


def test_a_finished_job_reruns_without_work(tmp_path, test_world):
    """All shards present: the rerun rewrites the manifest and encodes nothing (Ray not started)."""
    items, _ = world_items(tmp_path, test_world, n=4, broken=())
    (tmp_path / "imgs").mkdir()
    for it in items:
        os.replace(it["path"], tmp_path / "imgs" / os.path.basename(it["path"]))
    args = parser().parse_args([str(tmp_path / "imgs"), "--out", str(tmp_path / "o"), "--teacher",
                                "world_c2i", "--world-spec", "test", "--shard-size", "4", "--quiet"])
    listed, _ = list_inputs([str(tmp_path / "imgs")])
    from softdimo.teachers.encoding import load_encoder

    enc = load_encoder("world_c2i", options={"spec": "test", "cache_dir": os.environ["SOFTDIMO_CACHE"]})
    prepare_out(tmp_path / "o", {})                        # a stale job file: the rerun must refuse it
    with pytest.raises(UserError, match="another tokenization"):
        run(args, log=lambda *_: None)
    (tmp_path / "o" / "job.json").unlink()
    write_shard(tmp_path / "o", 0, np.zeros((4, enc.seq_len)), np.arange(4), np.zeros(4), 4, 0, [],
                enc.V, enc.seq_len)
    result = run(args, log=lambda *_: None)
    assert result["encoded_items"] == 0 and result["rows"] == 4 and len(listed) == 4


@pytest.mark.parametrize("argv, message", [
    (["{tmp}/nope", "--teacher", "world_c2i"], "nope: does not exist"),
    (["{tmp}", "--teacher", "dalle"], "--teacher: unknown kind 'dalle'"),
    (["{tmp}", "--teacher", "world_c2i", "--shard-size", "0"], "--shard-size: must be >= 1"),
    (["{tmp}", "--teacher", "maskgit", "--path", "vqgan={tmp}/x.ckpt"], "teacher.paths."),
    (["{tmp}", "--teacher", "world_c2i", "--option", "nokey"], "--option 'nokey': expected KEY=VALUE"),
])
def test_bad_input_is_one_user_error(tmp_path, argv, message):
    (tmp_path / "a.png").write_bytes(png(0))
    argv = [a.format(tmp=tmp_path) for a in argv] + ["--out", str(tmp_path / "o"), "--world-spec", "test"]
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        run(parser().parse_args(argv), log=lambda *_: None)


def test_a_preset_names_the_teacher_and_flags_override_it(monkeypatch, tmp_path):
    from pathlib import Path

    from orchestrator.tokenize import resolve_teacher

    monkeypatch.setenv("SOFTDIMO_WEIGHTS", str(tmp_path))
    preset = Path(__file__).resolve().parents[2] / "sweeps/presets/maskgit.yaml"
    args = parser().parse_args(["x", "--out", "o", "--config", str(preset), "--option", "f_factor=4",
                                "--path", "vqgan=/v.ckpt"])
    kind, paths, options = resolve_teacher(args)
    assert kind == "maskgit" and options["f_factor"] == 4 and paths["vqgan"] == "/v.ckpt"
    assert paths["transformer"] == f"{tmp_path}/maskgit/MaskGIT/MaskGIT_ImageNet_256.pth"


def test_webdataset_keys_keep_dotted_folders(tmp_path):
    tar = tmp_path / "s.tar"
    with tarfile.open(tar, "w") as tf:
        for key, data in (("v1.0/a.png", png(2)), ("v1.0/a.txt", b"one"), ("v1.0/c.png", png(3))):
            info = tarfile.TarInfo(key)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    assert [it["caption"] for it in list_inputs([str(tar)])[0]] == ["one", ""]
