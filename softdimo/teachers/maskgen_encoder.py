"""TA-TiTok's encoder (bytedance/1d-tokenizer ``modeling/modules/blocks.py`` TiTokEncoder and
``modeling/quantizer/quantizer.py``), re-written from its facts, for MaskGen's tokens.

Reads the teacher's ``tokenizer`` folder (config.json + model.safetensors). From the file it keeps
``latent_tokens``, ``encoder.*`` and ``quantize.*`` and sets the decoder side aside; any other key
fails the strict load.

Shapes: B batch, S crop (256), p encoder patch (``vit_enc_patch_size``), g = S/p, W encoder width
(``vit_enc_model_size``: 512/768/1024), L latent tokens (128), d code width, V codes.
Path: x in [0, 1] (the loader's ToTensor, no normalisation) -> p×p patch conv -> [cls, g² patches]
+ positions, then L learned latent tokens + their positions -> ln_pre -> ViT -> the L latent
outputs -> ln_post -> a 1×1 conv to d (with the legacy or the fixed reshape, ``is_legacy``) ->
nearest code (after L2 normalisation of both sides when ``use_l2_norm``) -> ids [B, L].
Preprocessing as upstream's evaluation transform: Resize(crop, bicubic, antialias) + CenterCrop.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from softdimo.checkpoints import load_strict, read_tensors
from softdimo.teachers.encoding import Preprocess, nearest_code
from softdimo.teachers.maskgen_tatitok import (VIT_SIZES, ResidualAttentionBlock, TATiTokConfig,
                                                VectorQuantizer)

KEPT_PREFIXES = ("latent_tokens", "encoder.", "quantize.")
ASIDE_PREFIXES = ("decoder.", "pixel_quantize.", "pixel_decoder.")


class TiTokEncoder(nn.Module):
    """images [B, 3, S, S] and latent tokens [L, W] -> continuous tokens [B, d, 1, L]."""

    def __init__(self, crop: int, patch: int, size: str, num_latent_tokens: int, token_size: int,
                 is_legacy: bool):
        super().__init__()
        if size not in VIT_SIZES:
            raise ValueError(f"vit_enc_model_size {size!r} is not one of {sorted(VIT_SIZES)}")
        width, layers, heads = VIT_SIZES[size]
        scale = width ** -0.5
        self.grid, self.width, self.is_legacy = crop // patch, width, is_legacy
        self.num_latent_tokens, self.token_size = num_latent_tokens, token_size
        self.patch_embed = nn.Conv2d(3, width, patch, stride=patch, bias=True)
        self.class_embedding = nn.Parameter(scale * torch.randn(1, width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(self.grid ** 2 + 1, width))
        self.latent_token_positional_embedding = nn.Parameter(scale * torch.randn(num_latent_tokens, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = nn.ModuleList([ResidualAttentionBlock(width, heads) for _ in range(layers)])
        self.ln_post = nn.LayerNorm(width)
        self.conv_out = nn.Conv2d(width, token_size, 1, bias=True)

    def forward(self, x: torch.Tensor, latent_tokens: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        x = self.patch_embed(x).flatten(2).transpose(1, 2)                     # [B, g², W]
        x = torch.cat([self.class_embedding.expand(b, 1, -1).to(x.dtype), x], dim=1)
        x = x + self.positional_embedding.to(x.dtype)
        latents = latent_tokens.expand(b, -1, -1).to(x.dtype) + self.latent_token_positional_embedding
        x = self.ln_pre(torch.cat([x, latents], dim=1))
        for block in self.transformer:
            x = block(x)
        z = self.ln_post(x[:, 1 + self.grid ** 2:])                            # [B, L, W]
        if self.is_legacy:          # upstream's original reshape (mixes axes; the weights expect it)
            z = z.reshape(b, self.width, self.num_latent_tokens, 1)
        else:
            z = z.transpose(1, 2).unsqueeze(-1)
        return self.conv_out(z).reshape(b, self.token_size, 1, self.num_latent_tokens)


class TATiTokEncoderSide(nn.Module):
    """``latent_tokens`` + ``encoder`` + ``quantize`` of a TA-TiTok VQ tokenizer, as the file names them."""

    def __init__(self, config: TATiTokConfig, enc_size: str, enc_patch: int):
        super().__init__()
        if config.quantize_mode != "vq":
            raise ValueError(f"quantize_mode {config.quantize_mode!r}: only VQ tokenizers give ids")
        self.config = config
        width = VIT_SIZES[enc_size][0] if enc_size in VIT_SIZES else 0
        self.latent_tokens = nn.Parameter(torch.zeros(config.num_latent_tokens, width))
        self.encoder = TiTokEncoder(config.crop_size, enc_patch, enc_size, config.num_latent_tokens,
                                    config.token_size, config.is_legacy)
        self.quantize = VectorQuantizer(config.codebook_size, config.token_size, config.use_l2_norm,
                                        config.clustering_vq)

    def encode_ids(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, 3, S, S] in [0, 1] -> ids [B, L] (upstream quantizes in float32)."""
        z = self.encoder(x, self.latent_tokens).float()                        # [B, d, 1, L]
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        book = self.quantize.embedding.weight
        if self.config.use_l2_norm:
            flat, book = F.normalize(flat, dim=-1), F.normalize(book, dim=-1)
        return nearest_code(flat, book).view(z.shape[0], -1)


class MaskGenEncoder:
    """Encoder protocol for MaskGen (TA-TiTok): V codes, L latent tokens, crop S."""

    def __init__(self, net: TATiTokEncoderSide):
        self.net = net.eval().requires_grad_(False)
        self.kind = "maskgen"
        self.V: int = net.config.codebook_size
        self.seq_len: int = net.config.num_latent_tokens
        self.preprocess = Preprocess(net.config.crop_size, "bicubic")

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.encode_ids(images.to(self.net.latent_tokens.device))


def encoder_fields(raw: Mapping[str, Any], source: str) -> tuple[str, int]:
    """(vit_enc_model_size, vit_enc_patch_size) from the nested config, or a ValueError naming them."""
    try:
        vq = raw["model"]["vq_model"]
        return str(vq["vit_enc_model_size"]), int(vq["vit_enc_patch_size"])
    except KeyError as err:
        raise ValueError(f"{source}: model.vq_model lacks {err} (the TiTok encoder's size)") from None


def load(paths: dict[str, Path], options: dict, device: torch.device) -> MaskGenEncoder:
    """The encoder side of ``paths["tokenizer"]`` loaded strictly (decoder tensors set aside)."""
    from softdimo.teachers.maskgen import _folder_files

    raw, weights = _folder_files(Path(paths["tokenizer"]), "tokenizer")
    config = TATiTokConfig.from_dict(raw)
    size, patch = encoder_fields(raw, str(Path(paths["tokenizer"]) / "config.json"))
    net = TATiTokEncoderSide(config, size, patch)
    state = {k: v for k, v in read_tensors(weights).items() if not k.startswith(ASIDE_PREFIXES)}
    load_strict(net, state, str(weights))
    return MaskGenEncoder(net.to(device))
