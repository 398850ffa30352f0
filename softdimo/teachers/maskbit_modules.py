"""MaskBit's generator, LFQBert (Weber et al. 2024, markweberdev/maskbit ``modeling/bert.py``), vendored.

Written for softdimo from the upstream architecture; parameter and buffer names match the published
``maskbit_generator_*bit.bin`` state dicts (after upstream's ``token_emb`` -> ``input_proj`` rename,
which ``rename_generator_keys`` applies), so they load strictly.

Shapes: B batch, N = 256 token positions (16×16 grid, row-major), M = 2 groups per position
(``codebook_splits``), C = 128 codes per group (7 bits), bits = M·7 = 14, D = 1024 hidden width.

The network has no embedding table: a group id becomes its 7 bits as ±1, least significant bit first
(0 for every bit of a masked group), and the M groups' bits are concatenated and projected by
``input_proj = Linear(bits, D)``. The class is a 257th token (``class_emb``, row ``nclass`` = the
dropped label); blocks are BERT-style post-norm; ``prediction_layer`` gives M·C logits per position.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn


def rename_generator_keys(state: dict) -> dict:
    """Published generator files name the input projection ``token_emb``; upstream renames it on
    load (``scripts/eval_maskbit.py``: rename_keys={"token_emb": "input_proj"}). Same here."""
    return {(k.replace("token_emb", "input_proj", 1) if k.startswith("token_emb") else k): v
            for k, v in state.items()}


class BertAttention(nn.Module):
    """Self-attention with a residual; post-norm (LayerNorm after the sum) unless ``use_prenorm``."""

    def __init__(self, dim: int, heads: int, dropout: float, use_prenorm: bool):
        super().__init__()
        self.mha = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True, bias=True)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim, eps=1e-12)
        self.use_prenorm = use_prenorm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, N+1, D] -> [B, N+1, D]."""
        y = self.norm(x) if self.use_prenorm else x
        y = self.dropout(self.mha(y, y, y, need_weights=False)[0]) + x
        return y if self.use_prenorm else self.norm(y)


class BertFeedForward(nn.Module):
    """Linear-GELU-Linear-Dropout with a residual; post-norm unless ``use_prenorm``."""

    def __init__(self, dim: int, hidden: int, dropout: float, use_prenorm: bool):
        super().__init__()
        # indices 0..3 are the state-dict names net.0 / net.2 of the published files
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim),
                                 nn.Dropout(dropout))
        self.norm = nn.LayerNorm(dim, eps=1e-12)
        self.use_prenorm = use_prenorm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, N+1, D] -> [B, N+1, D]."""
        if self.use_prenorm:
            return self.net(self.norm(x)) + x
        return self.norm(self.net(x) + x)


class TransformerEncoder(nn.Module):
    """``depth`` blocks, each ``layers[i] = [BertAttention, BertFeedForward]`` (upstream's nesting)."""

    def __init__(self, dim: int, depth: int, heads: int, mlp_dim: int, dropout: float,
                 use_prenorm: bool):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList([BertAttention(dim, heads, dropout, use_prenorm),
                           BertFeedForward(dim, mlp_dim, dropout, use_prenorm)])
            for _ in range(depth))


