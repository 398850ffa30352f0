"""MaskGIT v1 teacher adapter on a tiny random model saved in the published file layout."""
from __future__ import annotations

import torch
import torch.nn.functional as F
import pytest

from softdimo.checkpoints import StateDictMismatch
from softdimo.teachers import TeacherFilesMissing, TeacherOptionError, check_paths, load_teacher
from softdimo.teachers.maskgit import (DECODER_PREFIXES, IGNORED_PREFIXES, PUBLISHED_SAMPLING,
                                       MaskGitTeacher, token_schedule)
from softdimo.teachers.maskgit_modules import MaskTransformer, VQGANDecoder
from softdimo.teachers.protocol import Teacher
from tests.fakes import maskgit as fake

pytestmark = pytest.mark.usefixtures("no_network")

K, L, D, NCLASS = fake.N_EMBED, 16, 32, 10


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("maskgit")
    return fake.write(folder)


@pytest.fixture(scope="module")
def teacher(saved) -> MaskGitTeacher:
    paths, options = saved
    return load_teacher("maskgit", paths, options, "cpu")


def random_ids(batch: int = 3, seed: int = 0, with_mask: bool = True) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, K, (batch, L), generator=g)
    if with_mask:
        ids[torch.rand(batch, L, generator=g) < 0.4] = K
    return ids


def test_protocol_members_and_frozen(teacher):
    assert isinstance(teacher, Teacher)
    assert (teacher.V, teacher.mask_id, teacher.seq_len, teacher.token_shape) == (K, K, L, (L,))
    assert (teacher.depth, teacher.hidden_width, teacher.feature_len) == (2, D, L)
    assert (teacher.num_classes, teacher.image_size, teacher.conditioning) == (NCLASS, 8, "class")
    assert teacher.sampling == {"steps": 8, "cfg": 3.0, "temperature": 1.0, "randomize": 4.5}
    assert not teacher.backbone.training and not teacher.vqgan.training
    assert not any(p.requires_grad for p in teacher.backbone.parameters())
    assert not any(p.requires_grad for p in teacher.vqgan.parameters())
    assert tuple(teacher.mask_embedding().shape) == (D,)


def test_logits_keep_the_mask_column_as_table_5(teacher, saved):
    """Table 5: MaskGit's output logits are [B, L, V + 1], "mask token included"; the Di[M]O code
    takes its divergences and ψ's cross-entropy over all 1025 classes. mask_logit: false drops it."""
    ids, y = random_ids(), teacher.encode_condition(labels=torch.tensor([0, 4, 9]))
    logits, feats = teacher.forward_embeddings(teacher.backbone, teacher.embed_ids(ids), y, layers=(0, -1))
    assert teacher.mask_logit and logits.shape == (3, L, K + 1)
    assert [f.shape for f in feats] == [(3, L, D), (3, L, D)]
    full = teacher.backbone(ids.view(3, 4, 4), y)          # upstream's call: K + 1 columns
    assert full.shape == (3, L, K + 1)
    torch.testing.assert_close(logits, full, atol=1e-5, rtol=0)
    paths, options = saved
    without = load_teacher("maskgit", paths, {**options, "mask_logit": False}, "cpu")
    short = without.forward_embeddings(without.backbone, without.embed_ids(ids), y)[0]
    torch.testing.assert_close(short, full[..., :K], atol=1e-5, rtol=0)
    with pytest.raises(TeacherOptionError, match="mask_logit"):
        load_teacher("maskgit", paths, {**options, "mask_logit": 1}, "cpu")
    # the soft embedding of the mask column is the [MASK] row; a soft decode drops its share
    p = torch.softmax(logits, -1)
    rows = teacher.backbone.tok_emb.weight[:K + 1]
    torch.testing.assert_close(teacher.embed_probs(p), p @ rows)
    codes = p[..., :K] / p[..., :K].sum(-1, keepdim=True)
    torch.testing.assert_close(teacher.decode_probs(p), teacher.decode_probs(codes))
    # the last requested block's features differ from the first's
    assert not torch.allclose(feats[0], feats[1])


