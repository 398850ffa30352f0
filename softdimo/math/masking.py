"""Masking maths: the forward mask kernel q_{t|0}, the initial distribution p_init and embedding noise.

Pure functions over tensors (B batch, L tokens, D embedding width). Randomness always comes from an
explicit ``torch.Generator`` so that runs are reproducible and resumable bit for bit.
"""
from __future__ import annotations

import math

import torch

from softdimo.math import MASK_SCHEDULES


def mask_ratio(schedule: str, s: torch.Tensor) -> torch.Tensor:
    """Map s ~ U[0, 1] to a mask ratio m (Di[M]O `get_mask_code`; arccos has mean 2/π)."""
    if schedule == "arccos":
        return torch.arccos(s) / (math.pi / 2)
    if schedule == "cosine":
        return torch.cos(math.pi * s / 2)
    if schedule == "linear":
        return s
    raise ValueError(f"unknown mask schedule {schedule!r}; expected one of {MASK_SCHEDULES}")


def sample_mask_ratio(batch: int, schedule: str, generator: torch.Generator,
                      clamp: tuple[float, float] | None = None,
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """One mask ratio per sample, [B], drawn through ``schedule`` and optionally clamped."""
    s = torch.rand(batch, generator=generator, device=device)
    m = mask_ratio(schedule, s)
    if clamp is not None:
        m = m.clamp(clamp[0], clamp[1])
    return m


def exact_count_mask(ratio: torch.Tensor, length: int, generator: torch.Generator) -> torch.Tensor:
    """Boolean mask [B, L] with exactly k_b = max(1, round(L·m_b)) True entries per row.

    Positions are the first k_b of a uniform random permutation (argsort of uniform noise), as in
    Di[M]O, unlike MaskGit v1's per-token Bernoulli masking.
    """
    batch = ratio.shape[0]
    k = torch.clamp(torch.round(ratio * length), min=1).long()
    noise = torch.rand(batch, length, generator=generator, device=ratio.device)
    rank = noise.argsort(dim=1).argsort(dim=1)
    return rank < k[:, None]


def apply_mask(ids: torch.Tensor, mask: torch.Tensor, mask_id: int) -> torch.Tensor:
    """Replace the masked positions of ids [B, L] by ``mask_id``."""
    return torch.where(mask, torch.full_like(ids, mask_id), ids)


def forward_mask(ids: torch.Tensor, schedule: str, mask_id: int, generator: torch.Generator,
                 clamp: tuple[float, float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward kernel q_{t|0}: ids [B, L] -> (x̃_t [B, L], mask [B, L] bool)."""
    ratio = sample_mask_ratio(ids.shape[0], schedule, generator, clamp, device=ids.device)
    mask = exact_count_mask(ratio, ids.shape[1], generator)
    return apply_mask(ids, mask, mask_id), mask


def draw_init_ratio(ratio: tuple[float, ...] | list[float], generator: torch.Generator) -> float:
    """r_init: a fixed value ``[a]`` or U[a, b] for ``[a, b]``, redrawn once per call (per step)."""
    if len(ratio) == 1:
        return float(ratio[0])
    a, b = float(ratio[0]), float(ratio[1])
    return a + (b - a) * float(torch.rand((), generator=generator, device=generator.device))


def sample_init(batch: int, length: int, codebook_size: int, mask_id: int, r_init: float,
                generator: torch.Generator, device: torch.device | str = "cpu") -> torch.Tensor:
    """x_init ~ p_init, [B, L]: max(1, round(L·r_init)) [MASK] positions, the rest uniform codes.

    r_init = 0 gives all random codes (no [MASK] at all).
    """
    codes = torch.randint(0, codebook_size, (batch, length), generator=generator, device=device)
    if r_init <= 0:
        return codes
    ratio = torch.full((batch,), float(r_init), device=device)
    mask = exact_count_mask(ratio, length, generator)
    return apply_mask(codes, mask, mask_id)


def embed_noise(e: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """Variance-preserving Gaussian perturbation e <- σ·n + sqrt(1 - σ²)·e of embeddings [B, L, D].

    Applied to the generator's input embeddings in training and at sampling time; σ = 0 is identity.
    """
    if sigma <= 0:
        return e
    n = torch.randn(e.shape, generator=generator, device=e.device, dtype=e.dtype)
    return sigma * n + math.sqrt(1.0 - sigma * sigma) * e
