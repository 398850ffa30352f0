"""MaskGIT v1's tokenizer encoder: the encode path of taming's VQModel (valeoai/Maskgit-pytorch v1.0).

Reads the same ``vqgan`` last.ckpt and ``vqgan_config`` model.yaml as the teacher; from the
VQModel ``state_dict`` it keeps ``encoder.*``, ``quant_conv.*`` and ``quantize.embedding.weight``
and leaves the decoder side and the Lightning loss module (``IGNORED_PREFIXES``) aside; any other key
fails the strict load.

Path: x in [-1, 1] (v1.0 normalises ImageNet with mean = std = 0.5) -> taming ``Encoder`` ->
``quant_conv`` -> nearest codebook row (VectorQuantizer2's L2 expansion) -> ids [B, h·w],
row-major over the h×w grid, as ``MaskGitTeacher.decode_ids`` reads them. Preprocessing as v1.0's
ImageNet loader: Resize(img_size) (torchvision default, bilinear) + CenterCrop(img_size).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from softdimo.checkpoints import StateDictMismatch, load_strict
from softdimo.teachers.encoding import Preprocess, nearest_code
from softdimo.teachers.maskgit import _read_checkpoint, read_vqgan_config
from softdimo.teachers.maskgit_modules import AttnBlock, ResnetBlock, VectorQuantizer2, normalize

IGNORED_PREFIXES = ("decoder.", "post_quant_conv.", "loss.")


class Downsample(nn.Module):
    """taming ``Downsample`` with conv: pad right/bottom by one, then a 3×3 stride-2 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Encoder(nn.Module):
    """taming ``Encoder`` (ddconfig names): x [B, in_channels, H, W] -> h [B, z_channels(·2), H/2ⁿ, W/2ⁿ],
    n = len(ch_mult) − 1; ``down[i]`` holds num_res_blocks blocks (+ attention at ``attn_resolutions``)."""

    def __init__(self, *, ch: int, ch_mult: Sequence[int], num_res_blocks: int,
                 attn_resolutions: Sequence[int], in_channels: int, resolution: int, z_channels: int,
                 double_z: bool = False, dropout: float = 0.0, **_decoder_only):
        super().__init__()
        levels = len(ch_mult)
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        in_mult, res, block_in = (1,) + tuple(ch_mult), resolution, ch
        downs = []
        for level in range(levels):
            down = nn.Module()
            down.block, down.attn = nn.ModuleList(), nn.ModuleList()
            block_in = ch * in_mult[level]
            for _ in range(num_res_blocks):
                down.block.append(ResnetBlock(block_in, ch * ch_mult[level], dropout))
                block_in = ch * ch_mult[level]
                if res in attn_resolutions:
                    down.attn.append(AttnBlock(block_in))
            if level != levels - 1:
                down.downsample = Downsample(block_in)
                res //= 2
            downs.append(down)
        self.down = nn.ModuleList(downs)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout)
        self.norm_out = normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level, down in enumerate(self.down):
            for i, block in enumerate(down.block):
                h = block(h)
                if len(down.attn):
                    h = down.attn[i](h)
            if level != len(self.down) - 1:
                h = down.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class VQGANEncoder(nn.Module):
    """``encoder`` + ``quant_conv`` + ``quantize`` (codebook) of a taming VQModel."""

    def __init__(self, n_embed: int, embed_dim: int, ddconfig: dict):
        super().__init__()
        self.encoder = Encoder(**ddconfig)
        z = ddconfig["z_channels"] * (2 if ddconfig.get("double_z") else 1)
        self.quant_conv = nn.Conv2d(z, embed_dim, 1)
        self.quantize = VectorQuantizer2(n_embed, embed_dim)
        self.downsampling = 2 ** (len(ddconfig["ch_mult"]) - 1)

    def encode_ids(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, 3, H, W] in [-1, 1] -> ids [B, (H/f)·(W/f)] row-major."""
        h = self.quant_conv(self.encoder(x))
        z = h.permute(0, 2, 3, 1).reshape(-1, h.shape[1])
        return nearest_code(z, self.quantize.embedding.weight).view(h.shape[0], -1)


class MaskGitEncoder:
    """Encoder protocol (softdimo.teachers.encoding) for MaskGIT v1: V = n_embed, L = (S/f)²."""

    def __init__(self, vqgan: VQGANEncoder, image_size: int):
        self.vqgan = vqgan.eval().requires_grad_(False)
        self.kind = "maskgit"
        self.V: int = vqgan.quantize.n_e
        self.seq_len: int = (image_size // vqgan.downsampling) ** 2
        self.preprocess = Preprocess(image_size, "bilinear")

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.vqgan.quant_conv.weight.device) * 2.0 - 1.0
        return self.vqgan.encode_ids(x)


def read_encoder_config(path: Path) -> tuple[int, int, dict]:
    """model.yaml -> (n_embed, embed_dim, the full ddconfig the Encoder takes); checked as the teacher does."""
    n_embed, embed_dim, _ = read_vqgan_config(path)
    ddconfig = dict(yaml.safe_load(Path(path).read_text())["model"]["params"]["ddconfig"])
    for key in ("resamp_with_conv", "give_pre_end", "tanh_out"):
        ddconfig.pop(key, None)
    ddconfig.setdefault("in_channels", 3)
    return n_embed, embed_dim, ddconfig


def load(paths: dict[str, Path], options: dict, device: torch.device) -> MaskGitEncoder:
    """The VQGAN encoder from ``vqgan`` + ``vqgan_config`` (the transformer file is not read).

    The crop is the teacher's image size: ``options.img_size``, else ``f_factor`` × the VQGAN's
    downsampling, else 256 (the other transformer options of ``teacher.options`` are not used here)."""
    n_embed, embed_dim, ddconfig = read_encoder_config(paths["vqgan_config"])
    vqgan = VQGANEncoder(n_embed, embed_dim, ddconfig)
    size = int(options["img_size"] if "img_size" in options else
               options["f_factor"] * vqgan.downsampling if "f_factor" in options else 256)
    if size % vqgan.downsampling:
        from softdimo.teachers import TeacherOptionError

        raise TeacherOptionError("teacher.options.img_size", f"{size} px is not a multiple of the "
                                 f"VQGAN downsampling {vqgan.downsampling}")
    ckpt = _read_checkpoint(paths["vqgan"])
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise StateDictMismatch(f"{paths['vqgan']}: expected a Lightning checkpoint with 'state_dict'")
    state = {k: v for k, v in ckpt["state_dict"].items() if not k.startswith(IGNORED_PREFIXES)}
    load_strict(vqgan, state, str(paths["vqgan"]))
    return MaskGitEncoder(vqgan.to(device), size)
