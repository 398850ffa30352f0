"""Discriminator heads η on the frozen teacher's multi-scale features (Sec. 3.2.1, Fig. 5).

The frozen teacher φ is the feature extractor: the (masked) input embeddings run through its
backbone, the hidden states of a few selected blocks feed one convolutional head each, the pooled
head outputs are concatenated with the mask ratio r, and an MLP gives one logit per sample.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from softdimo.teachers.protocol import Teacher


class ConvHead(nn.Module):
    """Hidden states [B, L, D] -> [B, C]: convolutions over the token grid, then mean pooling.

    An input convolution D→C with GroupNorm and SiLU, then ``depth`` 3×3 convolutions C→C (GroupNorm
    and SiLU between them, SiLU after the last). depth = 1 is the small default head; the real presets
    choose C and depth so that η has Table 5's parameter count.
    """

    def __init__(self, width: int, channels: int, seq_len: int, depth: int = 1):
        super().__init__()
        side = math.isqrt(seq_len)
        # Square token grids get 2-D convolutions; 1-D token sequences (MaskGen) get 1-D ones.
        self.grid = (side, side) if side * side == seq_len else None
        conv = nn.Conv2d if self.grid else nn.Conv1d
        layers: list[nn.Module] = [conv(width, channels, 3, padding=1), nn.GroupNorm(8, channels), nn.SiLU()]
        for k in range(depth):
            layers.append(conv(channels, channels, 3, padding=1))
            layers += [nn.GroupNorm(8, channels), nn.SiLU()] if k < depth - 1 else [nn.SiLU()]
        self.net = nn.Sequential(*layers)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = h.transpose(1, 2)                                   # [B, D, L]
        if self.grid:
            x = x.reshape(x.shape[0], x.shape[1], *self.grid)   # [B, D, h, w]
        return self.net(x).flatten(2).mean(dim=2)


class DiscriminatorHeads(nn.Module):
    """The trainable part η: one ConvHead per selected teacher layer, then an MLP over [heads, r]."""

    def __init__(self, width: int, feature_len: int, layers: Sequence[int], channels: int = 64,
                 depth: int = 1):
        super().__init__()
        self.layers = tuple(int(i) for i in layers)
        self.heads = nn.ModuleList(ConvHead(width, channels, feature_len, depth) for _ in self.layers)
        self.mlp = nn.Sequential(
            nn.Linear(channels * len(self.layers) + 1, channels), nn.SiLU(), nn.Linear(channels, 1),
        )

    def forward(self, features: Sequence[torch.Tensor], r: torch.Tensor) -> torch.Tensor:
        pooled = [head(f.float()) for head, f in zip(self.heads, features)]
        return self.mlp(torch.cat(pooled + [r.float()[:, None]], dim=1)).squeeze(1)


def discriminate(teacher: Teacher, heads: DiscriminatorHeads, e: torch.Tensor, cond: torch.Tensor,
                 r: torch.Tensor, feature_noise: float = 0.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """D_η(e, r): masked input embeddings e [B, L, D] -> logits [B] through the frozen teacher."""
    _, features = teacher.forward_embeddings(teacher.backbone, e, cond, layers=heads.layers)
    if feature_noise > 0:
        features = [f + feature_noise * torch.randn(f.shape, generator=generator, device=f.device,
                                                    dtype=f.dtype) for f in features]
    return heads(features, r)
