"""MaskBit's tokenizer encoder: ConvVQModel's encoder and lookup-free quantizer, then the bit grouping.

Reads the teacher's ``tokenizer`` .bin and ``tokenizer_config`` yaml (loaded strictly, the whole
ConvVQModel as the teacher loads it) and, from ``generator_config``, the number of bit groups M
(``model.mlm_model.codebook_splits``) and the image size (``dataset.preprocessing.resolution``).

Path: x in [0, 1] -> ConvEncoder -> c latent channels per position; bit j = (channel j > 0) (LFQ's
sign, code = Σ bit_j 2^j) -> M groups of c/M bits each (group g = bits g·c/M .. (g+1)·c/M − 1, LSB
first) -> ids [B, N·M] at index M·pos + g, the layout ``MaskBitTeacher.decode_ids`` reads
(N = h·w positions, row-major). Preprocessing as MaskBit's ImageNet loader at evaluation: shorter
edge to the resolution (``dataset.preprocessing.interpolation`` of the generator yaml, bicubic in
the published ones), centre crop.
"""
from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf

from softdimo.checkpoints import load_strict, read_tensors
from softdimo.teachers.encoding import Preprocess
from softdimo.teachers.maskbit import _field, _tokenizer_config
from softdimo.teachers.maskbit_vqgan import ConvVQModel


def split_codes(codes: torch.Tensor, groups: int, group_bits: int) -> torch.Tensor:
    """LFQ codes [B, N] (c = groups·group_bits bits) -> group ids [B, N·groups], index groups·pos + g."""
    shifts = torch.arange(groups, device=codes.device) * group_bits
    return ((codes.long()[..., None] >> shifts) & (2 ** group_bits - 1)).flatten(1)


class MaskBitEncoder:
    """Encoder protocol for MaskBit: V = 2^(c/M) codes per group, L = N·M."""

    def __init__(self, tokenizer: ConvVQModel, groups: int, image_size: int, interpolation: str = "bicubic"):
        bits = tokenizer.config.token_size
        if bits % groups:
            raise ValueError(f"{bits} token bits do not split into {groups} groups")
        self.tokenizer = tokenizer.eval().requires_grad_(False)
        self.kind = "maskbit"
        self.groups, self.group_bits = groups, bits // groups
        self.V: int = 2 ** self.group_bits
        side = image_size // 2 ** (tokenizer.config.num_resolutions - 1)
        self.seq_len: int = side * side * groups
        self.preprocess = Preprocess(image_size, interpolation)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        codes = self.tokenizer.encode_tokens(images.to(self.tokenizer.quantize.codebook.device))
        return split_codes(codes, self.groups, self.group_bits)


def load(paths: dict[str, Path], options: dict, device: torch.device) -> MaskBitEncoder:
    """The tokenizer loaded strictly from its .bin and yaml; groups and size from the generator yaml."""
    gen_yaml, tok_yaml = paths["generator_config"], paths["tokenizer_config"]
    gen_cfg, tok_cfg = OmegaConf.load(gen_yaml), OmegaConf.load(tok_yaml)
    tokenizer = ConvVQModel(_tokenizer_config(_field(tok_cfg, "model.vq_model", tok_yaml), tok_yaml))
    load_strict(tokenizer, read_tensors(paths["tokenizer"]), str(paths["tokenizer"]))
    groups = int(_field(gen_cfg, "model.mlm_model.codebook_splits", gen_yaml))
    size = int(_field(gen_cfg, "dataset.preprocessing.resolution", gen_yaml))
    interpolation = str(OmegaConf.select(gen_cfg, "dataset.preprocessing.interpolation", default="bicubic"))
    if interpolation not in ("bicubic", "bilinear"):
        raise ValueError(f"{gen_yaml}: dataset.preprocessing.interpolation {interpolation!r} is not "
                         "bicubic or bilinear")
    return MaskBitEncoder(tokenizer.to(device), groups, size, interpolation)
