"""Building, caching and loading the tiny "test" world end to end."""
import json
import time

import pytest
import torch

from softdimo.world.build import STAGES, build_world
from softdimo.world.scenes import class_names
from softdimo.world.layout import COMPONENTS, WORLD_SPECS, built_components, world_hash
from softdimo.world.store import load_world


def _files(root):
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


def test_manifest_records_spec_hash_and_every_stage(test_world):
    manifest = json.loads((test_world.root / "manifest.json").read_text())
    spec = WORLD_SPECS["test"]
    assert manifest["hash"] == world_hash(spec) and manifest["spec"]["name"] == "test"
    assert test_world.root.name == f"world-test-{world_hash(spec)}"
    assert list(manifest["stages"]) == list(STAGES)
    assert manifest["components"] == sorted(COMPONENTS) == sorted(built_components(test_world.root))
    assert all(s["seconds"] >= 0 for s in manifest["stages"].values())
    assert 0 < manifest["stages"]["tokenizer"]["val_mse"] < 0.2
    assert not any(p.name.endswith(".tmp") for p in test_world.root.parent.iterdir())


def test_second_build_returns_at_once_without_touching_files(test_world):
    root = test_world.root
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    start = time.perf_counter()
    assert build_world("test", root.parent, progress=False) == root
    assert time.perf_counter() - start < 1.0
    assert before == {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_loaded_networks_are_frozen_and_teachers_sample_images(test_world):
    for net in (test_world.tokenizer, test_world.clip, test_world.quality, test_world.features,
                *test_world.backbones.values()):
        assert not net.training and not any(p.requires_grad for p in net.parameters())
    gen = torch.Generator().manual_seed(0)
    c2i = test_world.teacher("c2i")
    assert c2i is test_world.teacher("c2i") and c2i.conditioning == "class"
    ids = c2i.sample(c2i.encode_condition(labels=torch.tensor([0, 5, 17])), 4, 2.0, gen)
    t2i = test_world.teacher("t2i")
    cond = t2i.encode_condition(prompts=["a photo of a red circle", "a photo of two squares"])
    assert cond.shape == (2, 16, 64)
    ids_t = t2i.sample(cond, 4, 2.0, gen)
    for teacher, tokens in ((c2i, ids), (t2i, ids_t)):
        assert tokens.dtype == torch.long and tokens.shape[1] == teacher.seq_len == 64
        assert tokens.min() >= 0 and tokens.max() < teacher.V
        images = teacher.decode_ids(tokens)
        assert images.shape == (tokens.shape[0], 3, 32, 32)
        assert images.min() >= 0 and images.max() <= 1
    assert test_world.quality(images).shape == (2,)
    assert test_world.features.features(images).shape == (2, 128)
    assert test_world.clip_score(images, ["a photo of a red circle"] * 2).shape == (2,)


def test_data_tracks_and_references(test_world):
    spec = WORLD_SPECS["test"]
    c2i, t2i = test_world.data("c2i"), test_world.data("t2i")
    assert len(c2i) == spec.c2i_scenes and len(t2i) == spec.t2i_scenes
    assert c2i.tokens.dtype == torch.long and c2i.tokens.shape == (spec.c2i_scenes, 64)
    assert c2i.images.dtype == torch.uint8 and c2i.images.shape == (spec.c2i_scenes, 3, 32, 32)
    names = class_names()
    assert c2i.captions == [names[y] for y in c2i.labels.tolist()]
    assert (t2i.labels == -1).all() and t2i.captions == [s.caption for s in t2i.scenes]
    ref = test_world.reference("t2i")
    assert ref.images.shape == (spec.reference_scenes, 3, 32, 32)
    assert not torch.equal(ref.images, t2i.images[:spec.reference_scenes])
    # the stored tokens are the tokenizer's encoding of the stored images
    with torch.no_grad():
        assert torch.equal(test_world.tokenizer.encode(c2i.images[:16].float() / 255), c2i.tokens[:16])


def test_build_is_bitwise_reproducible_and_force_rebuilds(test_world, tmp_path):
    root = build_world("test", tmp_path, progress=False)
    assert root.name == test_world.root.name
    files = _files(root)
    assert files == _files(test_world.root)
    weights = [f for f in files if f.suffix == ".safetensors"]
    assert len(weights) >= 10
    for f in files:
        if f.name != "manifest.json" and f.parent.name != "components":     # these record timings
            assert (root / f).read_bytes() == (test_world.root / f).read_bytes(), f
    stamp = (root / "manifest.json").stat().st_mtime_ns
    assert build_world("test", tmp_path, force=True, progress=False) == root
    assert (root / "manifest.json").stat().st_mtime_ns != stamp
    for f in weights:
        assert (root / f).read_bytes() == (test_world.root / f).read_bytes(), f
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == [root.name]


def test_a_class_to_image_run_builds_only_its_components_each_as_a_full_build_would(test_world,
                                                                                   tmp_path):
    world = load_world("test", tmp_path, progress=False, needs=("c2i",))
    assert built_components(world.root) == {"base", "c2i_teacher", "features"}
    assert not (world.root / "clip").exists() and not list(world.root.glob("t2i_teacher*"))
    assert not list(world.root.glob(".*.tmp"))
    for name in ("tokenizer.safetensors", "c2i_teacher.safetensors", "features.safetensors",
                 "data/t2i_train.safetensors"):
        assert (world.root / name).read_bytes() == (test_world.root / name).read_bytes(), name
    assert world.teacher("c2i").V == test_world.teacher("c2i").V
    # a later text-to-image use builds the rest on first touch, identical to the whole build
    assert world.clip_score is not None and "clip" in built_components(world.root)
    assert (world.root / "clip").is_dir() and "t2i_teacher" not in built_components(world.root)
    manifest = json.loads((world.root / "manifest.json").read_text())
    assert manifest["components"] == ["base", "c2i_teacher", "clip", "features"]


def test_a_missing_component_is_a_clear_error_without_build(tmp_path):
    load_world("test", tmp_path, progress=False, needs=("base",))
    world = load_world("test", tmp_path, build_if_missing=False, needs=())
    with pytest.raises(FileNotFoundError, match="orchestrator.prepare --spec test"):
        world.teacher("c2i")


def test_a_crash_inside_a_component_leaves_it_unbuilt_and_the_next_build_finishes(tmp_path,
                                                                                 monkeypatch):
    import softdimo.world.build as build

    def crash(spec, tmp, root, stage, progress):
        (tmp / "quality.safetensors").write_bytes(b"half-written")
        raise KeyboardInterrupt
    real = build.BUILDERS["quality"]
    monkeypatch.setitem(build.BUILDERS, "quality", crash)
    with pytest.raises(KeyboardInterrupt):
        build.build_components("test", tmp_path, ["quality"], progress=False)
    root = next(tmp_path.glob("world-test-*"))
    assert built_components(root) == {"base"}
    assert not (root / "quality.safetensors").exists() and not list(root.glob(".*.tmp"))
    monkeypatch.setitem(build.BUILDERS, "quality", real)
    build.build_components("test", tmp_path, ["quality"], progress=False)
    assert built_components(root) == {"base", "quality"}
