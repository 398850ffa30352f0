"""softdimo.math.soft_embedding: Eq. 3, its gradient, and straight-through Gumbel."""
import pytest
import torch

from softdimo.math.soft_embedding import gumbel_noise, gumbel_st_probs, relaxed_probs, soft_probs

B, L, V, D = 2, 5, 7, 3


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=gen(seed), dtype=dtype)


def soft_embedding(z, table, tau=1.0):
    """Eq. 3 as the trainer computes it: relaxed_probs (kind "soft"), then the teacher's
    ``embed_probs`` p @ E over the table [V, D]."""
    return relaxed_probs(z, "soft", tau) @ table


def test_soft_probs_is_tempered_softmax():
    z = randn(B, L, V)
    p = soft_probs(z, 0.5)
    assert torch.allclose(p, torch.exp(2 * z) / torch.exp(2 * z).sum(-1, keepdim=True))
    assert torch.allclose(p.sum(-1), torch.ones(B, L, dtype=z.dtype))


@pytest.mark.parametrize("tau", [1.0, 0.3])
def test_soft_embedding_is_expected_embedding(tau):
    z, table = randn(B, L, V, seed=1), randn(V, D, seed=2)
    e = soft_embedding(z, table, tau)
    assert e.shape == (B, L, D)
    p = torch.softmax(z / tau, -1)
    expected = torch.stack([sum(p[b, i, j] * table[j] for j in range(V))
                            for b in range(B) for i in range(L)]).reshape(B, L, D)
    assert torch.allclose(e, expected)


@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_soft_embedding_gradient_matches_closed_form(tau):
    z = randn(B, L, V, seed=3).requires_grad_(True)
    table, upstream = randn(V, D, seed=4), randn(B, L, D, seed=5)
    (soft_embedding(z, table, tau) * upstream).sum().backward()
    # ∂/∂z_v ⟨G, E^T p⟩ = (1/τ)·p_v·(⟨E_v, G⟩ − Σ_j p_j ⟨E_j, G⟩)
    p = torch.softmax(z.detach() / tau, -1)
    s = upstream @ table.T                                      # [B, L, V]: ⟨E_v, G⟩
    expected = p * (s - (p * s).sum(-1, keepdim=True)) / tau
    assert torch.allclose(z.grad, expected)


def test_one_hot_logits_at_low_tau_give_hard_embeddings():
    ids = torch.randint(0, V, (B, L), generator=gen(6))
    z = 10.0 * torch.nn.functional.one_hot(ids, V).to(torch.float32)
    table = randn(V, D, seed=7, dtype=torch.float32)
    assert torch.allclose(soft_embedding(z, table, tau=0.01), table[ids], atol=1e-6)


def test_gumbel_st_forward_is_exact_one_hot():
    z = randn(B, L, V, seed=10, dtype=torch.float32)
    y = gumbel_st_probs(z, 0.7, gen(11))
    g = gumbel_noise(z.shape, gen(11))
    hard = torch.nn.functional.one_hot((z + g).argmax(-1), V).to(z.dtype)
    assert torch.equal(y, hard)


def test_gumbel_st_backward_is_softmax_gradient():
    tau = 0.7
    z = randn(B, L, V, seed=12, dtype=torch.float32).requires_grad_(True)
    upstream = randn(B, L, V, seed=13, dtype=torch.float32)
    (gumbel_st_probs(z, tau, gen(14)) * upstream).sum().backward()
    z2 = z.detach().clone().requires_grad_(True)
    g = gumbel_noise(z.shape, gen(14))
    (torch.softmax((z2 + g) / tau, -1) * upstream).sum().backward()
    assert torch.allclose(z.grad, z2.grad, atol=1e-7)
    assert z.grad.abs().sum() > 0


def test_gumbel_st_is_deterministic_and_seed_dependent():
    z = randn(4, 16, V, seed=15, dtype=torch.float32)
    a, b = gumbel_st_probs(z, 1.0, gen(16)), gumbel_st_probs(z, 1.0, gen(16))
    assert torch.equal(a, b)
    assert not torch.equal(a, gumbel_st_probs(z, 1.0, gen(17)))


def test_gumbel_noise_statistics():
    g = gumbel_noise((200_000,), gen(18))
    assert torch.isfinite(g).all()
    # Standard Gumbel: mean = Euler–Mascheroni γ, variance π²/6.
    assert g.mean().item() == pytest.approx(0.5772, abs=0.01)
    assert g.var().item() == pytest.approx(torch.pi ** 2 / 6, abs=0.03)


def test_gumbel_st_argmax_frequencies_follow_softmax():
    z = torch.tensor([[[1.0, 0.0, -1.0]]]).expand(20_000, 1, 3)
    counts = gumbel_st_probs(z, 1.0, gen(19)).sum((0, 1)) / 20_000
    assert torch.allclose(counts, torch.softmax(z[0, 0], -1), atol=0.015)


def test_relaxed_probs_dispatch():
    z = randn(B, L, V, seed=20, dtype=torch.float32)
    assert torch.equal(relaxed_probs(z, "soft", 0.5), soft_probs(z, 0.5))
    assert torch.equal(relaxed_probs(z, "gumbel_st", 0.5, gen(21)), gumbel_st_probs(z, 0.5, gen(21)))
    with pytest.raises(ValueError):
        relaxed_probs(z, "gumbel_st", 0.5)
    with pytest.raises(ValueError):
        relaxed_probs(z, "hard", 0.5)
