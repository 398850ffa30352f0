"""End to end on the embedded world: render world images to a class folder and a captioned list,
tokenize them with ``python -m orchestrator.tokenize`` (Ray Data), check the tokens equal the
world's own encoding, resume after a lost shard, and train the world's student from the manifest."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from orchestrator.config import load_config, to_dict
from trainers.loop import train
from trainers.shards import MANIFEST, TokenShards, shard_name

ROOT = Path(__file__).resolve().parents[2]
N = 200


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module: the pipeline uses a running instance and leaves it up."""
    import logging

    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}})
    yield
    ray.shutdown()


def tokenize(*args: str) -> str:
    """``python -m orchestrator.tokenize ARGS`` in this process (the CLI's main); its stdout."""
    import contextlib
    import io

    from orchestrator.tokenize import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main([*args, "--world-spec", "test", "--threads", "1", "--quiet"]) == 0
    return buf.getvalue()


@pytest.fixture(scope="module")
def rendered(test_world, tmp_path_factory):
    """N class-to-image renders in class folders and N text-to-image renders in a .jsonl list
    (file name = the world's row), plus one corrupt and one missing image in the list."""
    root = tmp_path_factory.mktemp("renders")
    c2i, t2i = test_world.data("c2i"), test_world.data("t2i")
    for i in range(N):
        folder = root / "c2i" / f"class{int(c2i.labels[i]):02d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(c2i.images[i].permute(1, 2, 0).numpy()).save(folder / f"{i:05d}.png")
    (root / "t2i").mkdir()
    rows = []
    for i in range(N):
        Image.fromarray(t2i.images[i].permute(1, 2, 0).numpy()).save(root / "t2i" / f"{i:05d}.png")
        rows.append({"image": f"t2i/{i:05d}.png", "caption": t2i.captions[i]})
    (root / "t2i" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    rows[50:50] = [{"image": "t2i/corrupt.png", "caption": "broken"},
                   {"image": "t2i/missing.png", "caption": "gone"}]
    (root / "t2i.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def world_rows(shards: TokenShards, listing: list[str]) -> torch.Tensor:
    """Each shard row's world row, from the image's file name."""
    return torch.tensor([int(Path(listing[i]).stem) for i in shards.index.tolist()])


def test_class_folder_tokens_equal_the_world_encoding_and_train(rendered, test_world, local_ray, tmp_path):
    out = tmp_path / "c2i"
    stdout = tokenize(str(rendered / "c2i"), "--teacher", "world_c2i", "--out", str(out), "--shard-size", "64")
    assert f"{N} of {N} images tokenized (0 unreadable" in stdout
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["rows"] == N and len(manifest["shards"]) == 4 and manifest["classes"][0] == "class00"
    from orchestrator.tokenize_inputs import list_inputs

    listing = [it["path"] for it in list_inputs([str(rendered / "c2i")])[0]]
    shards = TokenShards.open(out / MANIFEST)
    rows = world_rows(shards, listing)
    data = test_world.data("c2i")
    assert torch.equal(shards[torch.arange(N)], data.tokens[rows])
    assert torch.equal(shards.labels, data.labels[rows])

    # a lost shard (as after a kill): the rerun encodes only its items, with the same result
    (out / shard_name(2)).unlink()
    stdout = tokenize(str(rendered / "c2i"), "--teacher", "world_c2i", "--out", str(out), "--shard-size", "64")
    assert "this run: 64 images" in stdout
    assert torch.equal(TokenShards.open(out / MANIFEST)[torch.arange(N)], shards[torch.arange(N)])

    cfg = load_config(ROOT / "sweeps/presets/tiny_c2i.yaml", [
        "world.spec=test", "train.steps=2", "train.batch_size=8", "train.grid_size=4",
        f"data.tokens={out / MANIFEST}", f"output_dir={tmp_path / 'run'}", "train.device=cpu"])
    result = train(cfg, to_dict(cfg), progress=False)
    assert result.checkpoint.name == "step_00000002"
    assert {"loss/dimo", "loss/discriminator"} <= set(result.metrics)


def test_captioned_list_skips_bad_images_and_keeps_captions(rendered, test_world, local_ray, tmp_path):
    out = tmp_path / "t2i"
    stdout = tokenize(str(rendered / "t2i.jsonl"), "--teacher", "world_t2i", "--out", str(out),
                      "--shard-size", "128", "--batch-size", "16")
    assert f"{N} of {N + 2} images tokenized (2 unreadable, skipped)" in stdout
    assert "corrupt.png" in stdout and "missing.png" in stdout
    shards = TokenShards.open(out / MANIFEST)
    data = test_world.data("t2i")
    listing = [json.loads(line)["image"] for line in (rendered / "t2i.jsonl").read_text().splitlines()]
    rows = world_rows(shards, listing)
    assert torch.equal(shards[torch.arange(N)], data.tokens[rows])
    assert shards.captions == [data.captions[i] for i in rows.tolist()]


def test_bad_input_exits_2_with_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "orchestrator.tokenize", str(tmp_path / "none"),
                           "--teacher", "world_c2i", "--out", str(tmp_path / "o")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert "none: does not exist" in proc.stderr and "Traceback" not in proc.stderr
