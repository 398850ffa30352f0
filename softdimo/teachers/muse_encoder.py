"""The VQ encoders of the MUSE-family teachers (aMUSEd, Meissonic): diffusers' own ``VQModel``.

Both read the teacher folder's ``vqvae/`` (config.json + weights, loaded strictly as the teacher
loads it). Path, as diffusers' aMUSEd training script tokenizes images: x in [0, 1] (ToTensor, no
normalisation) -> ``encode(x).latents`` -> ``quantize`` (nearest code by ``cdist``) -> the flat
indices as ids [B, h·w], row-major, which ``MuseTeacher.decode_ids`` reads back.
Image size: aMUSEd's transformer ``sample_size`` × the VQ downsampling (256 or 512); Meissonic's
``teacher.options.resolution`` (default 1024). Preprocessing: shorter edge resized (bilinear, as
that script's Resize), centre crop.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from softdimo.teachers.encoding import Preprocess
from softdimo.teachers.muse_common import component_files, load_diffusers, vq_scale


class MuseEncoder:
    """Encoder protocol over a diffusers VQModel: V = num_vq_embeddings, L = (S / f)²."""

    def __init__(self, vqvae: nn.Module, image_size: int, kind: str):
        scale = vq_scale(vqvae)
        if image_size % scale:
            raise ValueError(f"{image_size} px is not a multiple of the VQ downsampling {scale}")
        self.vqvae = vqvae.eval().requires_grad_(False)
        self.kind = kind
        self.V: int = vqvae.config.num_vq_embeddings
        self.seq_len: int = (image_size // scale) ** 2
        self.preprocess = Preprocess(image_size, "bilinear")

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.vqvae.quant_conv.weight.device)
        h = self.vqvae.encode(x).latents
        ids = self.vqvae.quantize(h)[2][2]
        return ids.reshape(x.shape[0], -1).long()


def _vqvae(folder: Path, source: str) -> nn.Module:
    from diffusers import VQModel

    return load_diffusers(VQModel, folder, "vqvae", source)


def load_amused(paths: dict[str, Path], options: dict, device: torch.device) -> MuseEncoder:
    from softdimo.teachers.amused import SOURCE

    folder = Path(paths["folder"])
    vqvae = _vqvae(folder, SOURCE)
    config, _ = component_files(folder, "transformer", SOURCE)
    side = int(json.loads(config.read_text())["sample_size"])
    return MuseEncoder(vqvae.to(device), side * vq_scale(vqvae), "amused")


def load_meissonic(paths: dict[str, Path], options: dict, device: torch.device) -> MuseEncoder:
    from softdimo.teachers.meissonic import SOURCE, _options

    folder = Path(paths["folder"])
    resolution = _options(options)["resolution"]
    return MuseEncoder(_vqvae(folder, SOURCE).to(device), int(resolution), "meissonic")
