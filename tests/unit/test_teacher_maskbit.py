"""MaskBit adapter on a tiny random LFQBert + ConvVQModel saved in the published file layout."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from softdimo.checkpoints import StateDictMismatch
from softdimo.teachers import TeacherFilesMissing, TeacherOptionError, check_paths, load_teacher
from softdimo.teachers.maskbit import cfg_scale, mask_ratio, maskbit_sample
from softdimo.teachers.protocol import Teacher
from tests.fakes import maskbit as fake

pytestmark = pytest.mark.usefixtures("no_network")

V, L, N, BITS, W = 8, 32, 16, 3, 32      # codes per group, group-tokens, positions, bits/group, width


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    return fake.write(tmp_path_factory.mktemp("maskbit"))


@pytest.fixture(scope="module")
def teacher(written):
    paths, options = written
    return load_teacher("maskbit", {k: str(v) for k, v in paths.items()}, options, "cpu")


def random_ids(batch: int = 2, seed: int = 0, masked: bool = True) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V + 1 if masked else V, (batch, L), generator=g)


def test_protocol_members_frozen_eval(teacher):
    assert isinstance(teacher, Teacher)
    assert (teacher.V, teacher.mask_id, teacher.seq_len, teacher.token_shape) == (V, V, L, (L,))
    assert (teacher.depth, teacher.hidden_width, teacher.feature_len) == (2, W, N)
    assert (teacher.num_classes, teacher.image_size, teacher.conditioning) == (1000, 16, "class")
    assert teacher.sampling == {"steps": 64, "cfg": 7.1, "temperature": 1.0, "randomize": 7.8}
    for net in (teacher.backbone, teacher.tokenizer):
        assert not net.training and not any(p.requires_grad for p in net.parameters())


def test_embeddings_are_lsb_first_bits(teacher):
    # code 6 = 0b110 -> bits (LSB first) 0,1,1 -> −1,+1,+1; [MASK] -> zeros
    e = teacher.embed_ids(torch.tensor([[6, V]]))
    assert torch.equal(e, torch.tensor([[[-1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]]))
    assert torch.equal(teacher.mask_embedding(), torch.zeros(BITS))
    p = torch.full((1, 1, V), 1.0 / V)                 # uniform: every bit is ±1 equally often
    assert torch.allclose(teacher.embed_probs(p), torch.zeros(1, 1, BITS))


def test_shapes_and_hard_path_matches_upstream_call(teacher):
    ids, cond = random_ids(), teacher.encode_condition(labels=torch.tensor([3, 999]))
    logits, feats = teacher.forward_embeddings(teacher.backbone, teacher.embed_ids(ids), cond, (0, -1))
    assert logits.shape == (2, L, V)
    assert [f.shape for f in feats] == [(2, N, W)] * 2
    assert not torch.equal(feats[0], feats[1])
    # flattening convention: group-token 2·pos + group <-> upstream's [B, N, 2] ids and logits
    generator, _ = fake.build()
    upstream = generator(ids.view(2, N, 2), cond)                  # [B, N, 2, V]
    torch.testing.assert_close(logits, upstream.reshape(2, L, V), atol=1e-5, rtol=1e-5)


def test_one_hot_soft_path_equals_hard_path(teacher):
    ids, cond = random_ids(masked=False), teacher.encode_condition(labels=torch.tensor([1, 2]))
    p = F.one_hot(ids, V).float()
    torch.testing.assert_close(teacher.embed_probs(p), teacher.embed_ids(ids), atol=1e-5, rtol=0)
    hard = teacher.forward_embeddings(teacher.backbone, teacher.embed_ids(ids), cond, (0,))
    soft = teacher.forward_embeddings(teacher.backbone, teacher.embed_probs(p), cond, (0,))
    torch.testing.assert_close(soft[0], hard[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(soft[1][0], hard[1][0], atol=1e-5, rtol=0)
    images = teacher.decode_ids(ids)
    assert images.shape == (2, 3, 16, 16) and images.min() >= 0 and images.max() <= 1
    torch.testing.assert_close(teacher.decode_probs(p), images, atol=1e-5, rtol=0)


def test_decoder_sees_combined_14_bit_code(teacher):
    # position-major flattening: (group 0, group 1) of a position form the code g0 + g1·2^3
    g0, g1 = torch.randint(0, V, (1, N)), torch.randint(0, V, (1, N))
    ids = torch.stack([g0, g1], dim=-1).reshape(1, L)
    expected = teacher.tokenizer.decode_tokens(g0 + (g1 << BITS)).clamp(0, 1)
    torch.testing.assert_close(teacher.decode_ids(ids), expected, atol=1e-6, rtol=0)


def test_gradients_reach_p(teacher):
    cond = teacher.encode_condition(labels=torch.tensor([4, 5]))
    p = torch.softmax(torch.randn(2, L, V), -1).requires_grad_(True)
    logits, feats = teacher.forward_embeddings(teacher.backbone, teacher.embed_probs(p), cond, (-1,))
    (logits.square().mean() + feats[0].mean()).backward()
    assert p.grad is not None and p.grad.abs().sum() > 0
    q = torch.softmax(torch.randn(2, L, V), -1).requires_grad_(True)
    teacher.decode_probs(q).mean().backward()
    assert q.grad is not None and q.grad.abs().sum() > 0


def test_student_trains_with_frozen_input_projection(teacher):
    student = teacher.make_student()
    assert student.training and student is not teacher.backbone
    assert not student.input_proj.weight.requires_grad and not student.input_proj.bias.requires_grad
    assert student.transformer.layers[0][0].mha.in_proj_weight.requires_grad
    ids, cond = random_ids(), teacher.encode_condition(labels=torch.tensor([7, 8]))
    e = teacher.embed_ids(ids)
    ref = teacher.forward_embeddings(teacher.backbone, e, cond, (0, 1))
    out = teacher.forward_embeddings(student, e, cond, (0, 1))
    torch.testing.assert_close(out[0], ref[0], atol=1e-5, rtol=1e-5)   # the fake's dropout is 0
    torch.testing.assert_close(out[1][1], ref[1][1], atol=1e-5, rtol=1e-5)
    out[0].square().mean().backward()
    assert student.transformer.layers[0][1].net[0].weight.grad.abs().sum() > 0
    assert student.input_proj.weight.grad is None
    assert not any(p.requires_grad for p in teacher.backbone.parameters())


def test_labels_never_mutated(teacher):
    # upstream's forward writes the dropped id into the caller's labels; nothing here may
    labels = torch.tensor([3, 4])
    cond = teacher.encode_condition(labels=labels)
    cond[0] = 999                                 # the condition is a copy, not a view
    assert torch.equal(labels, torch.tensor([3, 4]))
    cond = teacher.encode_condition(labels=labels)
    teacher.sample(cond, steps=2, cfg=7.1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(cond, torch.tensor([3, 4]))
    teacher.backbone(torch.zeros(2, N, 2, dtype=torch.long), labels, torch.tensor([True, False]))
    assert torch.equal(labels, torch.tensor([3, 4]))
    assert torch.equal(teacher.null_condition(3), torch.full((3,), 1000))
    with pytest.raises(ValueError):
        teacher.encode_condition(prompts=["a cat"])
    with pytest.raises(ValueError):
        teacher.encode_condition(labels=torch.tensor([1000]))


def test_null_condition_is_the_dropped_label(teacher):
    ids, b = random_ids(), 2
    null = teacher.forward_embeddings(teacher.backbone, teacher.embed_ids(ids), teacher.null_condition(b))[0]
    dropped = teacher.backbone(ids.view(b, N, 2), torch.tensor([5, 6]), torch.tensor([True, True]))
    torch.testing.assert_close(null, dropped.reshape(b, L, V), atol=1e-5, rtol=1e-5)


def test_sample_shape_range_determinism(teacher):
    cond = teacher.encode_condition(labels=torch.tensor([1, 2, 3]))
    run = lambda seed, cfg=7.1: teacher.sample(cond, steps=2, cfg=cfg,
                                               generator=torch.Generator().manual_seed(seed))
    a = run(0)
    assert a.shape == (3, L) and a.dtype == torch.long and a.min() >= 0 and a.max() < V
    assert torch.equal(a, run(0))
    assert not torch.equal(a, run(1))
    assert run(0, cfg=0.0).shape == (3, L)


def test_sampler_schedule_over_group_tokens():
    # arccos over all L group-tokens: masked counts before each of 4 steps (upstream gives the same)
    seen = []

    def logits_fn(step, ids):
        seen.append(int((ids[0] == V).sum()))
        return torch.randn(ids.shape[0], L, V, generator=torch.Generator().manual_seed(step))

    out = maskbit_sample(logits_fn, 2, L, V, 4, torch.Generator().manual_seed(0))
    assert seen == [32, 26, 21, 14] and out.max() < V
    # more steps than tokens: everything is decided once, never re-masked (upstream restarts)
    seen.clear()
    maskbit_sample(logits_fn, 1, L, V, 40, torch.Generator().manual_seed(0))
    assert seen[:33] == list(range(32, 0, -1)) + [0] and max(seen[33:]) == 0
    assert math.isclose(mask_ratio(0.5), 2 / 3) and mask_ratio(1.0) == 1e-6


def test_cfg_ramp_is_cosine_cubed():
    assert cfg_scale(0, 64, 7.1) == 0.0
    assert math.isclose(cfg_scale(32, 64, 7.1), 7.1 * (1 - math.cos(math.pi / 8)) / 2)
    assert math.isclose(cfg_scale(63, 64, 7.1), 7.1 * (1 - math.cos(math.pi * (63 / 64) ** 3)) / 2)
    assert cfg_scale(5, 64, 2.0, "none") == 2.0


def test_round_trip_logits_and_token_emb_naming(written, teacher):
    paths, _ = written
    keys = torch.load(paths["generator"], weights_only=True).keys()
    assert "token_emb.weight" in keys and "input_proj.weight" not in keys   # the published naming
    generator, tokenizer = fake.build()
    ids, cond = random_ids(), torch.tensor([0, 10])
    torch.testing.assert_close(teacher.forward_embeddings(teacher.backbone, teacher.embed_ids(ids), cond)[0],
                               generator(ids.view(2, N, 2), cond).reshape(2, L, V), atol=1e-5, rtol=1e-5)
    for name, tensor in tokenizer.state_dict().items():
        assert torch.equal(teacher.tokenizer.state_dict()[name], tensor)


def test_input_proj_naming_also_loads(written, tmp_path):
    paths, options = written
    state = torch.load(paths["generator"], weights_only=True)
    torch.save({k.replace("token_emb", "input_proj"): v for k, v in state.items()}, tmp_path / "g.bin")
    t = load_teacher("maskbit", {**paths, "generator": tmp_path / "g.bin"}, options, "cpu")
    assert torch.equal(t.backbone.input_proj.weight, state["token_emb.weight"])


@pytest.mark.parametrize("which, drop, extra", [("generator", "class_emb.weight", "head.weight"),
                                                ("tokenizer", "decoder.conv_in.bias", "loss.w")])
def test_mismatched_checkpoint_names_keys(written, tmp_path, which, drop, extra):
    paths, options = written
    state = torch.load(paths[which], weights_only=True)
    state.pop(drop)
    state[extra] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.bin")
    with pytest.raises(StateDictMismatch) as err:
        load_teacher("maskbit", {**paths, which: tmp_path / "bad.bin"}, options, "cpu")
    assert drop in str(err.value) and extra in str(err.value) and "bad.bin" in str(err.value)


def test_missing_file_and_bad_options(written, tmp_path):
    paths, options = written
    with pytest.raises(TeacherFilesMissing) as err:
        check_paths("maskbit", {**paths, "tokenizer": tmp_path / "absent.bin"})
    assert err.value.key == "teacher.paths.tokenizer"
    with pytest.raises(TeacherOptionError) as err:
        load_teacher("maskbit", paths, {"hidden_dim": 8}, "cpu")
    assert err.value.key == "teacher.options.hidden_dim"
    with pytest.raises(TeacherOptionError):
        load_teacher("maskbit", paths, {"dropout": 2.0}, "cpu")
    assert load_teacher("maskbit", paths, {"dropout": 0.3}, "cpu").make_student().first_layer[1].p == 0.3


def test_config_mismatch_between_yamls(written, tmp_path):
    paths, options = written
    text = paths["tokenizer_config"].read_text().replace("token_size: 6", "token_size: 8")
    (tmp_path / "tok.yaml").write_text(text)
    with pytest.raises(ValueError, match="bits"):
        load_teacher("maskbit", {**paths, "tokenizer_config": tmp_path / "tok.yaml"}, options, "cpu")
