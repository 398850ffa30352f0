"""Build the embedded world for a WorldSpec: deterministic, cached, atomic (ARCHITECTURE §6).

A world is built in components (layout.COMPONENTS), each only when a command needs it: "base"
(data -> tokenizer -> encode), then "clip", "c2i_teacher", "t2i_teacher" (text features from the
CLIP, then the teacher), "quality" and "features". A class-to-image run never builds the CLIP, the
text-to-image teacher or the quality net. Every stage draws from its own generator seeded from
``spec.seed`` and the stage, so a component is bitwise the same whether it is built alone or with
the rest, for a fixed torch version and thread count. A component is written into a scratch folder,
moved into place, and committed by its marker (``components/<name>.json``), under a file lock, so
concurrent callers (Ray trials) build it once and never load a half-written one.
"""
from __future__ import annotations

import dataclasses
import fcntl
import json
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from softdimo.world.layout import (BUILDER_VERSION, COMPONENTS, TRACKS, WorldData, WorldSpec,
                                   built_components, component_marker, default_cache_dir,
                                   load_data, resolve_spec, save_data, save_net,
                                   with_dependencies, world_dir, world_hash)

STAGES = ("data", "tokenizer", "encode", "clip", "text_features", "c2i_teacher", "t2i_teacher",
          "quality", "features")
COMPONENT_STAGES = {"base": 3, "clip": 1, "c2i_teacher": 1, "t2i_teacher": 2, "quality": 1,
                    "features": 1}
RECON_IMAGES = 8192     # tokenizer reconstructions mixed into quality/feature training


def stage_generator(spec: WorldSpec, stage: str) -> torch.Generator:
    return torch.Generator().manual_seed(spec.seed * 1000 + STAGES.index(stage))


@contextmanager
def _lock(path: Path) -> Iterator[None]:
    """Exclusive lock on ``path``; says so on stderr when it must wait for another process (a world
    build can hold it for many minutes, and a silent wait looks like a hang)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another process that holds {path} (building or copying that world)",
                  file=sys.stderr, flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@torch.no_grad()
def _encode(tokenizer, images: torch.Tensor, batch: int, desc: str, progress: bool) -> torch.Tensor:
    """uint8 images [N, 3, H, W] -> tokens long [N, L]."""
    out = [tokenizer.encode(images[i:i + batch].float() / 255)
           for i in tqdm(range(0, images.shape[0], batch), desc=desc, disable=not progress,
                         leave=False)]
    return torch.cat(out)


@torch.no_grad()
def _reconstruct(tokenizer, tokens: torch.Tensor, batch: int) -> torch.Tensor:
    """tokens [N, L] -> uint8 reconstructions [N, 3, H, W] (what a perfect teacher would emit)."""
    out = [(tokenizer.decode_ids(tokens[i:i + batch]) * 255).round().to(torch.uint8)
           for i in range(0, tokens.shape[0], batch)]
    return torch.cat(out)


def _data_stage(spec: WorldSpec, progress: bool) -> dict[tuple[str, str], WorldData]:
    from softdimo.world.scenes import c2i_scenes, class_names, render, t2i_scenes
    gen = stage_generator(spec, "data")
    sizes = {"train": {"c2i": spec.c2i_scenes, "t2i": spec.t2i_scenes},
             "reference": {"c2i": spec.reference_scenes, "t2i": spec.reference_scenes}}
    names = class_names()
    data = {}
    for split, track in tqdm([(s, t) for s in ("train", "reference") for t in ("c2i", "t2i")],
                             desc="data", disable=not progress, leave=False):
        n = sizes[split][track]
        seed = int(torch.randint(0, 2**62, (1,), generator=gen))
        scenes = (c2i_scenes if track == "c2i" else t2i_scenes)(n, seed)
        labels = torch.tensor([s.label for s in scenes], dtype=torch.long)
        captions = ([names[y] for y in labels.tolist()] if track == "c2i"
                    else [s.caption for s in scenes])
        data[track, split] = WorldData(torch.empty(0), render(scenes), labels, captions, scenes)
    return data


def _recon(spec: WorldSpec, tokenizer, data: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The teachers emit tokenizer reconstructions, so those count as real images too.

    Returns (index into the concatenated c2i+t2i train set [RECON_IMAGES], uint8 images).
    """
    tokens = torch.cat([data["c2i", "train"].tokens, data["t2i", "train"].tokens])
    index = torch.randperm(tokens.shape[0], generator=stage_generator(spec, "quality"))
    keep = index[:RECON_IMAGES]
    return keep, _reconstruct(tokenizer, tokens[keep], spec.encode_batch)


