"""softdimo.math.reward, softdimo.math.ema and softdimo.math.diagnostics."""
import math

import pytest
import torch
from torch import nn

from softdimo.math.diagnostics import decode_mse, mean_entropy, mean_top1
from softdimo.math.ema import ema_decay, ema_update_
from softdimo.math.dimo import total_loss
from softdimo.math.reward import reward_loss


def test_reward_loss_is_negative_weighted_mean():
    scores = {"clip": torch.tensor([0.2, 0.4]), "quality": torch.tensor([1.0, 3.0]),
              "unused": torch.tensor([100.0, 100.0])}
    loss = reward_loss(scores, {"clip": 0.2, "quality": 1.0})
    assert loss.item() == pytest.approx(-(0.2 * 0.3 + 1.0 * 2.0))


def test_reward_loss_gradient():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0], requires_grad=True)
    reward_loss({"r": x * 2}, {"r": 0.5}).backward()
    assert torch.allclose(x.grad, torch.full((4,), -0.5 * 2 / 4))


def test_reward_loss_missing_score_and_zero_weight():
    with pytest.raises(ValueError):
        reward_loss({"clip": torch.ones(2)}, {"clip": 1.0, "hps": 1.0})
    assert reward_loss({"clip": torch.ones(2)}, {"clip": 1.0, "hps": 0.0}).item() == -1.0
    assert reward_loss({}, {}).item() == 0.0


def test_total_loss_eq_10():
    d, g, r = torch.tensor(1.0), torch.tensor(2.0), torch.tensor(-3.0)
    assert total_loss(d, g, r, w_gan=100.0, w_reward=0.5).item() == 1.0 + 200.0 - 1.5
    assert total_loss(d).item() == 1.0
    assert total_loss(d, g, None, w_gan=0.0, w_reward=7.0).item() == 1.0
    nan = torch.tensor(float("nan"))
    assert total_loss(d, nan, nan, w_gan=0.0, w_reward=0.0).item() == 1.0


def test_ema_decay_warm_up():
    assert ema_decay(0, 0.9999) == pytest.approx(0.1)
    assert ema_decay(1, 0.9999) == pytest.approx(2 / 11)
    assert ema_decay(100, 0.9999) == pytest.approx(101 / 110)
    assert ema_decay(10**7, 0.9999) == 0.9999
    assert ema_decay(100, 0.5) == 0.5


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.norm = nn.BatchNorm1d(2)
        self.register_buffer("count", torch.zeros((), dtype=torch.long))


def test_ema_update_formula_and_buffers():
    torch.manual_seed(0)
    model, ema = Tiny(), Tiny()
    with torch.no_grad():
        model.norm.running_mean.fill_(0.7)
        model.count.fill_(5)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    ema_update_(ema, model, 0.9)
    for name, p in model.named_parameters():
        e = dict(ema.named_parameters())[name]
        assert torch.allclose(e, 0.9 * before[name] + 0.1 * p.detach())
        assert not e.requires_grad or e.grad is None
    assert torch.equal(ema.norm.running_mean, model.norm.running_mean)
    assert ema.count.item() == 5


def test_ema_update_extremes():
    model, ema = Tiny(), Tiny()
    snapshot = [p.clone() for p in ema.parameters()]
    ema_update_(ema, model, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(ema.parameters(), snapshot))
    ema_update_(ema, model, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(ema.parameters(), model.parameters()))


def test_ema_update_rejects_mismatched_models():
    with pytest.raises(ValueError):
        ema_update_(nn.Linear(2, 2, bias=False), nn.Linear(2, 2), 0.5)


def test_diagnostics_on_uniform_logits():
    z = torch.zeros(2, 5, 16)
    assert mean_entropy(z).item() == pytest.approx(math.log(16), rel=1e-6)
    assert mean_top1(z).item() == pytest.approx(1 / 16, rel=1e-6)


def test_diagnostics_on_one_hot_logits():
    ids = torch.randint(0, 16, (2, 5), generator=torch.Generator().manual_seed(0))
    z = torch.nn.functional.one_hot(ids, 16).float() * 1e4
    assert mean_entropy(z).item() == pytest.approx(0.0, abs=1e-6)
    assert mean_top1(z).item() == pytest.approx(1.0)
    z_inf = torch.where(z > 0, torch.zeros(()), torch.full((), -float("inf")))
    assert mean_entropy(z_inf).item() == 0.0


def test_diagnostics_temperature_and_closed_form():
    z = torch.tensor([[[0.0, math.log(3.0)]]])               # p = (1/4, 3/4)
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert mean_entropy(z).item() == pytest.approx(h, rel=1e-6)
    assert mean_top1(z).item() == pytest.approx(0.75)
    assert mean_top1(z, tau=1e6).item() == pytest.approx(0.5, abs=1e-5)


def test_diagnostics_are_detached():
    z = torch.randn(2, 3, 4, requires_grad=True)
    assert not mean_entropy(z).requires_grad and not mean_top1(z).requires_grad


def test_decode_mse():
    a, b = torch.zeros(2, 3, 4, 4), torch.full((2, 3, 4, 4), 0.5)
    assert decode_mse(a, b).item() == pytest.approx(0.25)
    assert decode_mse(a, a).item() == 0.0