def test_dropped_label_is_the_null_class(teacher):
    ids, y = random_ids(), torch.tensor([1, 2, 3])
    drop = torch.tensor([True, False, True])
    y_before = y.clone()
    upstream = teacher.backbone(ids, y, drop_label=drop)
    assert torch.equal(y, y_before)                        # the labels are never written to
    mixed = torch.where(drop, teacher.null_condition(3), y)
    ours = teacher.forward_embeddings(teacher.backbone, teacher.embed_ids(ids), mixed)[0]
    torch.testing.assert_close(ours, upstream, atol=1e-5, rtol=0)
    assert teacher.null_condition(2).tolist() == [NCLASS, NCLASS]
    assert teacher.backbone.class_ids(teacher.null_condition(1)).item() == K + 1 + NCLASS


def test_encode_condition_copies_and_checks_labels(teacher):
    labels = torch.tensor([3, 7])
    cond = teacher.encode_condition(labels=labels)
    cond += 1
    assert labels.tolist() == [3, 7]
    with pytest.raises(ValueError, match="class labels"):
        teacher.encode_condition(labels=torch.tensor([NCLASS]))
    with pytest.raises(ValueError, match="class-conditioned"):
        teacher.encode_condition(prompts=["a cat"])


def test_one_hot_soft_path_equals_hard_path(teacher):
    ids = random_ids(with_mask=False)
    y = teacher.encode_condition(labels=torch.tensor([0, 5, 9]))
    p = F.one_hot(ids, K).float()
    torch.testing.assert_close(teacher.embed_probs(p), teacher.embed_ids(ids), atol=1e-5, rtol=0)
    hard = teacher.forward_embeddings(teacher.backbone, teacher.embed_ids(ids), y)[0]
    soft = teacher.forward_embeddings(teacher.backbone, teacher.embed_probs(p), y)[0]
    torch.testing.assert_close(soft, hard, atol=1e-5, rtol=0)
    images = teacher.decode_ids(ids)
    assert images.shape == (3, 3, 8, 8) and images.min() >= 0 and images.max() <= 1
    torch.testing.assert_close(teacher.decode_probs(p), images, atol=1e-5, rtol=0)


def test_decoder_matches_the_taming_decode_path(teacher):
    """decode_ids = (decoder(post_quant_conv(codebook[ids] as [B, C, h, w])) + 1) / 2, clamped."""
    ids = random_ids(with_mask=False)
    vq = teacher.vqgan
    z = vq.quantize.embedding.weight[ids].view(3, 4, 4, -1).permute(0, 3, 1, 2)
    expected = ((vq.decoder(vq.post_quant_conv(z)) + 1) / 2).clamp(0, 1)
    torch.testing.assert_close(teacher.decode_ids(ids), expected, atol=1e-5, rtol=0)
    # ids past the codebook ([MASK]) are clamped to K − 1 before the lookup, as upstream decodes
    masked = ids.clone()
    masked[:, 0] = K
    clamped = ids.clone()
    clamped[:, 0] = K - 1
    torch.testing.assert_close(teacher.decode_ids(masked), teacher.decode_ids(clamped))


def test_gradients_reach_p(teacher):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, L, K, generator=g, requires_grad=True)
    p = z.softmax(-1)
    y = teacher.encode_condition(labels=torch.tensor([1, 2]))
    logits, feats = teacher.forward_embeddings(teacher.backbone, teacher.embed_probs(p), y, layers=(-1,))
    (logits.logsumexp(-1).sum() + feats[0].square().mean()).backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    z2 = torch.randn(2, L, K, generator=g, requires_grad=True)
    teacher.decode_probs(z2.softmax(-1)).mean().backward()
    assert z2.grad is not None and z2.grad.abs().sum() > 0


def test_student_trains_with_frozen_embedding(teacher):
    student = teacher.make_student()
    assert student.training and student is not teacher.backbone
    assert not student.tok_emb.weight.requires_grad
    assert student.tok_emb.weight is not teacher.backbone.tok_emb.weight
    assert not teacher.backbone.tok_emb.weight.requires_grad and not teacher.backbone.training
    trainable = [n for n, p in student.named_parameters() if p.requires_grad]
    assert "bias" in trainable and any(n.startswith("transformer.layers.1.") for n in trainable)
    ids, y = random_ids(), teacher.encode_condition(labels=torch.tensor([0, 1, 2]))
    e = teacher.embed_ids(ids)
    ref = teacher.forward_embeddings(teacher.backbone, e, y, layers=(0,))
    out = teacher.forward_embeddings(student, e, y, layers=(0,))
    torch.testing.assert_close(out[0], ref[0], atol=1e-5, rtol=0)   # dropout 0 in the fake
    torch.testing.assert_close(out[1][0], ref[1][0], atol=1e-5, rtol=0)
    F.cross_entropy(out[0].reshape(-1, K + 1), ids.reshape(-1)).backward()   # [MASK] is a class
    block = student.transformer.layers[0][0].fn.mha.in_proj_weight
    assert block.grad is not None and block.grad.abs().sum() > 0
    assert student.tok_emb.weight.grad is None
    assert all(p.grad is None for p in teacher.backbone.parameters())


