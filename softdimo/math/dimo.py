"""The Di[M]O generator loss: CFG, divergence logit-gradients, the surrogate, ψ's loss, the masked
KL that monitors ψ against the teacher, and the total generator loss (Eq. 10).

Shapes: B batch, L token positions, V vocabulary. Follows the public Di[M]O code
(reference/dimo.md §4-§5): the gradient of a divergence between teacher p = softmax(l_φ/T_φ) and
auxiliary q = softmax(ℓ/T_ψ) with respect to ψ's logits on x̃_t is computed in closed form and
written onto the student's logits z_θ at the masked positions of x̃_t.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from softdimo.math import DIVERGENCES


def cfg_combine(uncond: torch.Tensor, cond: torch.Tensor, w: float | torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance in the Di[M]O convention: u + w·(c − u).

    w may be a float or a tensor broadcastable to the logits (e.g. a per-sample [B, 1, 1] scale).
    A float w = 1 returns ``cond`` itself (u + (c − u) would round), as a single conditional pass.
    """
    if not isinstance(w, torch.Tensor) and w == 1:
        return cond
    return uncond + w * (cond - uncond)


def divergence_grad(teacher_logits: torch.Tensor, aux_logits: torch.Tensor, divergence: str,
                    beta: float = 0.0, teacher_temp: float = 1.0,
                    aux_temp: float = 1.0) -> torch.Tensor:
    """Closed-form gradient g [B, L, V] (float32) of a divergence with respect to ψ's logits.

    With p = softmax(l_φ/T_φ) and q = softmax(ℓ/T_ψ), per position:
      fkl:      KL(p‖q)  -> g_F = q − p
      rkl:      KL(q‖p)  -> g_R = q ⊙ (log q − log p − KL(q‖p))
      jeffreys: (1 − β)·g_F + β·g_R  (β may be negative; Di[M]O's "Jeffreys_-0.2" is β = −0.2)
    As in Di[M]O, g is the gradient with respect to the tempered logits ℓ/T_ψ (no 1/T_ψ factor);
    with the default temperatures of 1 it is the gradient with respect to ℓ itself.
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; expected one of {DIVERGENCES}")
    if teacher_logits.shape != aux_logits.shape:
        raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} and auxiliary logits "
                         f"{tuple(aux_logits.shape)} differ in shape")
    log_p = F.log_softmax(teacher_logits.float() / teacher_temp, dim=-1)
    log_q = F.log_softmax(aux_logits.float() / aux_temp, dim=-1)
    q = log_q.exp()
    g_fkl = q - log_p.exp()
    if divergence == "fkl":
        return g_fkl
    # Classes with q = 0 contribute nothing to KL(q‖p); masking them avoids 0·(−inf) = NaN.
    weighted = torch.where(q > 0, q * (log_q - log_p), torch.zeros_like(q))
    rkl = weighted.sum(dim=-1, keepdim=True)
    g_rkl = weighted - q * rkl
    if divergence == "rkl":
        return g_rkl
    return (1.0 - beta) * g_fkl + beta * g_rkl


def dimo_surrogate(z: torch.Tensor, g: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Surrogate loss whose gradient injects g into the student logits z [B, L, V].

    g [B, L, V] is kept at the masked positions of x̃_t only (mask [B, L] bool), NaN/±inf -> 0, and
    detached. Di[M]O writes the loss as ½·Σ(z − sg(z − g))²/B; here it is the equivalent
    ⟨z, sg(g)/B⟩ − sg(⟨z, g/B⟩) + ½‖g‖²/B, which has the same value (½‖g‖²/B, not a divergence
    estimate) and whose gradient is g·mask/B bitwise, where z − (z − g) would round.
    """
    batch = z.shape[0]
    g = torch.where(mask[..., None], g.detach().float(), torch.zeros((), device=g.device))
    g = torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)
    g_over_b = g / batch
    inner = (z.float() * g_over_b).sum()
    return inner - inner.detach() + 0.5 * (g * g_over_b).sum()


def aux_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
             label_smoothing: float = 0.1) -> torch.Tensor:
    """ψ's loss: label-smoothed cross-entropy of logits [B, L, V] against targets [B, L] (long).

    Only positions with mask [B, L] True count; the mean is over masked tokens of the whole batch
    (0 when nothing is masked, instead of NaN).
    """
    vocab = logits.shape[-1]
    m = mask.reshape(-1)
    # Unmasked targets are ignored, so they may hold any id (even one outside [0, V)).
    target = torch.where(m, targets.reshape(-1), torch.full_like(m, -100, dtype=targets.dtype))
    per_token = F.cross_entropy(logits.reshape(-1, vocab).float(), target, ignore_index=-100,
                                reduction="none", label_smoothing=label_smoothing)
    return per_token.sum() / m.sum().clamp_min(1)


def masked_kl(l_phi: torch.Tensor, l_psi: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean FKL(p_φ ‖ p_ψ) over masked positions: how far ψ (≈ student) is from the teacher."""
    log_p, log_q = torch.log_softmax(l_phi, -1), torch.log_softmax(l_psi, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    return kl[mask].mean() if mask.any() else kl.new_zeros(())


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
