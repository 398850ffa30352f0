"""softdimo.math.dimo: CFG, divergence gradients against autograd, surrogate gradient, ψ's loss."""
import pytest
import torch
import torch.nn.functional as F

from softdimo.math.dimo import aux_loss, cfg_combine, dimo_surrogate, divergence_grad

B, L, V = 3, 6, 11


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed=0, dtype=torch.float64, scale=2.0):
    return scale * torch.randn(*shape, generator=gen(seed), dtype=dtype)


def kl(log_a, log_b):
    """Σ_v a_v (log a_v − log b_v) per position."""
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def autograd_of(divergence_fn, teacher, aux, teacher_temp=1.0, aux_temp=1.0):
    """Gradient of Σ_positions divergence(p, softmax(u)) with respect to u = ℓ/T_ψ."""
    u = (aux / aux_temp).detach().requires_grad_(True)
    log_p = F.log_softmax(teacher / teacher_temp, -1)
    divergence_fn(log_p, F.log_softmax(u, -1)).sum().backward()
    return u.grad.float()


def test_cfg_combine():
    u, c = randn(B, L, V, seed=1), randn(B, L, V, seed=2)
    assert torch.equal(cfg_combine(u, c, 1.0), c)
    assert torch.allclose(cfg_combine(u, c, 2.0), 2 * c - u)
    assert torch.allclose(cfg_combine(u, c, 0.0), u)


def test_fkl_is_autograd_of_kl_p_q():
    t, a = randn(B, L, V, seed=3), randn(B, L, V, seed=4)
    g = divergence_grad(t, a, "fkl")
    assert g.dtype == torch.float32 and g.shape == (B, L, V)
    expected = autograd_of(lambda lp, lq: kl(lp, lq), t, a)
    assert torch.allclose(g, expected, atol=1e-6)
    assert torch.allclose(g, torch.softmax(a, -1).float() - torch.softmax(t, -1).float(), atol=1e-6)


def test_rkl_is_autograd_of_kl_q_p():
    t, a = randn(B, L, V, seed=5), randn(B, L, V, seed=6)
    g = divergence_grad(t, a, "rkl")
    expected = autograd_of(lambda lp, lq: kl(lq, lp), t, a)
    assert torch.allclose(g, expected, atol=1e-6)
    # Gradients of a function of softmax sum to zero over the vocabulary.
    assert torch.allclose(g.sum(-1), torch.zeros(B, L), atol=1e-6)


@pytest.mark.parametrize("beta", [0.5, -0.2, 1.3])
def test_jeffreys_is_affine_mix(beta):
    t, a = randn(B, L, V, seed=7), randn(B, L, V, seed=8)
    g = divergence_grad(t, a, "jeffreys", beta=beta)
    mix = (1 - beta) * divergence_grad(t, a, "fkl") + beta * divergence_grad(t, a, "rkl")
    assert torch.allclose(g, mix, atol=1e-7)
    expected = autograd_of(lambda lp, lq: (1 - beta) * kl(lp, lq) + beta * kl(lq, lp), t, a)
    assert torch.allclose(g, expected, atol=1e-6)


def test_jeffreys_end_points():
    t, a = randn(B, L, V, seed=9), randn(B, L, V, seed=10)
    assert torch.allclose(divergence_grad(t, a, "jeffreys", beta=0.0), divergence_grad(t, a, "fkl"))
    assert torch.allclose(divergence_grad(t, a, "jeffreys", beta=1.0), divergence_grad(t, a, "rkl"))


@pytest.mark.parametrize("divergence", ["fkl", "rkl"])
def test_temperatures(divergence):
    t, a = randn(B, L, V, seed=11), randn(B, L, V, seed=12)
    g = divergence_grad(t, a, divergence, teacher_temp=2.0, aux_temp=0.5)
    fn = (lambda lp, lq: kl(lp, lq)) if divergence == "fkl" else (lambda lp, lq: kl(lq, lp))
    # Di[M]O convention: the gradient with respect to the tempered logits ℓ/T_ψ.
    assert torch.allclose(g, autograd_of(fn, t, a, teacher_temp=2.0, aux_temp=0.5), atol=1e-6)
    if divergence == "fkl":
        expected = torch.softmax(a / 0.5, -1) - torch.softmax(t / 2.0, -1)
        assert torch.allclose(g, expected.float(), atol=1e-6)


def test_identical_distributions_give_zero_gradient():
    a = randn(B, L, V, seed=13)
    for divergence in ("fkl", "rkl", "jeffreys"):
        assert torch.allclose(divergence_grad(a, a, divergence, beta=-0.2),
                              torch.zeros(B, L, V), atol=1e-7)


def test_divergence_grad_is_finite_for_extreme_logits():
    t = torch.full((1, 1, V), -1e4)
    t[..., 0] = 1e4
    a = torch.zeros(1, 1, V)
    a[..., 1] = 1e4
    for divergence in ("fkl", "rkl", "jeffreys"):
        assert torch.isfinite(divergence_grad(t, a, divergence, beta=0.5)).all()


