"""The embedded world's encoder: its VQTokenizer's own ``encode`` (softdimo.world.tokenizer).

The world renders square images at the tokenizer's size and encodes them from [0, 1] (the tokenizer
maps to [-1, 1] itself), so the preprocessing is only a resize/crop for foreign images.
Options: ``spec`` (world spec name, default "full") and ``cache_dir`` (default $SOFTDIMO_CACHE).
"""
from __future__ import annotations

import torch

from softdimo.teachers.encoding import Preprocess

OPTIONS = ("spec", "cache_dir")


class WorldEncoder:
    """images [B, 3, S, S] in [0, 1] -> ids [B, L] with the world tokenizer (L = (S / patch)²)."""

    def __init__(self, tokenizer, kind: str = "world_c2i"):
        self.tokenizer = tokenizer.eval().requires_grad_(False)
        self.kind = kind
        self.V: int = tokenizer.config.codebook_size
        self.seq_len: int = tokenizer.seq_len
        self.preprocess = Preprocess(tokenizer.config.image_size, "bilinear")

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.tokenizer.encode(images.to(self.tokenizer.codebook.device))


def load(paths: dict, options: dict, device: torch.device, kind: str = "world_c2i") -> WorldEncoder:
    """The world's tokenizer (building the world first if its cache lacks it)."""
    from softdimo.teachers import TeacherOptionError
    from softdimo.world.layout import resolve_spec, world_dir
    from softdimo.world.tokenizer import load_tokenizer

    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise TeacherOptionError(f"teacher.options.{unknown[0]}", f"unknown world option; "
                                 f"expected some of {', '.join(OPTIONS)}")
    spec = resolve_spec(options.get("spec", "full"))
    root = world_dir(spec, options.get("cache_dir"))
    if not (root / "manifest.json").is_file():
        from softdimo.world.store import load_world

        load_world(spec, options.get("cache_dir"), build_if_missing=True)
    return WorldEncoder(load_tokenizer(root / "tokenizer", device=device), kind)
