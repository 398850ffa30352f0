"""Differentiable reward loss (Eq. 9) and the type of the reward functions it scores."""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

# images [B, 3, H, W] in [0, 1] and their prompts -> one score per image, [B]
RewardFn = Callable[[torch.Tensor, Sequence[str]], torch.Tensor]


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