def test_divergence_grad_accepts_bf16_and_returns_float32():
    t, a = randn(B, L, V, seed=14).bfloat16(), randn(B, L, V, seed=15).bfloat16()
    g = divergence_grad(t, a, "jeffreys", beta=-0.2)
    assert g.dtype == torch.float32
    assert torch.allclose(g, divergence_grad(t.float(), a.float(), "jeffreys", beta=-0.2))


def test_divergence_grad_errors():
    t = randn(B, L, V)
    with pytest.raises(ValueError):
        divergence_grad(t, t, "tvd")
    with pytest.raises(ValueError):
        divergence_grad(t, t[..., :-1], "fkl")


def random_mask(seed: int) -> torch.Tensor:
    mask = torch.rand(B, L, generator=gen(seed)) < 0.5
    mask[0, 0], mask[0, 1] = True, False
    return mask


def test_surrogate_gradient_is_exactly_g_mask_over_b():
    z = randn(B, L, V, seed=16, dtype=torch.float32, scale=300.0).requires_grad_(True)
    g = randn(B, L, V, seed=17, dtype=torch.float32, scale=1e-3)
    mask = random_mask(18)
    loss = dimo_surrogate(z, g, mask)
    loss.backward()
    expected = torch.where(mask[..., None], g, torch.zeros(())) / B
    assert torch.equal(z.grad, expected)
    assert torch.equal(z.grad[~mask], torch.zeros(int((~mask).sum()), V))
    # Value: ½‖g·mask‖²/B, what Di[M]O's ½Σ(z − sg(z − g))²/B evaluates to.
    assert loss.item() == pytest.approx(0.5 * (expected * expected).sum().item() * B, rel=1e-5)


def test_surrogate_matches_dimo_squared_form():
    z = randn(B, L, V, seed=19).requires_grad_(True)
    g = randn(B, L, V, seed=20)
    mask = random_mask(21)
    dimo_surrogate(z, g, mask).backward()
    z2 = z.detach().clone().requires_grad_(True)
    gm = torch.where(mask[..., None], g, torch.zeros((), dtype=g.dtype))
    (0.5 * ((z2 - (z2 - gm).detach()) ** 2).sum() / B).backward()
    assert torch.allclose(z.grad.double(), z2.grad, atol=1e-6)


def test_surrogate_replaces_non_finite_g_by_zero():
    z = torch.zeros(B, L, V, requires_grad=True)
    g = torch.ones(B, L, V)
    g[0, 0, 0], g[0, 0, 1], g[0, 0, 2] = float("nan"), float("inf"), -float("inf")
    g[0, 1, :] = float("nan")                          # unmasked NaN must not leak either
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0, 1] = False
    loss = dimo_surrogate(z, g, mask)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()
    assert z.grad[0, 0, :3].eq(0).all() and z.grad[0, 1].eq(0).all()
    assert torch.equal(z.grad[0, 0, 3], torch.tensor(1.0) / B)


def test_surrogate_gradient_flows_to_bf16_logits_and_detaches_g():
    z = randn(B, L, V, seed=22, dtype=torch.bfloat16).requires_grad_(True)
    g = randn(B, L, V, seed=23, dtype=torch.float32).requires_grad_(True)
    mask = random_mask(24)
    loss = dimo_surrogate(z, g, mask)
    assert loss.dtype == torch.float32
    loss.backward()
    assert z.grad.dtype == torch.bfloat16 and g.grad is None
    expected = torch.where(mask[..., None], g.detach(), torch.zeros(())) / B
    assert torch.equal(z.grad, expected.bfloat16())


def test_aux_loss_matches_cross_entropy_with_ignore_index():
    logits = randn(2, 3, 4, seed=25, dtype=torch.float32)
    targets = torch.tensor([[0, 3, 1], [2, 2, 99]])      # 99 sits at an unmasked position
    mask = torch.tensor([[True, False, True], [True, True, False]])
    loss = aux_loss(logits, targets, mask, label_smoothing=0.1)
    ignored = torch.tensor([0, -100, 1, 2, 2, -100])
    expected = F.cross_entropy(logits.reshape(6, 4), ignored, ignore_index=-100,
                               label_smoothing=0.1)
    assert torch.allclose(loss, expected)
    # By hand: label smoothing ε spreads ε/V over all classes.
    log_q = F.log_softmax(logits.reshape(6, 4), -1)[[0, 2, 3, 4]]
    t = torch.tensor([0, 1, 2, 2])
    nll = -log_q[torch.arange(4), t]
    by_hand = (0.9 * nll - 0.1 * log_q.mean(-1)).mean()
    assert torch.allclose(loss, by_hand)


def test_aux_loss_gradient_only_at_masked_positions():
    logits = randn(2, 3, 4, seed=26, dtype=torch.float32).requires_grad_(True)
    targets = torch.tensor([[0, 1, 2], [3, 0, 1]])
    mask = torch.tensor([[True, False, False], [False, False, True]])
    aux_loss(logits, targets, mask, label_smoothing=0.0).backward()
    assert logits.grad[~mask].abs().sum() == 0 and logits.grad[mask].abs().sum() > 0


def test_aux_loss_no_masked_token_is_zero():
    logits = randn(2, 3, 4, seed=27, dtype=torch.float32)
    loss = aux_loss(logits, torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.bool))
    assert loss.item() == 0.0
