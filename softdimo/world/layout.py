"""The embedded world on disk: its spec, content hash, cache folder and file formats (ARCHITECTURE §6).

A world is built once per spec into ``<cache>/world-<name>-<hash>/`` (see build.py) and loaded from
there (store.py) by every network from safetensors, frozen and in eval mode. This module is the
bottom of softdimo/world: the networks and the builder import it, it imports none of them.
Layout of a world folder:

    manifest.json                      spec, hash, components built, per-stage seconds and stats
    components/<name>.json             one marker per built component (written last: its commit)
    tokenizer.{json,safetensors}       VQTokenizer
    clip/                              open_clip local-dir folder (tiny CLIP)
    c2i_teacher.*, t2i_teacher.*       MaskTransformer backbones
    quality.*, features.*              QualityScorer, FeatureNet
    data/<track>_<split>.safetensors   tokens [N, L], images uint8 [N, 3, 32, 32], labels [N]
    data/<track>_<split>.json          captions and scene specs

Shapes: N samples, L tokens, T text length, C text width.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

BUILDER_VERSION = "1"
TRACKS = ("c2i", "t2i")
SPLITS = ("train", "reference")
# Each component with the ones it is trained from; a command builds only what it needs.
COMPONENTS: dict[str, tuple[str, ...]] = {
    "base": (),                         # data, VQ tokenizer, tokens of every image
    "clip": ("base",),
    "c2i_teacher": ("base",),
    "t2i_teacher": ("base", "clip"),    # conditioned on the CLIP's text features
    "quality": ("base",),
    "features": ("base",),              # world-FID's feature net
}
# What training and evaluating on a track needs; the rewards' scorers come on first use.
TRACK_NEEDS = {"c2i": ("c2i_teacher", "features"), "t2i": ("t2i_teacher", "features")}


@dataclass(frozen=True)
class WorldSpec:
    """Everything that determines a world's files; its hash names the cache folder."""
    name: str
    seed: int = 0
    c2i_scenes: int = 20_000
    t2i_scenes: int = 30_000
    reference_scenes: int = 2_000           # held-out real images per track (world-FID reference)
    tokenizer_steps: int = 1600
    tokenizer_batch: int = 32
    tokenizer_lr: float = 3e-3
    tokenizer_channels: int = 64
    clip_steps: int = 500
    clip_batch: int = 64
    clip_lr: float = 2e-3
    teacher_width: int = 128
    teacher_depth: int = 4
    teacher_heads: int = 4
    c2i_steps: int = 2400
    t2i_steps: int = 2400
    teacher_batch: int = 32
    teacher_lr: float = 2e-3
    quality_steps: int = 600
    quality_batch: int = 32
    quality_lr: float = 2e-3
    features_steps: int = 800
    features_batch: int = 32
    features_lr: float = 3e-3
    encode_batch: int = 1024


WORLD_SPECS: dict[str, WorldSpec] = {
    "full": WorldSpec(name="full"),
    # the same code at toy sizes: a whole build in seconds, for tests and CI
    "test": WorldSpec(name="test", c2i_scenes=540, t2i_scenes=900, reference_scenes=64,
                      tokenizer_steps=40, tokenizer_batch=32, tokenizer_channels=16,
                      clip_steps=8, clip_batch=32, teacher_width=32, teacher_depth=2,
                      teacher_heads=2, c2i_steps=8, t2i_steps=8, teacher_batch=16,
                      quality_steps=6, quality_batch=32, features_steps=6, features_batch=32,
                      encode_batch=256),
}


