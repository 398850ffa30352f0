"""softdimo.math.masking: schedules, exact-count masks, p_init and embedding noise."""
import math

import pytest
import torch

from softdimo.math import masking


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_exact_count_mask_counts():
    ratio = torch.tensor([0.0, 0.001, 0.1, 0.37, 0.5, 0.99, 1.0])
    mask = masking.exact_count_mask(ratio, 64, gen())
    assert mask.shape == (7, 64) and mask.dtype == torch.bool
    expected = torch.clamp(torch.round(ratio * 64), min=1).long()
    assert torch.equal(mask.sum(1), expected)
    assert expected.tolist() == [1, 1, 6, 24, 32, 63, 64]


def test_exact_count_mask_positions_are_uniform():
    ratio = torch.full((20000,), 0.25)
    mask = masking.exact_count_mask(ratio, 8, gen(1))
    assert torch.equal(mask.sum(1), torch.full((20000,), 2))
    # Each position is masked with probability 2/8; 4σ of a binomial mean is ≈ 0.012.
    assert torch.allclose(mask.float().mean(0), torch.full((8,), 0.25), atol=0.015)


def test_arccos_mean_is_two_over_pi():
    m = masking.sample_mask_ratio(200_000, "arccos", gen(2))
    assert abs(m.mean().item() - 2 / math.pi) < 0.01
    assert m.min() >= 0 and m.max() <= 1


def test_schedules_closed_forms():
    s = torch.linspace(0, 1, 11)
    assert torch.allclose(masking.mask_ratio("linear", s), s)
    assert torch.allclose(masking.mask_ratio("cosine", s), torch.cos(math.pi * s / 2))
    assert torch.allclose(masking.mask_ratio("arccos", s), torch.arccos(s) * 2 / math.pi)
    assert masking.mask_ratio("arccos", torch.tensor(0.0)).item() == pytest.approx(1.0)
    with pytest.raises(ValueError):
        masking.mask_ratio("square", s)


def test_sample_mask_ratio_clamp():
    m = masking.sample_mask_ratio(10_000, "linear", gen(3), clamp=(0.2, 0.7))
    assert m.min().item() == pytest.approx(0.2) and m.max().item() == pytest.approx(0.7)
    assert ((m > 0.2) & (m < 0.7)).any()


def test_forward_mask_replaces_masked_positions_only():
    ids = torch.randint(0, 128, (16, 64), generator=gen(4))
    x_t, mask = masking.forward_mask(ids, "arccos", 128, gen(5))
    assert torch.equal(x_t[mask], torch.full((int(mask.sum()),), 128))
    assert torch.equal(x_t[~mask], ids[~mask])
    assert (mask.sum(1) >= 1).all()


@pytest.mark.parametrize("r_init", [0.0, 0.25, 0.6, 1.0])
def test_sample_init_counts(r_init):
    x = masking.sample_init(32, 64, 128, 128, r_init, gen(6))
    n_mask = (x == 128).sum(1)
    assert torch.equal(n_mask, torch.full((32,), round(64 * r_init)))
    other = x[x != 128]
    assert other.numel() == 0 or (other.min() >= 0 and other.max() < 128)


def test_sample_init_is_deterministic():
    assert torch.equal(masking.sample_init(4, 64, 128, 128, 0.6, gen(7)),
                       masking.sample_init(4, 64, 128, 128, 0.6, gen(7)))


def test_draw_init_ratio():
    assert masking.draw_init_ratio([0.6], gen()) == 0.6
    g = gen(8)
    draws = [masking.draw_init_ratio([0.1, 0.9], g) for _ in range(500)]
    assert all(0.1 <= d <= 0.9 for d in draws)
    assert min(draws) < 0.2 and max(draws) > 0.8


def test_embed_noise_identity_at_zero_sigma():
    e = torch.randn(2, 64, 16, generator=gen(9))
    assert torch.equal(masking.embed_noise(e, 0.0, gen()), e)


def test_embed_noise_preserves_unit_variance():
    e = torch.randn(64, 64, 16, generator=gen(10))
    out = masking.embed_noise(e, 0.3, gen(11))
    assert abs(out.var().item() - 1.0) < 0.02
    # Correlation with the input is sqrt(1 − σ²).
    corr = torch.corrcoef(torch.stack([e.flatten(), out.flatten()]))[0, 1].item()
    assert corr == pytest.approx(math.sqrt(1 - 0.09), abs=0.01)
