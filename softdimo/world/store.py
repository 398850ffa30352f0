"""The embedded world's loader: ``load_world`` and the ``World`` that loads each network on first use.

The top of softdimo/world: it imports the builder and the networks (lazily, so that a command loads
only what it uses); none of them imports it. Folder layout, spec and file formats: layout.py.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from softdimo.world.layout import (COMPONENTS, SPLITS, TRACKS, WorldData, WorldSpec,
                                   built_components, load_data, load_net, resolve_spec,
                                   with_dependencies, world_dir)


class World:
    """A loaded world: frozen networks on ``device``, each loaded on first use, plus its data.

    A component the cache lacks is built on first use when ``build_if_missing`` (announced on
    stdout, under the world's lock), else a FileNotFoundError names the command that builds it.
    """

    def __init__(self, root: Path, spec: WorldSpec, device: str | torch.device = "cpu",
                 build_if_missing: bool = True, progress: bool = True):
        self.root, self.spec, self.device = root, spec, str(device)
        self.build_if_missing, self.progress = build_if_missing, progress
        self._nets: dict[str, Any] = {}
        self._teachers: dict[str, Any] = {}
        self._data: dict[tuple[str, str], WorldData] = {}

    @property
    def manifest(self) -> dict:
        return json.loads((self.root / "manifest.json").read_text())

    def ensure(self, *names: str) -> None:
        """Make sure the components (or tracks) ``names`` are built."""
        missing = with_dependencies(names) - built_components(self.root)
        if not missing:
            return
        if not self.build_if_missing:
            raise FileNotFoundError(
                f"world {self.spec.name!r} is not built at {self.root} (missing components: "
                f"{', '.join(sorted(missing))}); build it with "
                f"`python -m orchestrator.prepare --spec {self.spec.name}`")
        from softdimo.world.build import build_components
        build_components(self.spec, self.root.parent, names, progress=self.progress)

    def _net(self, name: str, component: str, load) -> Any:
        if name not in self._nets:
            self.ensure(component)
            self._nets[name] = load()
        return self._nets[name]

    @property
    def tokenizer(self):
        """VQTokenizer."""
        from softdimo.world.tokenizer import load_tokenizer
        return self._net("tokenizer", "base",
                         lambda: load_tokenizer(self.root / "tokenizer", device=self.device))

    def backbone(self, track: str):
        """The track's MaskTransformer."""
        from softdimo.world.mdm import load_mdm
        _check_track(track)
        return self._net(f"{track}_teacher", f"{track}_teacher",
                         lambda: load_mdm(self.root / f"{track}_teacher", device=self.device))

    @property
    def backbones(self) -> dict[str, Any]:
        return {t: self.backbone(t) for t in TRACKS}

    @property
    def clip(self):
        """open_clip CLIP."""
        from softdimo.world.clip import load_clip
        return self._net("clip", "clip", lambda: load_clip(self.root / "clip", device=self.device))

    @property
    def clip_text(self):
        from softdimo.world.clip import ClipText
        return self._net("clip_text", "clip", lambda: ClipText(self.clip))

    @property
    def clip_score(self):
        from softdimo.world.clip import ClipScore
        return self._net("clip_score", "clip", lambda: ClipScore(self.clip))

    @property
    def quality(self):
        """QualityScorer."""
        from softdimo.world.quality import QualityScorer
        return self._net("quality", "quality",
                         lambda: load_net(QualityScorer, self.root / "quality", self.device))

    @property
    def features(self):
        """FeatureNet (world-FID)."""
        from softdimo.world.features import FeatureNet
        return self._net("features", "features",
                         lambda: load_net(FeatureNet, self.root / "features", self.device))

    def teacher(self, track: str):
        """The WorldTeacher adapter for "c2i" (class ids) or "t2i" (ClipText features)."""
        _check_track(track)
        if track not in self._teachers:
            from softdimo.teachers.world import WorldTeacher
            text = self.clip_text if track == "t2i" else None
            self._teachers[track] = WorldTeacher(self.backbone(track), self.tokenizer, text)
        return self._teachers[track]

    def data(self, track: str, split: str = "train") -> WorldData:
        """Training data (split "train") or the held-out world-FID reference (split "reference")."""
        _check_track(track)
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        if (track, split) not in self._data:
            self.ensure("base")
            self._data[track, split] = load_data(self.root / "data" / f"{track}_{split}")
        return self._data[track, split]

    def reference(self, track: str) -> WorldData:
        return self.data(track, "reference")


def _check_track(track: str) -> None:
    if track not in TRACKS:
        raise ValueError(f"unknown track {track!r}; expected one of {TRACKS}")


def load_world(spec_name: WorldSpec | str = "full", cache_dir: str | Path | None = None,
               build_if_missing: bool = True, device: str | torch.device = "cpu",
               progress: bool = True, needs=tuple(COMPONENTS)) -> World:
    """The world for ``spec_name`` from the cache; ``needs`` (components or tracks) are built
    first if missing and allowed, the rest on first use."""
    spec = resolve_spec(spec_name)
    world = World(world_dir(spec, cache_dir), spec, device, build_if_missing, progress)
    world.ensure(*needs)
    return world
