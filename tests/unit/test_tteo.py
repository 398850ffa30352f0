"""trainers.tteo: Best-of-N selection and TTEO's SGD on the input embeddings (a tiny stand-in teacher)."""
import pytest
import torch
from torch import nn

from softdimo.math import masking
from trainers.config import ConfigValueError, TestTime, check_test_time
from trainers.tteo import combined_score, multistart_tteo, resolve

V, L, D = 5, 4, 3


class TinyTeacher:
    """The protocol pieces TTEO touches: tokens embed to D, a per-token linear net, a colour decoder."""
    V, seq_len, mask_id = V, L, V

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.table = torch.randn(V + 1, D, generator=g)          # last row: [MASK]
        self.colours = torch.rand(V, 3, generator=g)

    def embed_ids(self, ids):
        return self.table[ids]

    def forward_embeddings(self, net, e, cond, layers=()):
        return net(e) + cond[:, None, :], []

    def decode_probs(self, p, cond=None):
        """[B, L, V] -> a 2×2 'image' [B, 3, 2, 2] whose pixels are expected colours."""
        return (p @ self.colours).transpose(1, 2).reshape(p.shape[0], 3, 2, 2)


def brightness(images, prompts):
    return images.mean(dim=(1, 2, 3))


def make(seed=0):
    torch.manual_seed(seed)
    return TinyTeacher(), nn.Linear(D, V)


def cond_for(n):
    return torch.zeros(n, V)


def run(teacher, net, prompts, rewards, bon, iters, lr=0.5, seed=0, select=None, weights=None):
    return multistart_tteo(teacher, net, cond_for(len(prompts)), prompts, rewards,
                           weights or {"b": 1.0}, select or {"b": 1.0}, bon, iters, lr,
                           torch.Generator().manual_seed(seed), (0.6,), 0.1, 1.0)


def test_combined_score_standardises_each_reward_per_prompt():
    s = {"a": torch.tensor([[0.30, 0.31, 0.29]]), "b": torch.tensor([[10.0, -10.0, 0.0]])}
    z = combined_score(s, {"a": 1.0, "b": 1.0})
    expected = sum((x - x.mean()) / x.std(unbiased=False) for x in (s["a"][0], s["b"][0]))
    assert torch.allclose(z[0].float(), expected.float(), atol=1e-5)
    # the scale of a reward does not matter, its weight does
    scaled = combined_score({"a": s["a"] * 1000, "b": s["b"]}, {"a": 1.0, "b": 1.0})
    assert torch.allclose(scaled, z, atol=1e-5)
    assert combined_score(s, {"a": 3.0, "b": 1.0}).argmax().item() == 1
    flat = combined_score({"a": torch.ones(2, 4), "b": torch.arange(8.).view(2, 4)}, {"a": 1, "b": 1})
    assert flat.argmax(dim=1).tolist() == [3, 3]          # a constant reward contributes nothing
    with pytest.raises(ValueError):
        combined_score(s, {"a": 0.0})


def test_best_of_n_picks_the_best_start():
    teacher, net = make()
    seen = []

    def recording(images, prompts):
        seen.append(images.detach().clone())
        return brightness(images, prompts)

    r = run(teacher, net, ["p"], {"b": recording}, bon=6, iters=0)
    assert len(seen) == 1 and seen[0].shape == (6, 3, 2, 2)       # N starts in one batch
    scores = brightness(seen[0], None)
    assert r.start.item() == scores.argmax().item() and r.iterate.item() == 0
    assert torch.equal(r.images[0], seen[0][scores.argmax()])
    assert r.scores["b"].item() == pytest.approx(scores.max().item())


def test_one_start_without_iterations_is_the_soft_decode_of_one_step_sampling():
    teacher, net = make()
    r = run(teacher, net, ["p"], {"b": brightness}, bon=1, iters=0, seed=3)
    g = torch.Generator().manual_seed(3)
    r_init = masking.draw_init_ratio([0.6], g)
    x = masking.sample_init(1, L, V, V, r_init, g)
    e = masking.embed_noise(teacher.embed_ids(x), 0.1, g)
    expected = teacher.decode_probs(torch.softmax(net(e), -1))
    assert torch.allclose(r.images, expected)


def test_sgd_step_moves_only_the_embeddings_along_the_reward_gradient():
    teacher, net = make()
    inputs = []
    forward = teacher.forward_embeddings

    def spy(n, e, cond, layers=()):
        inputs.append(e.detach().clone())
        return forward(n, e, cond, layers)

    teacher.forward_embeddings = spy
    before = {k: v.clone() for k, v in net.state_dict().items()}
    lr = 0.7
    run(teacher, net, ["p", "q"], {"b": brightness}, bon=3, iters=2, lr=lr)
    assert len(inputs) == 2                        # K = 2 iterations: 2 forwards, 1 SGD step
    e0 = inputs[0].clone().requires_grad_(True)
    objective = brightness(teacher.decode_probs(torch.softmax(forward(net, e0, cond_for(6))[0], -1)), None)
    grad, = torch.autograd.grad(objective.sum(), e0)
    assert torch.allclose(inputs[1], inputs[0] + lr * grad, atol=1e-6)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert all(p.grad is None for p in net.parameters())      # nothing accumulated in θ


def test_tteo_raises_the_reward_and_keeps_the_best_iterate():
    teacher, net = make()
    r = run(teacher, net, ["p"] * 4, {"b": brightness}, bon=2, iters=6, lr=2.0)
    trace = r.trace["b"].tolist()
    assert len(trace) == 6 and trace[-1] > trace[0]
    assert all(b >= a - 1e-6 for a, b in zip(trace, trace[1:]))     # small steps: monotone ascent
    plain = run(teacher, net, ["p"] * 4, {"b": brightness}, bon=2, iters=0)
    # the same starts (same seed) plus later iterates: the chosen score never gets worse
    assert (r.scores["b"] >= plain.scores["b"] - 1e-6).all() and (r.iterate > 0).any()


def test_selection_is_per_prompt_and_may_differ_from_the_optimised_reward():
    teacher, net = make()

    def prompt_dependent(images, prompts):                # "dark" prompts want dark images
        sign = torch.tensor([-1.0 if p == "dark" else 1.0 for p in prompts])
        return sign * brightness(images, prompts)

    r = run(teacher, net, ["light", "dark"], {"b": brightness, "s": prompt_dependent}, bon=8,
            iters=0, select={"s": 1.0})
    light, dark = brightness(r.images, None).tolist()
    assert light > dark
    assert set(r.scores) == {"s"}


def test_checks_and_defaults():
    check_test_time(TestTime(bon=4, iters=4, rewards={"clip": 0.2, "quality": 1.0}))
    for bad, key in [(TestTime(bon=0), "--bon"), (TestTime(iters=-1), "--iters"),
                     (TestTime(lr=0.0), "--lr"), (TestTime(rewards={"nope": 1.0}), "--rewards"),
                     (TestTime(select={"clip": 0.0}), "--select")]:
        with pytest.raises(ConfigValueError) as err:
            check_test_time(bad, prefix="--")
        assert err.value.key == key
    rewards, select = resolve(TestTime(iters=4), {"quality": 1.0, "clip": 0.2}, on_world=True)
    assert rewards == {"quality": 1.0, "clip": 0.2} and select == {"clip": 1.0, "quality": 1.0}
    _, select = resolve(TestTime(), {}, on_world=False)
    assert set(select) == {"clip", "imagereward", "hps_v21", "pickscore"}
    with pytest.raises(ConfigValueError):
        resolve(TestTime(iters=4), {}, on_world=True)       # nothing to optimise
