"""Build the embedded world for a WorldSpec: deterministic, cached, atomic (ARCHITECTURE §6).

Stages, in order: data -> tokenizer -> encode (all images to tokens) -> clip -> text features ->
c2i teacher -> t2i teacher -> quality -> features. Every stage draws from its own generator seeded
from ``spec.seed`` and the stage, so a build is bitwise reproducible on CPU for a fixed torch
version and thread count. The build writes into a temporary folder next to the cache entry and
renames it into place at the end, under a file lock, so concurrent callers (e.g. Ray trials) build
once and never see a half-written world.
"""
from __future__ import annotations

import dataclasses
import fcntl
import json
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from softdimo.world.store import (BUILDER_VERSION, WORLD_SPECS, World, WorldData, WorldSpec,
                                  default_cache_dir, load_world, resolve_spec, save_data, save_net,
                                  world_dir, world_hash)

__all__ = ["build_world", "load_world", "WORLD_SPECS", "WorldSpec", "World", "world_hash",
           "default_cache_dir"]

STAGES = ("data", "tokenizer", "encode", "clip", "text_features", "c2i_teacher", "t2i_teacher",
          "quality", "features")
RECON_IMAGES = 8192     # tokenizer reconstructions mixed into quality/feature training


def stage_generator(spec: WorldSpec, stage: str) -> torch.Generator:
    return torch.Generator().manual_seed(spec.seed * 1000 + STAGES.index(stage))


@contextmanager
def _lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
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


def _build_into(spec: WorldSpec, tmp: Path, progress: bool) -> dict:
    from softdimo.world.clip import ClipText, save_clip, train_clip
    from softdimo.world.features import label_targets, scene_targets, train_features
    from softdimo.world.mdm import MaskTransformer, MDMConfig, train_mdm
    from softdimo.world.quality import train_quality
    from softdimo.world.scenes import hard_negative
    from softdimo.world.tokenizer import TokenizerConfig, save_module, train_tokenizer

    stages: dict[str, dict] = {}
    bar = tqdm(total=len(STAGES), desc=f"world {spec.name}", disable=not progress)

    @contextmanager
    def stage(name: str) -> Iterator[dict]:
        bar.set_postfix_str(name)
        start = time.perf_counter()
        stats: dict = {}
        yield stats
        stages[name] = {"seconds": round(time.perf_counter() - start, 2), **stats}
        bar.update(1)

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
        for (track, split), d in data.items():
            d.tokens = _encode(tokenizer, d.images, spec.encode_batch, f"encode {track}/{split}",
                               progress)
            save_data(d, tmp / "data" / f"{track}_{split}")

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

    with stage("text_features") as st:
        clip_text = ClipText(clip)
        t2i = data["t2i", "train"]
        unique = sorted(set(t2i.captions))
        feats = torch.cat([clip_text(unique[i:i + 256]) for i in range(0, len(unique), 256)])
        index = {c: i for i, c in enumerate(unique)}
        text_conds = feats[torch.tensor([index[c] for c in t2i.captions])]     # [N, T, C]
        null_text = clip_text([""])[0]                                         # [T, C]
        st.update({"unique_captions": len(unique), "text_len": clip_text.length,
                   "text_dim": clip_text.dim})

    for track in ("c2i", "t2i"):
        with stage(f"{track}_teacher") as st:
            gen = stage_generator(spec, f"{track}_teacher")
            d = data[track, "train"]
            common = dict(codebook_size=config.codebook_size, seq_len=tokenizer.seq_len,
                          width=spec.teacher_width, depth=spec.teacher_depth,
                          heads=spec.teacher_heads)
            if track == "c2i":
                mdm_config = MDMConfig(conditioning="class", num_classes=18, **common)
                conds, null = d.labels, torch.tensor(18)
                steps = spec.c2i_steps
            else:
                mdm_config = MDMConfig(conditioning="text", text_dim=clip_text.dim,
                                       text_len=clip_text.length, **common)
                conds, null, steps = text_conds, null_text, spec.t2i_steps
            model = MaskTransformer(mdm_config, generator=gen)
            mdm_stats = train_mdm(model, d.tokens, conds, null, steps, spec.teacher_batch,
                                  spec.teacher_lr, gen, progress=progress)
            model.eval().requires_grad_(False)
            save_module(model, mdm_config, tmp / f"{track}_teacher")
            st.update({k: v for k, v in mdm_stats.items() if k != "seconds"})
        del model

    # the teachers emit tokenizer reconstructions, so those count as real images too
    recon_tokens = torch.cat([data["c2i", "train"].tokens, data["t2i", "train"].tokens])
    recon_index = torch.randperm(recon_tokens.shape[0], generator=stage_generator(spec, "quality"))
    recon = _reconstruct(tokenizer, recon_tokens[recon_index[:RECON_IMAGES]], spec.encode_batch)

    with stage("quality") as st:
        quality, q_stats = train_quality(torch.cat([train_images, recon]), spec.quality_steps,
                                         spec.quality_batch, spec.quality_lr,
                                         stage_generator(spec, "quality"), progress)
        save_net(quality, {"width": quality.width}, tmp / "quality")
        st.update(q_stats)

    with stage("features") as st:
        pc, cc = label_targets(data["c2i", "train"].labels)
        pt, ct = scene_targets(data["t2i", "train"].scenes)
        presence, counts = torch.cat([pc, pt]), torch.cat([cc, ct])
        keep = recon_index[:RECON_IMAGES]
        features, f_stats = train_features(
            torch.cat([train_images, recon]), torch.cat([presence, presence[keep]]),
            torch.cat([counts, counts[keep]]), spec.features_steps, spec.features_batch,
            spec.features_lr, stage_generator(spec, "features"), progress)
        save_net(features, {"width": features.width, "feature_dim": features.feature_dim},
                 tmp / "features")
        st.update(f_stats)
    bar.close()
    return stages


def build_world(spec: WorldSpec | str, cache_dir: str | Path | None = None, force: bool = False,
                progress: bool = True) -> Path:
    """Build the world for ``spec`` into ``<cache>/world-<name>-<hash>/``; returns that folder.

    Returns at once if the folder already exists (unless ``force``).
    """
    spec = resolve_spec(spec)
    target = world_dir(spec, cache_dir if cache_dir is not None else default_cache_dir())
    if (target / "manifest.json").is_file() and not force:
        return target
    with _lock(target.with_name(target.name + ".lock")):
        # another process may have finished the build while this one waited for the lock
        if (target / "manifest.json").is_file() and not force:
            return target
        tmp = target.with_name(f".{target.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "data").mkdir(parents=True)
        start = time.perf_counter()
        try:
            stages = _build_into(spec, tmp, progress)
            manifest = {"spec": dataclasses.asdict(spec), "hash": world_hash(spec),
                        "builder_version": BUILDER_VERSION, "torch": torch.__version__,
                        "threads": torch.get_num_threads(),
                        "total_seconds": round(time.perf_counter() - start, 2), "stages": stages}
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
            if target.exists():
                old = target.with_name(f".{target.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                target.rename(old)
                shutil.rmtree(old)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target