def world_hash(spec: WorldSpec) -> str:
    """Content hash of the spec fields and BUILDER_VERSION (12 hex digits)."""
    payload = json.dumps({"builder_version": BUILDER_VERSION, **dataclasses.asdict(spec)},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def default_cache_dir() -> Path:
    """$SOFTDIMO_CACHE, else ~/.cache/softdimo."""
    env = os.environ.get("SOFTDIMO_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "softdimo"


def world_dir(spec: WorldSpec, cache_dir: str | Path | None = None) -> Path:
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / f"world-{spec.name}-{world_hash(spec)}"


def resolve_spec(spec: WorldSpec | str) -> WorldSpec:
    if isinstance(spec, WorldSpec):
        return spec
    if spec not in WORLD_SPECS:
        raise KeyError(f"unknown world spec {spec!r}; known: {sorted(WORLD_SPECS)}")
    return WORLD_SPECS[spec]


def with_dependencies(names) -> set[str]:
    """``names`` (components or tracks) and everything they are built from."""
    out: set[str] = set()
    todo = [c for n in names for c in (TRACK_NEEDS.get(n, (n,)))]
    while todo:
        name = todo.pop()
        if name not in COMPONENTS:
            raise KeyError(f"unknown world component {name!r}; known: {sorted(COMPONENTS)}")
        if name not in out:
            out.add(name)
            todo.extend(COMPONENTS[name])
    return out


def component_marker(root: Path, name: str) -> Path:
    return root / "components" / f"{name}.json"


def built_components(root: Path) -> set[str]:
    """The committed components of the world folder ``root``."""
    if not (root / "components").is_dir() and (root / "manifest.json").is_file():
        return set(COMPONENTS)      # a world built whole, before components had markers
    return {c for c in COMPONENTS if component_marker(root, c).is_file()}


@contextlib.contextmanager
def seeded_init(generator: torch.Generator):
    """Run module construction with the global RNG seeded from ``generator``, then restore it.

    torch's layer initialisers draw from the global generator; forking it keeps construction
    reproducible from the explicit generator without disturbing the caller's random stream.
    """
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def save_net(module: torch.nn.Module, kwargs: dict, stem: Path) -> None:
    """``<stem>.safetensors`` (state dict) + ``<stem>.json`` (constructor kwargs)."""
    from safetensors.torch import save_file
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(stem.with_name(stem.name + ".safetensors")))
    stem.with_name(stem.name + ".json").write_text(json.dumps(kwargs, indent=2, sort_keys=True))


def load_net(cls: type, stem: Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Rebuild ``cls(**kwargs)`` from ``<stem>.json``, load its safetensors strictly; frozen."""
    from safetensors.torch import load_file
    module = cls(**json.loads(stem.with_name(stem.name + ".json").read_text()))
    module.load_state_dict(load_file(str(stem.with_name(stem.name + ".safetensors"))), strict=True)
    return module.to(device).eval().requires_grad_(False)


@dataclass
class WorldData:
    """One track's split: tokens long [N, L], images uint8 [N, 3, 32, 32], labels long [N]
    (t2i: -1), captions (c2i: the class prompt of each label), scenes (the specs the images show).
    """
    tokens: torch.Tensor
    images: torch.Tensor
    labels: torch.Tensor
    captions: list[str]
    scenes: list[Any] | None = None

    def __len__(self) -> int:
        return self.tokens.shape[0]


def save_data(data: WorldData, stem: Path) -> None:
    from safetensors.torch import save_file
    from softdimo.world.scenes import scene_to_dict
    save_file({"tokens": data.tokens.contiguous(), "images": data.images.contiguous(),
               "labels": data.labels.contiguous()}, str(stem.with_name(stem.name + ".safetensors")))
    meta = {"captions": data.captions,
            "scenes": None if data.scenes is None else [scene_to_dict(s) for s in data.scenes]}
    stem.with_name(stem.name + ".json").write_text(json.dumps(meta))


def load_data(stem: Path) -> WorldData:
    from safetensors.torch import load_file
    from softdimo.world.scenes import scene_from_dict
    t = load_file(str(stem.with_name(stem.name + ".safetensors")))
    meta = json.loads(stem.with_name(stem.name + ".json").read_text())
    scenes = None if meta["scenes"] is None else [scene_from_dict(d) for d in meta["scenes"]]
    return WorldData(t["tokens"], t["images"], t["labels"], meta["captions"], scenes)