class _Stages:
    """Times each stage of a component into ``stages`` and ticks the progress bar."""

    def __init__(self, bar):
        self.bar, self.stages = bar, {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[dict]:
        self.bar.set_postfix_str(name)
        start = time.perf_counter()
        stats: dict = {}
        yield stats
        self.stages[name] = {"seconds": round(time.perf_counter() - start, 2), **stats}
        self.bar.update(1)


def _base(spec: WorldSpec, tmp: Path, root: Path, stage: _Stages, progress: bool) -> None:
    from softdimo.world.tokenizer import TokenizerConfig, save_module, train_tokenizer

    with stage("data") as st:
        data = _data_stage(spec, progress)
        st.update({f"{t}_{s}": len(d.captions) for (t, s), d in data.items()})
    train_images = torch.cat([data["c2i", "train"].images, data["t2i", "train"].images])
    with stage("tokenizer") as st:
        config = TokenizerConfig(channels=spec.tokenizer_channels)
        tokenizer, tok_stats = train_tokenizer(
            train_images, config, spec.tokenizer_steps, spec.tokenizer_batch, spec.tokenizer_lr,
            stage_generator(spec, "tokenizer"), progress)
        save_module(tokenizer, config, tmp / "tokenizer")
        st.update({k: v for k, v in tok_stats.items() if k not in ("seconds",)})
    with stage("encode"):
        (tmp / "data").mkdir()
        for (track, split), d in data.items():
            d.tokens = _encode(tokenizer, d.images, spec.encode_batch, f"encode {track}/{split}",
                               progress)
            save_data(d, tmp / "data" / f"{track}_{split}")


def _train_data(root: Path) -> dict[tuple[str, str], WorldData]:
    return {(t, "train"): load_data(root / "data" / f"{t}_train") for t in TRACKS}


def _clip(spec: WorldSpec, tmp: Path, root: Path, stage: _Stages, progress: bool) -> None:
    from softdimo.world.clip import save_clip, train_clip
    from softdimo.world.scenes import hard_negative

    data = _train_data(root)
    with stage("clip") as st:
        gen = stage_generator(spec, "clip")
        scenes = data["t2i", "train"].scenes + data["c2i", "train"].scenes
        negative_rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=gen)))
        negatives = [hard_negative(s, negative_rng) for s in scenes]
        clip, clip_stats = train_clip(
            torch.cat([data["t2i", "train"].images, data["c2i", "train"].images]),
            [s.caption for s in scenes], spec.clip_steps, spec.clip_batch, spec.clip_lr, gen,
            progress, negatives=negatives)
        clip.requires_grad_(False)
        save_clip(clip, tmp / "clip")
        st.update(clip_stats)


