"""The decoder side of TA-TiTok (bytedance/1d-tokenizer ``modeling/tatitok.py``), re-written from its facts.

Shapes: B batch, L latent tokens (128), V codes (8192), d code width (``token_size``, 64), W decoder
width (1024 for "large"), T text tokens (77), C text feature width (768), g = crop/patch patches per side.

Only what decoding needs is built: ``quantize`` (the codebook) and ``decoder`` (the text-aware ViT
decoder). Parameter names follow the published HubMixin folder (``turkeyju/tokenizer_tatitok_bl128_vq``)
whose ``model.safetensors`` also holds the encoder (``encoder.*``) and the encoder's learned
``latent_tokens``; ``split_encoder_keys`` sets those aside before the strict load.

Decode path (``TATiTok.decode_tokens``): codes -> z [B, d, 1, L] -> ``decoder_embed`` + latent
positions; g² mask tokens (+ a class token) with their positions; T text tokens (``text_guidance_proj``
+ positions); a pre-norm ViT over [cls, g² mask, L latents, T text]; the g² patch outputs -> a 1×1
conv to p·p·3 channels -> pixels -> a 3×3 conv. Images come out roughly in [0, 1].
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

# the ViT sizes are fixed lookups upstream (blocks.py): width, layers, heads
VIT_SIZES = {"small": (512, 8, 8), "base": (768, 12, 12), "large": (1024, 24, 16)}
ENCODER_PREFIXES = ("encoder.", "latent_tokens")
PIXEL_PREFIXES = ("pixel_quantize.", "pixel_decoder.")      # only with finetune_decoder (unused here)


@dataclass(frozen=True)
class TATiTokConfig:
    codebook_size: int = 8192               # V
    token_size: int = 64                    # d
    num_latent_tokens: int = 128            # L
    use_l2_norm: bool = False
    clustering_vq: bool = False
    dec_size: str = "large"                 # vit_dec_model_size
    patch_size: int = 16                    # vit_dec_patch_size
    crop_size: int = 256
    text_embed_dim: int = 768               # C
    text_context_length: int = 77           # T
    quantize_mode: str = "vq"
    is_legacy: bool = False
    finetune_decoder: bool = False

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> "TATiTokConfig":
        """From the nested upstream config (``config.json`` of the HubMixin folder)."""
        try:
            vq = config["model"]["vq_model"]
            return cls(codebook_size=int(vq["codebook_size"]), token_size=int(vq["token_size"]),
                       num_latent_tokens=int(vq["num_latent_tokens"]),
                       use_l2_norm=bool(vq.get("use_l2_norm", False)),
                       clustering_vq=bool(vq.get("clustering_vq", False)),
                       dec_size=str(vq["vit_dec_model_size"]),
                       patch_size=int(vq["vit_dec_patch_size"]),
                       crop_size=int(config["dataset"]["preprocessing"]["crop_size"]),
                       text_embed_dim=int(vq.get("text_embed_dim", 768)),
                       text_context_length=int(vq.get("text_context_length", 77)),
                       quantize_mode=str(vq.get("quantize_mode", "vq")),
                       is_legacy=bool(vq.get("is_legacy", True)),      # upstream's default
                       finetune_decoder=bool(vq.get("finetune_decoder", True)))
        except KeyError as err:
            raise ValueError(f"TA-TiTok config lacks {err} (expected model.vq_model, "
                             "dataset.preprocessing.crop_size)") from err

    @property
    def grid(self) -> int:
        return self.crop_size // self.patch_size


class VectorQuantizer(nn.Module):
    """The codebook E [V, d]; ``entry`` takes ids [N] (lookup) or probabilities [N, V] (p @ E)."""

    def __init__(self, codebook_size: int, token_size: int, use_l2_norm: bool = False,
                 clustering_vq: bool = False):
        super().__init__()
        self.embedding = nn.Embedding(codebook_size, token_size)
        self.use_l2_norm = use_l2_norm
        if clustering_vq:                   # training statistics only, kept so the file loads strictly
            self.register_buffer("embed_prob", torch.zeros(codebook_size))

    def entry(self, codes: torch.Tensor) -> torch.Tensor:
        """ids [N] or probabilities [N, V] -> code vectors [N, d] (upstream get_codebook_entry)."""
        if codes.dim() == 1:
            z = self.embedding(codes)
        elif codes.dim() == 2:
            z = codes.to(self.embedding.weight.dtype) @ self.embedding.weight
        else:
            raise ValueError(f"codes must be ids [N] or probabilities [N, V], got {tuple(codes.shape)}")
        return F.normalize(z, dim=-1) if self.use_l2_norm else z


class ResidualAttentionBlock(nn.Module):
    """Pre-norm ViT block (open_clip style names): x + attn(ln_1 x), then x + mlp(ln_2 x); [B, N, W]."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        # batch_first only changes the call layout, not the parameters (in_proj_*, out_proj)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, hidden)), ("gelu", nn.GELU()),
                                              ("c_proj", nn.Linear(hidden, width))]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class PatchesToPixels(nn.Module):
    """[B, p·p·3, g, g] with channels ordered (p1, p2, c) -> [B, 3, g·p, g·p] (no parameters)."""

    def __init__(self, patch: int):
        super().__init__()
        self.patch = patch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        p = self.patch
        x = x.reshape(b, p, p, 3, h, w).permute(0, 3, 4, 1, 5, 2)
        return x.reshape(b, 3, h * p, w * p)


