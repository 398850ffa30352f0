"""softdimo.math.gan: augmentation masks, masked embeddings, discriminator and generator losses."""
import math

import pytest
import torch
import torch.nn.functional as F

from softdimo.math.gan import discriminator_loss, gan_mask, generator_gan_loss, mask_embeddings


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_gan_mask_counts_and_range():
    mask, r = gan_mask(2000, 64, (0.0, 0.5), gen())
    assert mask.shape == (2000, 64) and mask.dtype == torch.bool and r.shape == (2000,)
    assert r.min() >= 0.0 and r.max() <= 0.5
    assert torch.equal(mask.sum(1), torch.round(r * 64).long())
    assert (mask.sum(1) == 0).any() and mask.sum(1).max() == 32
    assert r.mean().item() == pytest.approx(0.25, abs=0.02)


def test_gan_mask_zero_range_masks_nothing():
    mask, r = gan_mask(8, 64, (0.0, 0.0), gen(1))
    assert not mask.any() and torch.equal(r, torch.zeros(8))


def test_gan_mask_full_range_end():
    mask, _ = gan_mask(4, 64, [1.0, 1.0], gen(2))
    assert mask.all()


def test_gan_mask_is_deterministic_and_validates():
    a, b = gan_mask(4, 16, (0.0, 0.95), gen(3)), gan_mask(4, 16, (0.0, 0.95), gen(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError):
        gan_mask(4, 16, (0.6, 0.2), gen())


def test_same_mask_reused_for_real_and_fake():
    D = 5
    mask, _ = gan_mask(3, 10, (0.2, 0.8), gen(4))
    mask_emb = torch.randn(D, generator=gen(5))
    real = mask_embeddings(torch.randn(3, 10, D, generator=gen(6)), mask, mask_emb)
    fake = mask_embeddings(torch.randn(3, 10, D, generator=gen(7)), mask, mask_emb)
    assert torch.equal(real[mask], fake[mask])
    assert torch.equal(real[mask], mask_emb.expand(int(mask.sum()), D))


def test_mask_embeddings_values_and_gradient():
    D = 4
    e = torch.randn(2, 6, D, generator=gen(8), requires_grad=True)
    mask = torch.tensor([[True, False, False, True, False, False],
                         [False, False, False, False, False, True]])
    mask_emb = torch.randn(D, generator=gen(9))
    out = mask_embeddings(e, mask, mask_emb)
    assert torch.equal(out[~mask], e.detach()[~mask])
    assert torch.equal(out[mask], mask_emb.expand(int(mask.sum()), D))
    out.sum().backward()
    assert torch.equal(e.grad, (~mask)[..., None].float().expand(2, 6, D))


def test_discriminator_loss_closed_forms():
    zeros = torch.zeros(7)
    assert discriminator_loss(zeros, zeros).item() == pytest.approx(2 * math.log(2))
    real, fake = torch.tensor([2.0, -1.0]), torch.tensor([0.5, 3.0])
    expected = (-torch.log(torch.sigmoid(real))).mean() - torch.log(1 - torch.sigmoid(fake)).mean()
    assert torch.allclose(discriminator_loss(real, fake), expected)
    # Confident and correct discriminator: loss near 0.
    assert discriminator_loss(torch.full((3,), 30.0), torch.full((3,), -30.0)).item() < 1e-12


def test_generator_gan_loss_closed_form_and_non_saturating_gradient():
    assert generator_gan_loss(torch.zeros(5)).item() == pytest.approx(math.log(2))
    fake = torch.tensor([-20.0, 0.0, 1.5], requires_grad=True)
    loss = generator_gan_loss(fake)
    assert torch.allclose(loss, (-torch.log(torch.sigmoid(fake.detach()))).mean())
    loss.backward()
    # ∂/∂x softplus(−x) = −σ(−x): stays near −1/B where D confidently rejects (non-saturating).
    assert torch.allclose(fake.grad, -torch.sigmoid(-fake.detach()) / 3)
    assert fake.grad[0].item() == pytest.approx(-1 / 3, rel=1e-6)


def test_losses_match_bce_with_logits():
    real, fake = torch.randn(9, generator=gen(10)), torch.randn(9, generator=gen(11))
    bce = (F.binary_cross_entropy_with_logits(real, torch.ones(9))
           + F.binary_cross_entropy_with_logits(fake, torch.zeros(9)))
    assert torch.allclose(discriminator_loss(real, fake), bce)
    assert torch.allclose(generator_gan_loss(fake),
                          F.binary_cross_entropy_with_logits(fake, torch.ones(9)))
