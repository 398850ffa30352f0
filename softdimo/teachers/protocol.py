"""The teacher protocol: the one boundary every masked-diffusion teacher crosses (ARCHITECTURE §3).

Shapes: B batch, L token positions, V codes per position (the codebook), D input-embedding width,
H×W image size. Logits are [B, L, V], or [B, L, V + 1] where the family keeps a [MASK] output
column (MaskGit, Table 5); ``embed_probs`` and ``decode_probs`` take either width. Images are float in [0, 1], [B, 3, H, W].

A condition ``cond`` is one tensor whose first dimension is the batch (class ids [B] for
class-to-image, text features [B, T, C] for text-to-image), so that CFG can concatenate a
conditional and a null batch with ``torch.cat``.

The student θ and the auxiliary ψ are copies of the teacher's backbone (``adapter.backbone``); every
network call goes through ``forward_embeddings(net, ...)`` so that the trainer never needs to know
which family it is distilling.
"""
from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class Teacher(Protocol):
    V: int                      # output classes per position (codebook size)
    mask_id: int                # input id of [MASK]
    seq_len: int                # L
    token_shape: tuple          # e.g. (64,) for an 8×8 grid
    conditioning: str           # "class" | "text"
    depth: int                  # number of backbone blocks (layers the discriminator can tap)
    hidden_width: int           # D_h, the width of the hidden states returned as features
    feature_len: int            # positions in those hidden states (= L unless the backbone resamples)
    num_classes: int            # class teachers: labels are 0..num_classes-1 (text teachers: 0)
    image_size: int             # decoded images are [B, 3, image_size, image_size]
    sampling: dict              # the published sampler defaults: steps, cfg, temperature, randomize
    backbone: nn.Module         # the frozen teacher φ

    def make_student(self) -> nn.Module:
        """A trainable copy of the backbone (θ or ψ) with its input-embedding layer frozen."""

    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, L] (mask id allowed) -> the teacher's input embeddings [B, L, D]."""

    def embed_probs(self, p: torch.Tensor) -> torch.Tensor:
        """p [B, L, V] -> Emb_φ = E^T p, [B, L, D] (Eq. 3)."""

    def mask_embedding(self) -> torch.Tensor:
        """The input embedding of [MASK], [D]."""

    def forward_embeddings(self, net: nn.Module, e: torch.Tensor, cond: torch.Tensor,
                           layers: Sequence[int] = ()) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run ``net`` (φ, θ or ψ) from input embeddings e [B, L, D].

        Returns logits [B, L, V] (or [B, L, V + 1] with a mask column) and the hidden states [B, feature_len, D_h] after each block in
        ``layers`` (negative indices count from the last block).
        """

    def encode_condition(self, labels: torch.Tensor | None = None,
                         prompts: Sequence[str] | None = None) -> torch.Tensor:
        """Class ids [B] or prompts (B strings) -> the condition tensor the backbone takes."""

    def null_condition(self, batch: int) -> torch.Tensor:
        """The unconditional input for CFG, batch-shaped like ``encode_condition``'s output."""

    def decode_ids(self, ids: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Hard tokens [B, L] (codes < V) -> images [B, 3, H, W] in [0, 1].

        ``cond`` is the batch's condition; only text-guided decoders (TA-TiTok) read it, and the
        trainer passes it wherever it has one."""

    def decode_probs(self, p: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Dec ∘ Emb_Dec: probabilities [B, L, V] -> images [B, 3, H, W] in [0, 1], differentiable."""

    def sample(self, cond: torch.Tensor, steps: int, cfg: float, generator: torch.Generator,
               temperature: float = 1.0, randomize: float = 4.5) -> torch.Tensor:
        """The teacher's own multi-step sampler -> tokens [B, L]."""