def _teacher(track: str):
    def build(spec: WorldSpec, tmp: Path, root: Path, stage: _Stages, progress: bool) -> None:
        from softdimo.world.clip import ClipText, load_clip
        from softdimo.world.mdm import MaskTransformer, MDMConfig, train_mdm
        from softdimo.world.tokenizer import load_tokenizer, save_module

        tokenizer = load_tokenizer(root / "tokenizer")
        d = load_data(root / "data" / f"{track}_train")
        common = dict(codebook_size=tokenizer.config.codebook_size, seq_len=tokenizer.seq_len,
                      width=spec.teacher_width, depth=spec.teacher_depth, heads=spec.teacher_heads)
        if track == "c2i":
            mdm_config = MDMConfig(conditioning="class", num_classes=18, **common)
            conds, null, steps = d.labels, torch.tensor(18), spec.c2i_steps
        else:
            with stage("text_features") as st:
                clip_text = ClipText(load_clip(root / "clip"))
                unique = sorted(set(d.captions))
                feats = torch.cat([clip_text(unique[i:i + 256]) for i in range(0, len(unique), 256)])
                index = {c: i for i, c in enumerate(unique)}
                conds = feats[torch.tensor([index[c] for c in d.captions])]      # [N, T, C]
                null = clip_text([""])[0]                                        # [T, C]
                st.update({"unique_captions": len(unique), "text_len": clip_text.length,
                           "text_dim": clip_text.dim})
            mdm_config = MDMConfig(conditioning="text", text_dim=clip_text.dim,
                                   text_len=clip_text.length, **common)
            steps = spec.t2i_steps
        with stage(f"{track}_teacher") as st:
            gen = stage_generator(spec, f"{track}_teacher")
            model = MaskTransformer(mdm_config, generator=gen)
            mdm_stats = train_mdm(model, d.tokens, conds, null, steps, spec.teacher_batch,
                                  spec.teacher_lr, gen, progress=progress)
            model.eval().requires_grad_(False)
            save_module(model, mdm_config, tmp / f"{track}_teacher")
            st.update({k: v for k, v in mdm_stats.items() if k != "seconds"})
    return build


def _quality(spec: WorldSpec, tmp: Path, root: Path, stage: _Stages, progress: bool) -> None:
    from softdimo.world.quality import train_quality
    from softdimo.world.tokenizer import load_tokenizer

    data = _train_data(root)
    train_images = torch.cat([data["c2i", "train"].images, data["t2i", "train"].images])
    _, recon = _recon(spec, load_tokenizer(root / "tokenizer"), data)
    with stage("quality") as st:
        quality, q_stats = train_quality(torch.cat([train_images, recon]), spec.quality_steps,
                                         spec.quality_batch, spec.quality_lr,
                                         stage_generator(spec, "quality"), progress)
        save_net(quality, {"width": quality.width}, tmp / "quality")
        st.update(q_stats)


def _features(spec: WorldSpec, tmp: Path, root: Path, stage: _Stages, progress: bool) -> None:
    from softdimo.world.features import label_targets, scene_targets, train_features
    from softdimo.world.tokenizer import load_tokenizer

    data = _train_data(root)
    train_images = torch.cat([data["c2i", "train"].images, data["t2i", "train"].images])
    keep, recon = _recon(spec, load_tokenizer(root / "tokenizer"), data)
    with stage("features") as st:
        pc, cc = label_targets(data["c2i", "train"].labels)
        pt, ct = scene_targets(data["t2i", "train"].scenes)
        presence, counts = torch.cat([pc, pt]), torch.cat([cc, ct])
        features, f_stats = train_features(
            torch.cat([train_images, recon]), torch.cat([presence, presence[keep]]),
            torch.cat([counts, counts[keep]]), spec.features_steps, spec.features_batch,
            spec.features_lr, stage_generator(spec, "features"), progress)
        save_net(features, {"width": features.width, "feature_dim": features.feature_dim},
                 tmp / "features")
        st.update(f_stats)


BUILDERS = {"base": _base, "clip": _clip, "c2i_teacher": _teacher("c2i"),
            "t2i_teacher": _teacher("t2i"), "quality": _quality, "features": _features}
assert set(BUILDERS) == set(COMPONENTS)


