"""MaskTransformer, train_mdm and the MaskGit sampler on tiny random configurations."""
from __future__ import annotations

import pytest
import torch

from softdimo.world.mdm import MaskTransformer, MDMConfig, load_mdm, save_module, train_mdm
from softdimo.world.sampler import cfg_ramp, maskgit_sample, token_budget

K, L, W = 12, 16, 32


def tiny(conditioning: str = "class", seed: int = 0) -> MaskTransformer:
    extra = dict(num_classes=5) if conditioning == "class" else dict(text_dim=6, text_len=4)
    config = MDMConfig(codebook_size=K, seq_len=L, conditioning=conditioning, width=W, depth=3,
                       heads=2, **extra)
    return MaskTransformer(config, generator=torch.Generator().manual_seed(seed)).eval()


def cond_for(model: MaskTransformer, batch: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if model.config.conditioning == "class":
        return torch.randint(0, model.config.num_classes + 1, (batch,), generator=g)
    return torch.randn(batch, 3, model.config.text_dim, generator=g)     # T = 3 ≤ text_len


@pytest.mark.parametrize("conditioning", ["class", "text"])
def test_shapes_and_features(conditioning):
    model = tiny(conditioning)
    ids = torch.randint(0, K + 1, (2, L))
    cond = cond_for(model, 2)
    e = model.tok_emb(ids)
    logits, hidden = model.forward_embeddings(e, cond, layers=(0, 2))
    assert logits.shape == (2, L, K) and len(hidden) == 2
    assert all(h.shape == (2, L, W) for h in hidden)
    torch.testing.assert_close(model(ids, cond), logits, atol=1e-6, rtol=0)
    # -1 is the last block; an out-of-range index is an error
    torch.testing.assert_close(model.forward_embeddings(e, cond, layers=(-1,))[1][0], hidden[1])
    with pytest.raises(ValueError):
        model.forward_embeddings(e, cond, layers=(3,))


@pytest.mark.parametrize("conditioning", ["class", "text"])
def test_condition_changes_logits_and_hidden_is_image_positions(conditioning):
    model = tiny(conditioning)
    with torch.no_grad():                      # untrained weights are small: make the effect visible
        for p in model.parameters():
            p.mul_(20.0)
    ids = torch.randint(0, K + 1, (2, L))
    a, b = cond_for(model, 2, seed=0), cond_for(model, 2, seed=1)
    if conditioning == "class":
        b = (a + 1) % (model.config.num_classes + 1)
    assert not torch.allclose(model(ids, a), model(ids, b))
    # the hidden states of the last block, normed and projected, are the logits
    logits, (h,) = model.forward_embeddings(model.tok_emb(ids), a, layers=(-1,))
    torch.testing.assert_close(model.head(model.norm(h)), logits)


def test_head_is_untied_from_input_table():
    model = tiny()
    model.tok_emb.requires_grad_(False)
    loss = model(torch.randint(0, K, (2, L)), torch.zeros(2, dtype=torch.long)).sum()
    loss.backward()
    assert model.head.weight.grad is not None and model.tok_emb.weight.grad is None
    assert model.head.weight.shape == (K, W) and model.tok_emb.weight.shape == (K + 1, W)


def test_parameter_count_matches_the_probe():
    config = MDMConfig(codebook_size=128, seq_len=64, conditioning="class", num_classes=18)
    n = sum(p.numel() for p in MaskTransformer(config).parameters())
    assert 0.8e6 < n < 0.87e6                  # world.md: about 837k


def test_save_load_round_trip(tmp_path):
    model = tiny("text")
    save_module(model, model.config, tmp_path / "mdm")
    back = load_mdm(tmp_path / "mdm")
    assert back.config == model.config and not back.training
    ids, cond = torch.randint(0, K + 1, (2, L)), cond_for(model, 2)
    assert torch.equal(back(ids, cond), model(ids, cond))
    with pytest.raises(KeyError, match="unexpected keys"):
        from safetensors.torch import load_file, save_file
        state = load_file(str(tmp_path / "mdm.safetensors"))
        state["stray"] = torch.zeros(1)
        save_file(state, str(tmp_path / "mdm.safetensors"))
        load_mdm(tmp_path / "mdm")


def toy_tokens(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Class c's sequences repeat a two-code pattern of codes (c, c + 5): learnable from context."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 5, (n,), generator=g)
    pattern = torch.stack([labels, labels + 5], 1).repeat(1, L // 2)
    return pattern, labels


def _train(model, steps, seed=0, **kw):
    tokens, labels = toy_tokens(64)
    return train_mdm(model, tokens, labels, torch.tensor(5), steps=steps, batch_size=16, lr=3e-3,
                     generator=torch.Generator().manual_seed(seed), progress=False, **kw)


def test_train_mdm_lowers_the_loss():
    model = tiny()
    stats = _train(model, 40, warmup=5)
    assert stats["final_loss"] < 0.7 * stats["first_loss"]
    assert not model.training


def test_train_mdm_is_deterministic_given_the_generator():
    a, b = tiny(), tiny()
    sa, sb = _train(a, 4), _train(b, 4)
    assert sa["final_loss"] == sb["final_loss"]
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_train_mdm_text_conditions_and_dropout_to_null():
    model = tiny("text")
    tokens, labels = toy_tokens(32)
    conds = torch.randn(5, 3, 6)[labels]
    stats = train_mdm(model, tokens, conds, torch.zeros(3, 6), steps=3, batch_size=8, lr=1e-3,
                      generator=torch.Generator().manual_seed(0), drop_prob=1.0, progress=False)
    assert stats["steps"] == 3 and torch.isfinite(torch.tensor(stats["final_loss"]))


# --------------------------------------------------------------------- sampler
@pytest.mark.parametrize("steps", [1, 2, 5, 8, 16])
def test_token_budget_sums_to_length(steps):
    budget = token_budget(steps, L)
    assert len(budget) == steps and sum(budget) == L and min(budget) >= 1
    if steps > 1:                                  # arccos: few tokens early, many late
        assert budget[0] == 1 and sum(budget[steps // 2:]) >= sum(budget[:steps // 2])


def test_token_budget_rejects_more_steps_than_tokens():
    with pytest.raises(ValueError):
        token_budget(L + 1, L)


def test_cfg_ramp():
    assert cfg_ramp(1, 3.0) == [3.0]
    assert cfg_ramp(3, 3.0) == [1.0, 2.0, 3.0]


def _sample(model, cond, steps, seed, **kw):
    return maskgit_sample(lambda ids: model(ids, cond), cond.shape[0], L, model.mask_id, steps,
                          torch.Generator().manual_seed(seed), **kw)


@pytest.mark.parametrize("steps", [1, 4, 8])
def test_sampler_fills_every_position_deterministically(steps):
    model = tiny()
    cond = cond_for(model, 3)
    a, b = _sample(model, cond, steps, 7), _sample(model, cond, steps, 7)
    assert a.shape == (3, L) and torch.equal(a, b)
    assert int(a.max()) < K and int(a.min()) >= 0     # no mask id left
    assert not torch.equal(a, _sample(model, cond, steps, 8))


def test_sampler_calls_logits_fn_once_per_step_and_commits_the_budget():
    seen = []

    def logits_fn(ids):
        seen.append(int((ids == K).sum(1)[0]))
        return torch.zeros(ids.shape[0], L, K)

    maskgit_sample(logits_fn, 2, L, K, 4, torch.Generator().manual_seed(0))
    budget = token_budget(4, L)
    assert seen == [L - sum(budget[:i]) for i in range(4)]


def test_greedy_sampler_picks_the_argmax():
    target = torch.arange(L) % K
    logits = torch.nn.functional.one_hot(target, K).float()[None] * 10
    out = maskgit_sample(lambda ids: logits.expand(ids.shape[0], -1, -1), 2, L, K, 4,
                         torch.Generator().manual_seed(0), temperature=0.0, randomize=0.0)
    assert torch.equal(out, target.expand(2, -1))
