"""Soft embeddings (Eq. 3) and the Gumbel-softmax straight-through alternative (App. E, H.4).

Shapes: B batch, L token positions, V vocabulary (codes per position), D embedding width.
The soft embedding of logits z is the expected token embedding under softmax(z/τ):
    Emb(z) = E^T softmax(z/τ),  E = table [V, D].
It is deterministic and fully differentiable in z; Gumbel-ST is kept only as an ablation. This module
gives the probabilities (``relaxed_probs``); each teacher's ``embed_probs`` multiplies them with its table.
"""
from __future__ import annotations

import torch

from softdimo.math import EMBEDDING_KINDS


def soft_probs(z: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """softmax(z/τ) over the last axis, [..., V] -> [..., V]."""
    return torch.softmax(z / tau, dim=-1)


def gumbel_noise(shape: torch.Size | tuple[int, ...], generator: torch.Generator,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """Standard Gumbel noise g = −log(−log U), float32, from an explicit generator.

    Drawn on the generator's device and then moved, so a CPU generator can serve CUDA tensors
    and a seed gives the same noise whatever ``device`` is.
    """
    u = torch.rand(shape, generator=generator, device=generator.device, dtype=torch.float32)
    # U = 0 would give g = −inf; U < 1 always, so −log U > 0 and the outer log is finite.
    u = u.clamp_min(torch.finfo(torch.float32).tiny)
    return (-torch.log(-torch.log(u))).to(device)


def gumbel_st_probs(z: torch.Tensor, tau: float, generator: torch.Generator) -> torch.Tensor:
    """Straight-through Gumbel-softmax, [B, L, V] -> [B, L, V].

    Forward: the exact one-hot of argmax(z + g). Backward: the gradient of softmax((z + g)/τ).
    Written as hard + (soft − sg(soft)) rather than hard − sg(soft) + soft so that the forward value
    is bitwise one-hot (x − x = 0 exactly, whereas (1 − s) + s need not round back to 1).
    The noise comes from ``generator``, not the global RNG that F.gumbel_softmax uses.
    """
    g = gumbel_noise(z.shape, generator, device=z.device).to(z.dtype)
    y_soft = torch.softmax((z + g) / tau, dim=-1)
    index = y_soft.argmax(dim=-1, keepdim=True)
    y_hard = torch.zeros_like(y_soft).scatter_(-1, index, 1.0)
    return y_hard + (y_soft - y_soft.detach())


def relaxed_probs(z: torch.Tensor, kind: str, tau: float = 1.0,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """The probabilities [B, L, V] that a soft embedding averages the table with.

    kind "soft": softmax(z/τ) (the paper's method); "gumbel_st": straight-through Gumbel, which
    needs ``generator``.
    """
    if kind == "soft":
        return soft_probs(z, tau)
    if kind == "gumbel_st":
        if generator is None:
            raise ValueError("relaxation 'gumbel_st' needs an explicit torch.Generator")
        return gumbel_st_probs(z, tau, generator)
    raise ValueError(f"unknown relaxation {kind!r}; expected one of {EMBEDDING_KINDS}")