class LFQBert(nn.Module):
    """The MaskBit generator over bit tokens; arguments as upstream's ``LFQBert`` constructor.

    ``codebook_size`` is the tokenizer's 2^bits (2^14); each of the ``codebook_splits`` groups then
    has C = 2^(bits/splits) codes and the input id C is [MASK] (``mask_token``).
    """

    def __init__(self, img_size: int = 256, hidden_dim: int = 1024, codebook_size: int = 2 ** 14,
                 codebook_splits: int = 2, depth: int = 24, heads: int = 16, mlp_dim: int = 4096,
                 dropout: float = 0.1, nclass: int = 1000, input_stride: int = 16,
                 use_prenorm: bool = False):
        super().__init__()
        bits = int(math.log2(codebook_size))
        if 2 ** bits != codebook_size or bits % codebook_splits:
            raise ValueError(f"codebook_size {codebook_size} must be 2^bits with bits divisible by "
                             f"codebook_splits {codebook_splits}")
        self.nclass = nclass
        self.drop_label = nclass                        # class_emb row of the dropped label
        self.seq_len = (img_size // input_stride) ** 2  # N
        self.splits = codebook_splits                   # M
        self.bits = bits
        self.group_bits = bits // codebook_splits
        self.group_size = 2 ** self.group_bits          # C
        self.mask_token = self.group_size
        self.hidden_dim = hidden_dim
        self.depth = depth
        self.use_prenorm = use_prenorm
        # a persistent buffer: the published files hold it (int32), so it must exist to load strictly
        self.register_buffer("bits_to_indices", (2 ** torch.arange(self.group_bits)).int())

        self.class_emb = nn.Embedding(nclass + 1, hidden_dim)
        self.input_proj = nn.Linear(bits, hidden_dim)
        self.pos_emb = nn.Parameter(torch.zeros(1, self.seq_len + 1, hidden_dim))
        self.first_layer = nn.Sequential(nn.LayerNorm(hidden_dim, eps=1e-12), nn.Dropout(dropout))
        self.transformer = TransformerEncoder(hidden_dim, depth, heads, mlp_dim, dropout, use_prenorm)
        if use_prenorm:
            self.norm_after_transformer = nn.LayerNorm(hidden_dim, eps=1e-12)
        self.last_layer = nn.Sequential(nn.Linear(hidden_dim, hidden_dim), nn.GELU(),
                                        nn.LayerNorm(hidden_dim, eps=1e-12))
        self.prediction_layer = nn.Linear(hidden_dim, codebook_splits * self.group_size)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Upstream's initialisation: truncated normal (std 0.02) weights, zero biases, unit norms."""
        nn.init.trunc_normal_(self.pos_emb, 0.0, 0.02, generator=generator)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(m.weight, 0.0, 0.02, generator=generator)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.LayerNorm):
                m.weight.fill_(1.0)
                m.bias.zero_()

    def token_bits(self, img_tokens: torch.Tensor) -> torch.Tensor:
        """Group ids [B, N, M] (mask_token allowed) -> bits [B, N, M·bits/M] in {−1, 0, +1}, LSB first."""
        on = (img_tokens[..., None].int() & self.bits_to_indices) != 0
        bits = on.float() * 2.0 - 1.0
        bits = bits.masked_fill((img_tokens == self.mask_token)[..., None], 0.0)
        return bits.flatten(-2)

    def forward_bits(self, bits: torch.Tensor, labels: torch.Tensor, layers: Sequence[int] = ()
                     ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """bits [B, N, bits] (expected ±1 bits allowed), class ids [B] (``nclass`` = dropped)
        -> logits [B, N, M, C] and the hidden states [B, N, D] after each block in ``layers``."""
        wanted = {i % self.depth for i in layers}
        x = torch.cat([self.input_proj(bits), self.class_emb(labels.view(-1, 1))], dim=1)
        x = self.first_layer(x + self.pos_emb)
        hidden = {}
        for i, (attn, ffn) in enumerate(self.transformer.layers):
            x = ffn(attn(x))
            if i in wanted:
                hidden[i] = x[:, :self.seq_len]        # the class token is not an image position
        if self.use_prenorm:
            x = self.norm_after_transformer(x)
        logits = self.prediction_layer(self.last_layer(x))[:, :self.seq_len]
        logits = logits.unflatten(-1, (self.splits, self.group_size))
        return logits, [hidden[i % self.depth] for i in layers]

    def forward(self, img_tokens: torch.Tensor, class_labels: torch.Tensor,
                drop_label_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Upstream's call: ids [B, N, M], labels [B], optional drop mask [B] -> logits [B, N, M, C].

        Unlike upstream, ``class_labels`` is never written to, and no mask means no label is dropped
        (upstream's ``labels[None] = drop`` with a None mask drops every label).
        """
        labels = class_labels.view(-1)
        if drop_label_mask is not None:
            labels = torch.where(drop_label_mask.view(-1), torch.full_like(labels, self.drop_label),
                                 labels)
        return self.forward_bits(self.token_bits(img_tokens), labels)[0]
