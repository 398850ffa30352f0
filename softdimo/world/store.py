"""The embedded world on disk: its spec, content hash, cache folder and loader (ARCHITECTURE §6).

A world is built once per spec into ``<cache>/world-<name>-<hash>/`` (see build.py) and loaded from
there: every network from safetensors, frozen and in eval mode. Layout of a world folder:

    manifest.json                      spec, hash, per-stage seconds and stats
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

BUILDER_VERSION = "1"
TRACKS = ("c2i", "t2i")
SPLITS = ("train", "reference")


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


@dataclass
class World:
    """A loaded world: frozen networks on ``device`` plus lazy access to its data."""
    root: Path
    spec: WorldSpec
    manifest: dict
    tokenizer: Any                      # VQTokenizer
    backbones: dict[str, Any]           # track -> MaskTransformer
    clip: Any                           # open_clip CLIP
    clip_text: Any                      # ClipText
    clip_score: Any                     # ClipScore
    quality: Any                        # QualityScorer
    features: Any                       # FeatureNet
    device: str = "cpu"
    _teachers: dict = field(default_factory=dict, repr=False)
    _data: dict = field(default_factory=dict, repr=False)

    def teacher(self, track: str):
        """The WorldTeacher adapter for "c2i" (class ids) or "t2i" (ClipText features)."""
        _check_track(track)
        if track not in self._teachers:
            from softdimo.teachers.world import WorldTeacher
            text = self.clip_text if track == "t2i" else None
            self._teachers[track] = WorldTeacher(self.backbones[track], self.tokenizer, text)
        return self._teachers[track]

    def data(self, track: str, split: str = "train") -> WorldData:
        """Training data (split "train") or the held-out world-FID reference (split "reference")."""
        _check_track(track)
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        if (track, split) not in self._data:
            self._data[track, split] = load_data(self.root / "data" / f"{track}_{split}")
        return self._data[track, split]

    def reference(self, track: str) -> WorldData:
        return self.data(track, "reference")


def _check_track(track: str) -> None:
    if track not in TRACKS:
        raise ValueError(f"unknown track {track!r}; expected one of {TRACKS}")


def load_world(spec_name: WorldSpec | str = "full", cache_dir: str | Path | None = None,
               build_if_missing: bool = True, device: str | torch.device = "cpu",
               progress: bool = True) -> World:
    """Load the world for ``spec_name`` from the cache, building it first if allowed."""
    from softdimo.world.clip import ClipScore, ClipText, load_clip
    from softdimo.world.features import FeatureNet
    from softdimo.world.mdm import load_mdm
    from softdimo.world.quality import QualityScorer
    from softdimo.world.tokenizer import load_tokenizer

    spec = resolve_spec(spec_name)
    root = world_dir(spec, cache_dir)
    if not (root / "manifest.json").is_file():
        if not build_if_missing:
            raise FileNotFoundError(
                f"world {spec.name!r} is not built at {root}; build it with "
                f"`python -m orchestrator.prepare` or load_world(..., build_if_missing=True)")
        from softdimo.world.build import build_world
        build_world(spec, root.parent, progress=progress)
    manifest = json.loads((root / "manifest.json").read_text())
    clip = load_clip(root / "clip", device=device)
    return World(
        root=root, spec=spec, manifest=manifest, device=str(device),
        tokenizer=load_tokenizer(root / "tokenizer", device=device),
        backbones={t: load_mdm(root / f"{t}_teacher", device=device) for t in TRACKS},
        clip=clip, clip_text=ClipText(clip), clip_score=ClipScore(clip),
        quality=load_net(QualityScorer, root / "quality", device),
        features=load_net(FeatureNet, root / "features", device),
    )
