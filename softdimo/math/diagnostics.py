"""Logged diagnostics of the generator output: concentration of the logits and soft-vs-hard decode.

Shapes: B batch, L token positions, V vocabulary. All values are detached scalars (float32).
Concentrated logits (low entropy, top-1 near 1) are what makes the soft embedding faithful (§3.1.3).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def mean_entropy(z: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Mean over the B·L positions of H(softmax(z/τ)) in nats; z [B, L, V] -> scalar."""
    log_p = F.log_softmax(z.float() / tau, dim=-1)
    p = log_p.exp()
    # 0·log 0 = 0 (log_p may be −inf where a logit is −inf).
    plogp = torch.where(p > 0, p * log_p, torch.zeros_like(p))
    return -plogp.sum(dim=-1).mean()


@torch.no_grad()
def mean_top1(z: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Mean over positions of the largest probability of softmax(z/τ); z [B, L, V] -> scalar."""
    return torch.softmax(z.float() / tau, dim=-1).amax(dim=-1).mean()


@torch.no_grad()
def decode_mse(images_soft: torch.Tensor, images_hard: torch.Tensor) -> torch.Tensor:
    """MSE between images decoded from soft embeddings and from sampled tokens (App. I.2)."""
    return F.mse_loss(images_soft.float(), images_hard.float())
