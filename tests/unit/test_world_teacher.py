"""WorldTeacher: the Teacher protocol over a tiny random MaskTransformer and VQTokenizer."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from softdimo.teachers.protocol import Teacher
from softdimo.teachers.world import WorldTeacher
from softdimo.world.mdm import MaskTransformer, MDMConfig
from softdimo.world.tokenizer import TokenizerConfig, VQTokenizer

K, W, T, C = 16, 32, 5, 6


class ByteText(nn.Module):
    """A deterministic stand-in text encoder: prompts -> [B, T, C] from embedded bytes, zero-padded."""

    def __init__(self):
        super().__init__()
        self.table = nn.Embedding(257, C)
        nn.init.normal_(self.table.weight, generator=torch.Generator().manual_seed(0))

    def forward(self, prompts: list[str]) -> torch.Tensor:
        ids = torch.full((len(prompts), T), 256, dtype=torch.long)
        for i, p in enumerate(prompts):
            b = list(p.encode())[:T]
            ids[i, :len(b)] = torch.tensor(b, dtype=torch.long)
        return self.table(ids)


def make_teacher(conditioning: str) -> WorldTeacher:
    g = torch.Generator().manual_seed(0)
    tok = VQTokenizer(TokenizerConfig(codebook_size=K, code_dim=4, channels=8, image_size=16), generator=g)
    extra = dict(num_classes=4) if conditioning == "class" else dict(text_dim=C, text_len=T)
    config = MDMConfig(codebook_size=K, seq_len=tok.seq_len, conditioning=conditioning, width=W,
                       depth=2, heads=2, **extra)
    net = MaskTransformer(config, generator=g)
    with torch.no_grad():                      # untrained weights are small: make CFG effects visible
        for p in net.parameters():
            p.mul_(10.0)
    return WorldTeacher(net, tok, ByteText() if conditioning == "text" else None)


def some_condition(teacher: WorldTeacher, batch: int = 2) -> torch.Tensor:
    if teacher.conditioning == "class":
        return teacher.encode_condition(labels=torch.arange(batch) % 4)
    return teacher.encode_condition(prompts=["a red circle", "two blue squares"][:batch])


@pytest.fixture(params=["class", "text"])
def teacher(request) -> WorldTeacher:
    return make_teacher(request.param)


def test_protocol_members_and_frozen(teacher):
    assert isinstance(teacher, Teacher)
    assert teacher.V == K and teacher.mask_id == K and teacher.seq_len == 16
    assert teacher.token_shape == (16,)
    assert not any(p.requires_grad for p in teacher.backbone.parameters())
    assert not any(p.requires_grad for p in teacher.tokenizer.parameters())
    assert not teacher.backbone.training and not teacher.tokenizer.training
    assert teacher.mask_embedding().shape == (W,)
    torch.testing.assert_close(teacher.mask_embedding(), teacher.embed_ids(torch.tensor([[K]]))[0, 0])


def test_conditions(teacher):
    cond, null = some_condition(teacher), teacher.null_condition(3)
    if teacher.conditioning == "class":
        assert cond.dtype == torch.long and cond.shape == (2,)
        assert torch.equal(null, torch.full((3,), 4))
        with pytest.raises(ValueError):
            teacher.encode_condition(prompts=["a"])
    else:
        assert cond.shape == (2, T, C) and null.shape == (3, T, C)
        torch.testing.assert_close(null[1], teacher.encode_condition(prompts=[""])[0])
        with pytest.raises(ValueError):
            teacher.encode_condition(labels=torch.zeros(1, dtype=torch.long))


def test_one_hot_probabilities_reproduce_the_hard_paths(teacher):
    ids = torch.randint(0, K, (2, 16), generator=torch.Generator().manual_seed(1))
    p = F.one_hot(ids, K).float()
    torch.testing.assert_close(teacher.embed_probs(p), teacher.embed_ids(ids), atol=1e-5, rtol=0)
    torch.testing.assert_close(teacher.decode_probs(p), teacher.decode_ids(ids), atol=1e-5, rtol=0)


def test_decode_ids_clamps_the_mask_id(teacher):
    ids = torch.full((1, 16), K)
    torch.testing.assert_close(teacher.decode_ids(ids), teacher.decode_ids(torch.full((1, 16), K - 1)))


def test_gradients_flow_from_images_to_probabilities(teacher):
    z = torch.randn(2, 16, K, requires_grad=True)
    images = teacher.decode_probs(z.softmax(-1))
    assert images.shape == (2, 3, 16, 16)
    images.mean().backward()
    assert z.grad is not None and float(z.grad.abs().sum()) > 0


def test_forward_embeddings_matches_the_backbone(teacher):
    ids = torch.randint(0, K + 1, (2, 16), generator=torch.Generator().manual_seed(2))
    cond = some_condition(teacher)
    logits, hidden = teacher.forward_embeddings(teacher.backbone, teacher.embed_ids(ids), cond, layers=(0, 1))
    torch.testing.assert_close(logits, teacher.backbone(ids, cond), atol=1e-5, rtol=1e-5)
    assert logits.shape == (2, 16, K) and [h.shape for h in hidden] == [(2, 16, W)] * 2


def test_cfg_combination(teacher):
    ids = torch.randint(0, K + 1, (2, 16), generator=torch.Generator().manual_seed(3))
    cond = some_condition(teacher)
    c = teacher.backbone(ids, cond)
    u = teacher.backbone(ids, teacher.null_condition(2))
    torch.testing.assert_close(teacher.guided_logits(ids, cond, 1.0), c, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(teacher.guided_logits(ids, cond, 3.0), u + 3.0 * (c - u), atol=1e-4, rtol=1e-5)
    assert not torch.allclose(c, u)


@pytest.mark.parametrize("steps", [1, 4])
def test_sample(teacher, steps):
    cond = some_condition(teacher)
    runs = [teacher.sample(cond, steps, 2.0, torch.Generator().manual_seed(5)) for _ in range(2)]
    assert runs[0].shape == (2, 16) and torch.equal(runs[0], runs[1])
    assert int(runs[0].max()) < K and int(runs[0].min()) >= 0
    assert teacher.decode_ids(runs[0]).shape == (2, 3, 16, 16)


def test_sample_with_cfg_one_is_the_conditional_sampler():
    from softdimo.world.sampler import maskgit_sample
    teacher = make_teacher("class")
    cond = some_condition(teacher)
    ours = teacher.sample(cond, 4, 1.0, torch.Generator().manual_seed(6))
    plain = maskgit_sample(lambda ids: teacher.backbone(ids, cond), 2, 16, K, 4,
                           torch.Generator().manual_seed(6))
    assert torch.equal(ours, plain)


def test_cfg_ramp_reaches_the_sampler(monkeypatch):
    teacher = make_teacher("class")
    weights = []
    original = teacher.guided_logits
    monkeypatch.setattr(teacher, "guided_logits",
                        lambda ids, cond, w, null=None: weights.append(w) or original(ids, cond, w, null))
    teacher.sample(some_condition(teacher), 3, 3.0, torch.Generator().manual_seed(0))
    assert weights == [1.0, 2.0, 3.0]


def test_text_teacher_needs_an_encoder():
    t = make_teacher("text")
    with pytest.raises(ValueError, match="text_encoder"):
        WorldTeacher(t.backbone, t.tokenizer)
