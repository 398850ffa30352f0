"""Differentiable reward loss (Eq. 9) and the total generator loss (Eq. 10)."""
from __future__ import annotations

from collections.abc import Mapping

import torch


def reward_loss(scores: Mapping[str, torch.Tensor], weights: Mapping[str, float]) -> torch.Tensor:
    """Eq. 9: −Σ_i λ_i · mean_b R_i, over the names in ``weights`` (scores [B] per name).

    Scores that have no weight are ignored; a name with a non-zero weight but no score raises
    ValueError. Names with weight 0 need no score.
    """
    total: torch.Tensor | None = None
    for name, lam in weights.items():
        if lam == 0:
            continue
        if name not in scores:
            raise ValueError(f"reward {name!r} has weight {lam} but no score was computed "
                             f"(scores: {sorted(scores)})")
        term = -float(lam) * scores[name].float().mean()
        total = term if total is None else total + term
    if total is None:
        device = next(iter(scores.values())).device if scores else "cpu"
        return torch.zeros((), device=device)
    return total


def total_loss(dimo: torch.Tensor, gan: torch.Tensor | None = None,
               reward: torch.Tensor | None = None, w_gan: float = 0.0,
               w_reward: float = 0.0) -> torch.Tensor:
    """Eq. 10: L_DiMO + w_GAN·L_GAN + w_reward·L_reward; a None term or a zero weight is skipped."""
    total = dimo
    if gan is not None and w_gan != 0:
        total = total + w_gan * gan
    if reward is not None and w_reward != 0:
        total = total + w_reward * reward
    return total