def test_load_round_trip_equals_the_saved_modules(teacher):
    net, vqgan = fake.build()
    ids, y = random_ids(), torch.tensor([0, 3, 9])
    with torch.no_grad():
        saved = net(ids, y)
    loaded = teacher.forward_embeddings(teacher.backbone, teacher.embed_ids(ids), y)[0]
    torch.testing.assert_close(loaded, saved, atol=1e-6, rtol=0)
    codes = random_ids(with_mask=False)
    with torch.no_grad():
        image = vqgan.decode_latents(vqgan.quantize.embedding(codes), (4, 4))
    torch.testing.assert_close(teacher.decode_ids(codes), ((image + 1) / 2).clamp(0, 1), atol=1e-6, rtol=0)


def test_published_files_are_weights_only_and_keep_their_extra_keys(saved):
    paths, _ = saved
    pth = torch.load(paths["transformer"], weights_only=True)
    assert {"iter", "global_epoch", "model_state_dict", "optimizer_state_dict"} <= set(pth)
    ckpt = torch.load(paths["vqgan"], weights_only=True)
    prefixes = {k.split(".")[0] + "." for k in ckpt["state_dict"]}
    assert prefixes == set(DECODER_PREFIXES) | set(IGNORED_PREFIXES)


def test_transformer_key_changes_fail_strictly(saved, tmp_path):
    paths, options = saved
    ckpt = torch.load(paths["transformer"], weights_only=True)
    sd = ckpt["model_state_dict"]
    del sd["transformer.layers.1.1.fn.net.3.bias"]
    sd["transformer.layers.2.0.norm.weight"] = torch.ones(D)
    broken = tmp_path / "MaskGIT_ImageNet_256.pth"
    torch.save(ckpt, broken)
    with pytest.raises(StateDictMismatch) as err:
        load_teacher("maskgit", {**paths, "transformer": str(broken)}, options, "cpu")
    assert "transformer.layers.1.1.fn.net.3.bias" in str(err.value)
    assert "transformer.layers.2.0.norm.weight" in str(err.value)


def test_vqgan_key_changes_fail_strictly(saved, tmp_path):
    """Only encoder./quant_conv./loss. keys are left out; any other stray key is an error."""
    paths, options = saved
    ckpt = torch.load(paths["vqgan"], weights_only=True)
    del ckpt["state_dict"]["decoder.up.0.block.1.conv2.weight"]
    ckpt["state_dict"]["discriminator.main.0.weight"] = torch.zeros(3)
    broken = tmp_path / "last.ckpt"
    torch.save(ckpt, broken)
    with pytest.raises(StateDictMismatch) as err:
        load_teacher("maskgit", {**paths, "vqgan": str(broken)}, options, "cpu")
    assert "decoder.up.0.block.1.conv2.weight" in str(err.value)
    assert "discriminator.main.0.weight" in str(err.value)


def test_missing_file_names_its_key(saved, tmp_path):
    paths, _ = saved
    with pytest.raises(TeacherFilesMissing) as err:
        check_paths("maskgit", {**paths, "vqgan": str(tmp_path / "nope.ckpt")})
    assert err.value.key == "teacher.paths.vqgan"
    with pytest.raises(TeacherFilesMissing) as err:
        check_paths("maskgit", {k: v for k, v in paths.items() if k != "vqgan_config"})
    assert err.value.key == "teacher.paths.vqgan_config"


