"""Image -> token encoders: each teacher family's own tokenizer encoder, for making D_d from images.

An ``Encoder`` turns a batch of images [B, 3, H, W] (float in [0, 1], already resized and cropped
to ``preprocess.size``) into the teacher's token ids [B, L] (the ids ``decode_ids`` of the same
family's adapter takes, so ``data.tokens`` needs no conversion). Each family maps [0, 1] to its own
value range inside ``encode``; the resize/crop protocol, which must happen on the decoded image
before any batching, is the ``Preprocess`` record that ``prepare_image`` applies.

``ENCODERS`` is the registry: kind -> (module, loader name); modules load only when asked.
``load_encoder(kind, paths, options, device)`` checks ``paths`` with the same rules as the teacher
(``softdimo.teachers.check_paths``), so an encoder reads exactly the files its decoder reads.
The embedded world's kinds take ``options`` {"spec", "cache_dir"} instead of paths.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Mapping, Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image

_RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}


@dataclass(frozen=True)
class Preprocess:
    """A family's published evaluation transform: shorter edge -> ``size`` (PIL, antialiased, as
    torchvision's Resize on PIL images), then a centre crop to size × size."""
    size: int
    interpolation: str = "bicubic"          # "bicubic" | "bilinear"


@runtime_checkable
class Encoder(Protocol):
    kind: str                       # the teacher kind whose ids it makes
    V: int                          # ids lie in [0, V)
    seq_len: int                    # L
    preprocess: Preprocess

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, S, S] float in [0, 1] -> token ids [B, L] long."""


def prepare_image(image: Image.Image, pre: Preprocess) -> np.ndarray:
    """A decoded image -> uint8 [3, S, S]: RGB, shorter edge resized to S, centre-cropped."""
    image = image.convert("RGB")
    w, h = image.size
    s = pre.size
    if (w, h) != (s, s):
        # torchvision's Resize(int): the shorter edge becomes s, the longer one s·long/short (floored)
        nw, nh = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)
        if (nw, nh) != (w, h):
            image = image.resize((nw, nh), _RESAMPLE[pre.interpolation])
        left, top = int(round((nw - s) / 2.0)), int(round((nh - s) / 2.0))
        image = image.crop((left, top, left + s, top + s))
    return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).copy()


def to_unit(batch: np.ndarray | torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 [B, 3, S, S] -> float32 in [0, 1] on ``device``."""
    x = torch.as_tensor(batch).to(device)
    return x.float() / 255.0


def nearest_code(z: torch.Tensor, book: torch.Tensor) -> torch.Tensor:
    """z [N, d] -> ids [N] of the nearest row of ``book`` [V, d] in L2, with the expansion
    |z|² + |e|² − 2 z·e that the taming and TiTok quantizers use (ties and rounding go their way)."""
    d = z.pow(2).sum(1, keepdim=True) + book.pow(2).sum(1) - 2.0 * torch.einsum("bd,dn->bn", z, book.t())
    return d.argmin(1)


# kind -> (module, loader); each loader is load(paths, options, device) -> Encoder
ENCODERS: dict[str, tuple[str, str]] = {
    "world_c2i": ("softdimo.teachers.world_encoder", "load"),
    "world_t2i": ("softdimo.teachers.world_encoder", "load"),
    "maskgit": ("softdimo.teachers.maskgit_encoder", "load"),
    "maskbit": ("softdimo.teachers.maskbit_encoder", "load"),
    "maskgen": ("softdimo.teachers.maskgen_encoder", "load"),
    "amused": ("softdimo.teachers.muse_encoder", "load_amused"),
    "meissonic": ("softdimo.teachers.muse_encoder", "load_meissonic"),
}


def load_encoder(kind: str, paths: Mapping[str, str] | None = None,
                 options: Mapping[str, Any] | None = None, device: torch.device | str = "cpu") -> Encoder:
    """The encoder of teacher ``kind`` from the teacher's own files, frozen, on ``device``.

    Raises TeacherFilesMissing (key ``teacher.paths.<name>``) for a missing or unknown file and
    KeyError for an unknown kind."""
    if kind not in ENCODERS:
        raise KeyError(f"no encoder for teacher kind {kind!r}; known: {', '.join(ENCODERS)}")
    module, name = ENCODERS[kind]
    checked: dict = {}
    if not kind.startswith("world_"):
        from softdimo.teachers import check_paths

        checked = check_paths(kind, dict(paths or {}))
    loader = getattr(importlib.import_module(module), name)
    encoder = loader(checked, dict(options or {}), torch.device(device))
    encoder.kind = kind                  # world_c2i and world_t2i share one tokenizer
    return encoder