class TATiTokDecoder(nn.Module):
    """Text-aware ViT decoder: z [B, d, 1, L] and text [B, T, C] -> images [B, 3, crop, crop]."""

    def __init__(self, c: TATiTokConfig):
        super().__init__()
        if c.is_legacy:
            raise ValueError("legacy TiTok decoders (is_legacy: true) predict MaskGIT-VQGAN codes; "
                             "only the pixel decoders of TA-TiTok (is_legacy: false) are supported")
        if c.dec_size not in VIT_SIZES:
            raise ValueError(f"vit_dec_model_size {c.dec_size!r} is not one of {sorted(VIT_SIZES)}")
        width, layers, heads = VIT_SIZES[c.dec_size]
        scale = width ** -0.5
        self.grid, self.num_latent_tokens, self.width = c.grid, c.num_latent_tokens, width
        self.decoder_embed = nn.Linear(c.token_size, width)
        self.class_embedding = nn.Parameter(scale * torch.randn(1, width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(c.grid ** 2 + 1, width))
        self.mask_token = nn.Parameter(scale * torch.randn(1, 1, width))
        self.latent_token_positional_embedding = nn.Parameter(scale * torch.randn(c.num_latent_tokens, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = nn.ModuleList([ResidualAttentionBlock(width, heads) for _ in range(layers)])
        self.ln_post = nn.LayerNorm(width)
        self.ffn = nn.Sequential(nn.Conv2d(width, c.patch_size ** 2 * 3, 1), PatchesToPixels(c.patch_size))
        self.conv_out = nn.Conv2d(3, 3, 3, padding=1)
        self.text_guidance_proj = nn.Linear(c.text_embed_dim, width)
        self.text_guidance_positional_embedding = nn.Parameter(
            scale * torch.randn(c.text_context_length, width))

    def forward(self, z: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        b, d, h, n = z.shape
        if h != 1 or n != self.num_latent_tokens:
            raise ValueError(f"z must be [B, d, 1, {self.num_latent_tokens}], got {tuple(z.shape)}")
        x = self.decoder_embed(z.reshape(b, d, n).transpose(1, 2)) + self.latent_token_positional_embedding
        queries = torch.cat([self.class_embedding.expand(b, 1, -1).to(x.dtype),
                             self.mask_token.expand(b, self.grid ** 2, -1).to(x.dtype)], dim=1)
        queries = queries + self.positional_embedding.to(x.dtype)
        text = self.text_guidance_proj(text.to(x.dtype)) + self.text_guidance_positional_embedding
        x = self.ln_pre(torch.cat([queries, x, text], dim=1))
        for block in self.transformer:
            x = block(x)
        x = self.ln_post(x[:, 1:1 + self.grid ** 2])           # the patch queries, without cls
        x = x.transpose(1, 2).reshape(b, self.width, self.grid, self.grid)
        return self.conv_out(self.ffn(x.contiguous()))


class TATiTokDecoderSide(nn.Module):
    """``quantize`` + ``decoder`` of a TA-TiTok VQ tokenizer: codes or code probabilities -> images."""

    def __init__(self, config: TATiTokConfig):
        super().__init__()
        if config.quantize_mode != "vq":
            raise ValueError(f"quantize_mode {config.quantize_mode!r}: only the VQ tokenizers "
                             "(tatitok_*_vq) give discrete codes for a masked generator")
        self.config = config
        self.quantize = VectorQuantizer(config.codebook_size, config.token_size,
                                        config.use_l2_norm, config.clustering_vq)
        self.decoder = TATiTokDecoder(config)

    def decode_codes(self, codes: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """ids [B, L] or probabilities [B, L, V], text [B, T, C] -> images [B, 3, H, W] (unclamped).

        Probabilities go through the quantizer's soft path p @ E (Emb_Dec of the paper).
        """
        b, n = codes.shape[:2]
        flat = codes.reshape(b * n) if codes.dim() == 2 else codes.reshape(b * n, -1)
        z = self.quantize.entry(flat).reshape(b, n, -1).transpose(1, 2).unsqueeze(2)
        return self.decoder(z, text)


def split_encoder_keys(state: Mapping[str, torch.Tensor], config: TATiTokConfig
                       ) -> tuple[dict, list[str]]:
    """The file's tensors without the encoder side (not needed to decode) -> (kept, set-aside names)."""
    unused = ENCODER_PREFIXES + (PIXEL_PREFIXES if config.finetune_decoder else ())
    aside = sorted(k for k in state if k.startswith(unused))
    return {k: v for k, v in state.items() if not k.startswith(unused)}, aside
