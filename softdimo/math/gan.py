"""GAN on the frozen teacher's features: masked-embedding augmentation and the losses (Eq. 7-8).

Shapes: B batch, L token positions, D embedding width. The discriminator D_η sees embedding
sequences in which a random fraction r ~ p_{r_GAN} = U[a, b] of positions is replaced by the [MASK]
embedding; the same mask is applied to the real and the fake batch (App. H.3).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def gan_mask(batch: int, length: int, mask_range: tuple[float, float] | list[float],
             generator: torch.Generator,
             device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """r ~ U[a, b] per sample and a mask [B, L] bool with exactly round(L·r) True entries.

    Unlike the Di[M]O forward kernel a count of zero is allowed, so (0, 0) disables augmentation.
    Returns (mask [B, L], r [B] float32). Pass the same mask to the real and the fake branch.
    """
    a, b = float(mask_range[0]), float(mask_range[1])
    if not 0.0 <= a <= b <= 1.0:
        raise ValueError(f"mask_range must satisfy 0 <= a <= b <= 1, got {mask_range!r}")
    # Drawn on the generator's device, then moved: a seed gives the same mask on any device.
    r = a + (b - a) * torch.rand(batch, generator=generator, device=generator.device)
    k = torch.round(r * length).long()
    noise = torch.rand(batch, length, generator=generator, device=generator.device)
    rank = noise.argsort(dim=1).argsort(dim=1)
    return (rank < k[:, None]).to(device), r.to(device)


def mask_embeddings(e: torch.Tensor, mask: torch.Tensor, mask_emb: torch.Tensor) -> torch.Tensor:
    """Replace the rows of e [B, L, D] where mask [B, L] is True by mask_emb [D].

    Gradients still reach e at the unmasked positions (and mask_emb, were it trainable).
    """
    return torch.where(mask[..., None], mask_emb.to(e.dtype).expand_as(e), e)


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """−Eq. 7, minimised by η: E[−log σ(D_real)] + E[−log(1 − σ(D_fake))], logits [B] each."""
    return F.softplus(-real_logits.float()).mean() + F.softplus(fake_logits.float()).mean()


def generator_gan_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Eq. 8, the non-saturating generator loss E[−log σ(D_fake)], logits [B]."""
    return F.softplus(-fake_logits.float()).mean()
