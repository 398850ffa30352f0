"""MaskGit v1's multi-step confidence sampler (dimo.md §2.5), for teacher baselines and references.

Shapes: B batch, L token positions, K codes. Start from all-[MASK]; step s of S commits a budget of t_s
tokens (arccos schedule: few early, many late; each t_s ≥ 1, Σ t_s = L). Every masked position is
sampled from softmax(logits / temperature); its confidence is log p(sampled) plus
randomize · Gumbel · (1 − s/S); the t_s most confident masked positions are committed.

``logits_fn`` is called exactly once per step, in step order, so a caller can attach a per-step
quantity (e.g. the CFG weight ramp from ``cfg_ramp``) by iterating alongside.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

BUDGET_SCHEDULES = ("arccos", "cosine", "linear")


def token_budget(steps: int, length: int, schedule: str = "arccos") -> list[int]:
    """Tokens to commit at each of ``steps`` steps: each ≥ 1, summing to ``length`` (MaskGit ``adap_sche``).

    The share of step s grows with r_s = 1 − s/(S−1) through arccos(r)/(π/2) (cosine: cos(πr/2),
    linear: 1 − r). MaskGit's step 0 always gets 1 token because arccos(1) = 0; steps=1 gives [L].
    """
    if not 1 <= steps <= length:
        raise ValueError(f"steps must be in [1, {length}], got {steps}")
    if steps == 1:
        return [length]
    r = torch.linspace(1.0, 0.0, steps, dtype=torch.float64)
    if schedule == "arccos":
        share = torch.arccos(r) / (math.pi / 2)
    elif schedule == "cosine":
        share = torch.cos(r * math.pi / 2)
    elif schedule == "linear":
        share = 1.0 - r
    else:
        raise ValueError(f"unknown budget schedule {schedule!r}; expected one of {BUDGET_SCHEDULES}")
    budget = [max(1, int(round(float(v)))) for v in share / share.sum() * length]
    # Rounding and the ≥ 1 floor can miss the total: settle the difference on the largest budgets.
    diff = length - sum(budget)
    while diff != 0:
        i = max(range(steps), key=lambda j: (budget[j], j))
        if diff > 0:
            budget[-1] += diff
            diff = 0
        else:
            take = min(-diff, budget[i] - 1)
            budget[i] -= take
            diff += take
    return budget


def cfg_ramp(steps: int, cfg: float) -> list[float]:
    """Per-step CFG weights w_s for u + w_s·(c − u): linear from 1 to ``cfg`` (MaskGit's ramp).

    One step uses ``cfg`` itself.
    """
    if steps == 1:
        return [float(cfg)]
    return [1.0 + (cfg - 1.0) * s / (steps - 1) for s in range(steps)]


def _gumbel(shape: torch.Size, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Standard Gumbel noise drawn on the generator's device, moved to ``device``."""
    u = torch.rand(shape, generator=generator, device=generator.device, dtype=torch.float32)
    return (-torch.log(-torch.log(u.clamp(1e-10, 1.0 - 1e-7)))).to(device)


@torch.no_grad()
def maskgit_sample(logits_fn: Callable[[torch.Tensor], torch.Tensor], batch: int, seq_len: int,
                   mask_id: int, steps: int, generator: torch.Generator, temperature: float = 1.0,
                   randomize: float = 4.5, schedule: str = "arccos",
                   device: torch.device | str | None = None) -> torch.Tensor:
    """Sample tokens [B, L] (codes < K, no mask id) with ``steps`` MaskGit steps.

    logits_fn: ids [B, L] (mask id at undecided positions) -> logits [B, L, K] (CFG already applied
    or not). temperature ≤ 0 samples greedily. Deterministic for a seeded ``generator``.
    ``device`` defaults to the generator's.
    """
    device = torch.device(device) if device is not None else generator.device
    ids = torch.full((batch, seq_len), mask_id, dtype=torch.long, device=device)
    masked = torch.ones(batch, seq_len, dtype=torch.bool, device=device)
    for step, t in enumerate(token_budget(steps, seq_len, schedule)):
        logits = logits_fn(ids).float()
        if temperature > 0:
            logp = torch.log_softmax(logits / temperature, dim=-1)
            # Gumbel-max draws from softmax(logits / T) with one vectorised call on the generator.
            sampled = (logp + _gumbel(logp.shape, generator, logp.device)).argmax(-1)
        else:
            logp = torch.log_softmax(logits, dim=-1)
            sampled = logp.argmax(-1)
        conf = logp.gather(-1, sampled[..., None]).squeeze(-1)
        if randomize > 0:
            conf = conf + randomize * (1.0 - step / steps) * _gumbel(conf.shape, generator, conf.device)
        conf = conf.masked_fill(~masked, -math.inf)
        top = conf.topk(t, dim=-1).indices                      # t ≤ #masked, so only masked positions
        commit = torch.zeros_like(masked).scatter_(1, top, True)
        ids = torch.where(commit, sampled.to(ids.device), ids)
        masked &= ~commit
    return ids
