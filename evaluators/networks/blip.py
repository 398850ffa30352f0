"""BLIP's ViT image encoder and its BERT text encoder with cross-attention, as plain modules.

ImageReward (Xu et al., 2023) scores a (prompt, image) pair with BLIP: a ViT-L/16 turns the image into
tokens, a BERT-base reads the prompt and attends to those tokens in every layer, and the [CLS] state feeds
a small head (evaluators/networks/image_reward.py). This file rebuilds the two encoders from their published
description so the published `ImageReward.pt` loads with a strict key check; module and parameter names
follow that state dict (BLIP's `vit.py` and `med.py`, read for names, shapes and layer order only).

Differences from upstream that cannot change a frozen score: no dropout / drop-path modules (they are the
identity in eval mode and hold no parameters), attention through `scaled_dot_product_attention`, and the
text position ids computed on the fly instead of being kept as a buffer (upstream persists it; the loader
accepts and checks it, see image_reward.py).

Shapes: B batch, S image side, P = (S / patch)² patches, Ti = P + 1 image tokens, Dv vision width,
L text length, Dt text width.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class BlipConfig:
    """Sizes of BLIP's two encoders; the defaults are ImageReward's (ViT-L/16 at 224, BERT-base)."""

    image_size: int = 224
    patch_size: int = 16
    vision_width: int = 1024
    vision_layers: int = 24
    vision_heads: int = 16
    vision_mlp_ratio: float = 4.0
    vision_eps: float = 1e-6          # BLIP's ViT uses LayerNorm(eps=1e-6)
    text_width: int = 768
    text_layers: int = 12
    text_heads: int = 12
    text_intermediate: int = 3072
    text_eps: float = 1e-12           # med_config.json layer_norm_eps
    vocab_size: int = 30524           # bert-base-uncased 30522 + BLIP's [DEC] and [ENC]
    max_positions: int = 512
    pad_token_id: int = 0
    embed_dim: int = 256              # BLIP's vision_proj / text_proj width (unused by ImageReward)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_med_config(cls, path: str | Path, **overrides) -> "BlipConfig":
        """Text sizes from BLIP's `med_config.json`; vision sizes stay ViT-L/16 unless overridden.

        The file's `encoder_width` is ignored: BLIP sets the cross-attention key/value width to the
        vision width whatever the file says (the published files say 768 or 1024).
        """
        med = json.loads(Path(path).read_text())
        if med.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"{path}: hidden_act {med['hidden_act']!r} is not supported (only 'gelu')")
        if med.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{path}: only absolute position embeddings are supported")
        if not med.get("add_cross_attention", False):
            raise ValueError(f"{path}: ImageReward's text encoder needs add_cross_attention = true")
        text = dict(text_width=med["hidden_size"], text_layers=med["num_hidden_layers"],
                    text_heads=med["num_attention_heads"], text_intermediate=med["intermediate_size"],
                    text_eps=med.get("layer_norm_eps", 1e-12), vocab_size=med["vocab_size"],
                    max_positions=med["max_position_embeddings"], pad_token_id=med.get("pad_token_id", 0))
        return replace(cls(), **{**text, **overrides})


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, T, D] -> [B, heads, T, D / heads]."""
    b, t, d = x.shape
    return x.view(b, t, heads, d // heads).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    """[B, heads, T, Dh] -> [B, T, heads · Dh]."""
    b, h, t, dh = x.shape
    return x.transpose(1, 2).reshape(b, t, h * dh)


# ---------------------------------------------------------------------------------------------------------
# Vision: BLIP's ViT (timm layout, pre-norm blocks, exact GELU, qkv with bias, final LayerNorm).

class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, width: int):
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] -> [B, P, Dv]."""
        return self.proj(x).flatten(2).transpose(1, 2)


class VitAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (_heads(t, self.heads) for t in self.qkv(x).chunk(3, dim=-1))
        return self.proj(_merge(F.scaled_dot_product_attention(q, k, v)))


class VitMlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class VitBlock(nn.Module):
    def __init__(self, width: int, heads: int, hidden: int, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.attn = VitAttention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=eps)
        self.mlp = VitMlp(width, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """Image [B, 3, S, S] (CLIP-normalised) -> tokens [B, Ti, Dv], [CLS] first."""

    def __init__(self, cfg: BlipConfig):
        super().__init__()
        width = cfg.vision_width
        self.patch_embed = PatchEmbed(cfg.patch_size, width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, width))
        hidden = int(width * cfg.vision_mlp_ratio)
        self.blocks = nn.ModuleList(VitBlock(width, cfg.vision_heads, hidden, cfg.vision_eps)
                                    for _ in range(cfg.vision_layers))
        self.norm = nn.LayerNorm(width, eps=cfg.vision_eps)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        if x.shape[1] != self.pos_embed.shape[1]:
            raise ValueError(f"expected {self.pos_embed.shape[1] - 1} patches, got {x.shape[1] - 1}: "
                             "resize images to the configured image_size first")
        x = x + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


# ---------------------------------------------------------------------------------------------------------
# Text: BLIP's med.py BertModel (post-norm layers: self-attention -> cross-attention -> feed-forward).

class BertEmbeddings(nn.Module):
    """Word + absolute position embeddings, then LayerNorm; med.py has no token-type embeddings."""

    def __init__(self, cfg: BlipConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.text_width, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_positions, cfg.text_width)
        self.LayerNorm = nn.LayerNorm(cfg.text_width, eps=cfg.text_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, L] token ids -> [B, L, Dt]."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.LayerNorm(self.word_embeddings(input_ids) + self.position_embeddings(positions))


class BertSelfAttention(nn.Module):
    """Query from the text; key/value from the text (self) or from the image tokens (cross)."""

    def __init__(self, cfg: BlipConfig, kv_width: int):
        super().__init__()
        self.heads = cfg.text_heads
        self.query = nn.Linear(cfg.text_width, cfg.text_width)
        self.key = nn.Linear(kv_width, cfg.text_width)
        self.value = nn.Linear(kv_width, cfg.text_width)

    def forward(self, x: torch.Tensor, context: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        q = _heads(self.query(x), self.heads)
        k, v = _heads(self.key(context), self.heads), _heads(self.value(context), self.heads)
        return _merge(F.scaled_dot_product_attention(q, k, v, attn_mask=bias))


class BertSelfOutput(nn.Module):
    def __init__(self, cfg: BlipConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.text_width, cfg.text_width)
        self.LayerNorm = nn.LayerNorm(cfg.text_width, eps=cfg.text_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class BertAttention(nn.Module):
    def __init__(self, cfg: BlipConfig, kv_width: int):
        super().__init__()
        self.self = BertSelfAttention(cfg, kv_width)
        self.output = BertSelfOutput(cfg)

    def forward(self, x: torch.Tensor, context: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self.output(self.self(x, context, bias), x)


class BertIntermediate(nn.Module):
    def __init__(self, cfg: BlipConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.text_width, cfg.text_intermediate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))     # med_config hidden_act "gelu" is the exact (erf) GELU


class BertOutput(nn.Module):
    def __init__(self, cfg: BlipConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.text_intermediate, cfg.text_width)
        self.LayerNorm = nn.LayerNorm(cfg.text_width, eps=cfg.text_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class BertLayer(nn.Module):
    def __init__(self, cfg: BlipConfig):
        super().__init__()
        self.attention = BertAttention(cfg, cfg.text_width)
        self.crossattention = BertAttention(cfg, cfg.vision_width)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertOutput(cfg)

    def forward(self, x: torch.Tensor, text_bias: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, x, text_bias)
        # every image token is attended to (ImageReward passes an all-ones image mask), so no bias
        x = self.crossattention(x, image, None)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, cfg: BlipConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.text_layers))


class BertModel(nn.Module):
    """Prompt tokens [B, L] attending to image tokens [B, Ti, Dv] -> hidden states [B, L, Dt].

    med.py's BertModel in its default 'multimodal' mode, built without the pooler (BLIP passes
    add_pooling_layer=False), used as an encoder (bidirectional self-attention, padding masked).
    """

    def __init__(self, cfg: BlipConfig):
        super().__init__()
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertEncoder(cfg)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                image_embeds: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(input_ids)
        # med.py adds (1 - mask) · -10000 to the attention scores of padded keys; same constant here
        bias = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -10000.0
        image_embeds = image_embeds.to(x.dtype)
        for layer in self.encoder.layer:
            x = layer(x, bias, image_embeds)
        return x


class Blip(nn.Module):
    """BLIP_Pretrain as ImageReward builds it; `vision_proj`/`text_proj` are in the published state dict
    but unused for scoring, and are kept so that file loads with a strict key check."""

    def __init__(self, cfg: BlipConfig):
        super().__init__()
        self.visual_encoder = VisionTransformer(cfg)
        self.text_encoder = BertModel(cfg)
        self.vision_proj = nn.Linear(cfg.vision_width, cfg.embed_dim)
        self.text_proj = nn.Linear(cfg.text_width, cfg.embed_dim)