def test_options_are_checked(saved):
    paths, options = saved
    with pytest.raises(TeacherOptionError) as err:
        load_teacher("maskgit", paths, {**options, "width": 32}, "cpu")
    assert err.value.key == "teacher.options.width"
    with pytest.raises(TeacherOptionError) as err:
        load_teacher("maskgit", paths, {**options, "codebook_size": 1024}, "cpu")
    assert err.value.key == "teacher.options.codebook_size"
    with pytest.raises(TeacherOptionError) as err:
        load_teacher("maskgit", paths, {**options, "img_size": 16}, "cpu")   # 4 tokens × f2 = 8 px
    assert err.value.key == "teacher.options.img_size"
    with pytest.raises(StateDictMismatch):                                   # wrong size -> shapes
        load_teacher("maskgit", paths, {**options, "mlp_dim": 48}, "cpu")


def test_published_defaults_build_the_published_shapes():
    """Full-size networks on the meta device: the 256-px transformer and the f16 VQGAN decoder."""
    with torch.device("meta"):
        net = MaskTransformer()
        ddconfig = {"ch": 128, "out_ch": 3, "ch_mult": [1, 1, 2, 2, 4], "num_res_blocks": 2,
                    "attn_resolutions": [16], "resolution": 256, "z_channels": 256, "dropout": 0.0}
        vqgan = VQGANDecoder(1024, 256, ddconfig)
    assert tuple(net.tok_emb.weight.shape) == (2026, 768)
    assert tuple(net.pos_emb.shape) == (1, 257, 768) and tuple(net.bias.shape) == (257, 2026)
    assert net.transformer.layers[0][0].fn.mha.num_heads == 16 and len(net.transformer.layers) == 24
    assert 174e6 < sum(p.numel() for p in net.parameters()) < 175e6
    assert all(k.startswith(DECODER_PREFIXES) for k in vqgan.state_dict())
    assert vqgan.downsampling == 16 and tuple(vqgan.quantize.embedding.weight.shape) == (1024, 256)
    assert PUBLISHED_SAMPLING[256]["steps"] == 8


def test_token_schedule_matches_adap_sche():
    # values of v1.0 Trainer/vit.py adap_sche (arccos), computed with the upstream function
    assert token_schedule(8, 256) == [1, 18, 26, 32, 38, 43, 48, 50]
    assert token_schedule(12, 256) == [1, 9, 13, 17, 19, 22, 24, 26, 28, 30, 32, 35]
    assert token_schedule(8, 256, "cosine") == [1, 12, 22, 32, 41, 47, 51, 50]
    assert token_schedule(2, 16) == [1, 15] and token_schedule(1, 16) == [16]
    # too many steps for the tokens: upstream stops once all are placed
    assert token_schedule(16, 16) == [1] * 14 + [2]
    with pytest.raises(ValueError):
        token_schedule(0, 16)


def test_sample_shape_range_and_determinism(teacher):
    cond = teacher.encode_condition(labels=torch.tensor([0, 5, 9]))
    a = teacher.sample(cond, steps=2, cfg=3.0, generator=torch.Generator().manual_seed(0))
    b = teacher.sample(cond, steps=2, cfg=3.0, generator=torch.Generator().manual_seed(0))
    c = teacher.sample(cond, steps=2, cfg=3.0, generator=torch.Generator().manual_seed(1))
    assert a.shape == (3, L) and a.dtype == torch.long
    assert int(a.min()) >= 0 and int(a.max()) < K
    assert torch.equal(a, b) and not torch.equal(a, c)
    for steps, cfg in ((1, 3.0), (5, 0.0)):
        out = teacher.sample(cond, steps=steps, cfg=cfg, generator=torch.Generator().manual_seed(0),
                             temperature=1.3, randomize=0.0)
        assert out.shape == (3, L) and int(out.max()) < K


def test_sample_cfg_ramp_and_null_batch(teacher, monkeypatch):
    """Step i of S runs the doubled batch [cond; null] and mixes (1 + w_i)c − w_i·u, w_i = w·i/(S−1)."""
    calls = []
    real = teacher.backbone.forward_embeddings

    def spy(e, y, layers=()):
        calls.append(y.clone())
        return real(e, y, layers)

    monkeypatch.setattr(teacher.backbone, "forward_embeddings", spy)
    cond = teacher.encode_condition(labels=torch.tensor([2, 6]))
    teacher.sample(cond, steps=3, cfg=3.0, generator=torch.Generator().manual_seed(0))
    assert [c.tolist() for c in calls] == [[2, 6, NCLASS, NCLASS]] * 3
    calls.clear()
    teacher.sample(cond, steps=3, cfg=0.0, generator=torch.Generator().manual_seed(0))
    assert [c.tolist() for c in calls] == [[2, 6]] * 3