def _build_component(spec: WorldSpec, root: Path, name: str, progress: bool) -> None:
    """Build one component into a scratch folder inside ``root``, move its files into place, and
    commit it by writing its marker last (a crash before the marker leaves it unbuilt)."""
    tmp = root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    bar = tqdm(total=COMPONENT_STAGES[name], desc=f"world {spec.name}: {name}", disable=not progress)
    stage = _Stages(bar)
    start = time.perf_counter()
    try:
        BUILDERS[name](spec, tmp, root, stage, progress)
        for item in tmp.iterdir():
            dest = root / item.name
            if dest.is_dir():
                shutil.rmtree(dest)
            item.replace(dest)
    finally:
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)
    record = {"seconds": round(time.perf_counter() - start, 2),
              "threads": torch.get_num_threads(), "stages": stage.stages}
    marker = component_marker(root, name)
    marker.parent.mkdir(exist_ok=True)
    marker.write_text(json.dumps(record, indent=2))


def _write_manifest(spec: WorldSpec, root: Path) -> None:
    records = {c: json.loads(component_marker(root, c).read_text())
               for c in COMPONENTS if component_marker(root, c).is_file()}
    stages = {k: v for c in COMPONENTS if c in records for k, v in records[c]["stages"].items()}
    manifest = {"spec": dataclasses.asdict(spec), "hash": world_hash(spec),
                "builder_version": BUILDER_VERSION, "torch": torch.__version__,
                "threads": torch.get_num_threads(), "components": sorted(records),
                "total_seconds": round(sum(r["seconds"] for r in records.values()), 2),
                "stages": {s: stages[s] for s in STAGES if s in stages}}
    tmp = root / ".manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2))
    tmp.replace(root / "manifest.json")


def build_components(spec: WorldSpec | str, cache_dir: str | Path | None, needs,
                     progress: bool = True, force: bool = False) -> Path:
    """Build the components ``needs`` (and what they depend on) that the cache lacks.

    One builder at a time per world (a file lock beside its folder), so concurrent callers (Ray
    trials, two nodes on shared storage) build each component once; the others wait, then load.
    """
    spec = resolve_spec(spec)
    root = world_dir(spec, cache_dir if cache_dir is not None else default_cache_dir())
    wanted = with_dependencies(needs)
    if not force and not (wanted - built_components(root)):
        return root
    with _lock(root.with_name(root.name + ".lock")):
        if force:
            shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
        missing = [c for c in COMPONENTS if c in wanted and c not in built_components(root)]
        for name in missing:
            if progress:
                print(f"building world component {name!r} of world {spec.name!r} "
                      f"(cached at {root})", flush=True)
            _build_component(spec, root, name, progress)
        if missing:
            _write_manifest(spec, root)
    return root


def copy_world(spec: WorldSpec | str, src_cache: str | Path, dst_cache: str | Path, needs) -> bool:
    """Copy the world ``src_cache`` holds into ``dst_cache`` when the source has every component of
    ``needs`` and the destination none (e.g. a node's own cache onto the storage every node of a
    cluster reads): a copy, not a second build. Under both worlds' locks; the copy lands whole, by
    one rename. Returns whether it copied."""
    spec = resolve_spec(spec)
    src, dst = world_dir(spec, src_cache), world_dir(spec, dst_cache)
    wanted = with_dependencies(needs)
    if src.resolve() == dst.resolve() or wanted - built_components(src):
        return False
    with _lock(src.with_name(src.name + ".lock")), _lock(dst.with_name(dst.name + ".lock")):
        if built_components(dst):      # partly there already: the builder adds the rest beside it
            return False
        tmp = dst.with_name(f".{dst.name}.copy")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp, ignore=shutil.ignore_patterns(".*.tmp"))
        shutil.rmtree(dst, ignore_errors=True)     # nothing committed in it: scratch at most
        tmp.replace(dst)
    return True


def build_world(spec: WorldSpec | str, cache_dir: str | Path | None = None, force: bool = False,
                progress: bool = True) -> Path:
    """Build every component of ``spec``'s world into ``<cache>/world-<name>-<hash>/``.

    Returns at once if the folder holds them all already (unless ``force``).
    """
    return build_components(spec, cache_dir, COMPONENTS, progress=progress, force=force)
