"""MaskGen-VQ + TA-TiTok adapter: vendored modules with diffusers blocks, from fake HubMixin folders."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from softdimo.checkpoints import StateDictMismatch
from softdimo.teachers import TeacherFilesMissing, TeacherOptionError, check_paths, load_teacher
from softdimo.teachers.maskgen import MaskGenTeacher, mask_ratio
from softdimo.teachers.maskgen_modules import MaskGenConfig, MaskGenVQ, sinusoidal_embedding
from softdimo.teachers.protocol import Teacher
from tests.fakes import maskgen as fake

pytestmark = pytest.mark.usefixtures("no_network")

PROMPTS = ["a red circle", "a photo of a cat"]
V, L, T, C, D = fake.V, fake.L, fake.T, fake.C, fake.D


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    folder = tmp_path_factory.mktemp("maskgen")
    paths, options = fake.write(folder)
    return folder, paths, options


@pytest.fixture(scope="module")
def teacher(written) -> MaskGenTeacher:
    _, paths, options = written
    return load_teacher("maskgen", paths, options, "cpu")


def some_ids(seed: int = 0, batch: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (batch, L), generator=g)
    ids[:, ::3] = V                                   # some [MASK] positions
    return ids


def test_protocol_members_and_frozen(teacher):
    assert isinstance(teacher, Teacher)
    assert (teacher.V, teacher.mask_id, teacher.seq_len, teacher.token_shape) == (V, V, L, (L,))
    assert (teacher.depth, teacher.hidden_width, teacher.feature_len) == (2, D, L)
    assert teacher.conditioning == "text" and teacher.num_classes == 0 and teacher.image_size == fake.CROP
    assert teacher.sampling == {"steps": 16, "cfg": 12.0, "temperature": 1.0, "randomize": 2.0}
    assert teacher.backbone.embeddings.weight.shape == (V + 1 + 1 + 1, D)     # codes, mask, class, null
    # pitfall §9.3: the teacher stays in eval mode and frozen
    assert not teacher.backbone.training and not teacher.tokenizer.training
    assert not any(p.requires_grad for p in teacher.backbone.parameters())
    assert teacher.backbone.lm_head.weight is teacher.backbone.embeddings.weight


def test_logits_and_feature_shapes(teacher):
    cond = teacher.encode_condition(prompts=PROMPTS)
    assert cond.shape == (2, 2 * T + 2, C)
    logits, feats = teacher.forward_embeddings(teacher.backbone, teacher.embed_ids(some_ids()), cond, (0, -1))
    assert logits.shape == (2, L, V)
    assert [f.shape for f in feats] == [(2, L, D)] * 2
    assert not torch.allclose(feats[0], feats[1])
    text, _, pooled, aesthetic = teacher.split_condition(cond)
    assert torch.allclose(logits, teacher.backbone(some_ids(), text, pooled, aesthetic), atol=1e-6)
    with pytest.raises(ValueError, match="out of range"):
        teacher.forward_embeddings(teacher.backbone, teacher.embed_ids(some_ids()), cond, (2,))


def test_condition_changes_logits(teacher):
    e = teacher.embed_ids(some_ids())
    a = teacher.forward_embeddings(teacher.backbone, e, teacher.encode_condition(prompts=PROMPTS))[0]
    b = teacher.forward_embeddings(teacher.backbone, e, teacher.null_condition(2))[0]
    assert not torch.allclose(a, b)


def test_one_hot_soft_path_equals_hard_path(teacher):
    ids = some_ids()
    cond = teacher.encode_condition(prompts=PROMPTS)
    real = ids != V
    p = F.one_hot(ids.clamp(max=V - 1), V).float()
    e_soft = torch.where(real[..., None], teacher.embed_probs(p), teacher.mask_embedding())
    e_hard = teacher.embed_ids(ids)
    assert torch.allclose(e_soft, e_hard, atol=1e-5)
    hard = teacher.forward_embeddings(teacher.backbone, e_hard, cond, (0, 1))
    soft = teacher.forward_embeddings(teacher.backbone, e_soft, cond, (0, 1))
    assert torch.allclose(soft[0], hard[0], atol=1e-5)
    assert all(torch.allclose(s, h, atol=1e-5) for s, h in zip(soft[1], hard[1]))
    codes = ids.clamp(max=V - 1)
    images = teacher.decode_ids(codes, cond)
    assert images.shape == (2, 3, fake.CROP, fake.CROP) and 0 <= images.min() and images.max() <= 1
    assert torch.allclose(teacher.decode_probs(F.one_hot(codes, V).float(), cond), images, atol=1e-5)


def test_gradients_reach_p(teacher):
    cond = teacher.encode_condition(prompts=PROMPTS)
    z = torch.randn(2, L, V, requires_grad=True)
    p = torch.softmax(z, dim=-1)
    logits = teacher.forward_embeddings(teacher.backbone, teacher.embed_probs(p), cond)[0]
    (g_teacher,) = torch.autograd.grad(logits.square().mean(), z)
    assert g_teacher.abs().sum() > 0
    (g_decode,) = torch.autograd.grad(teacher.decode_probs(torch.softmax(z, -1), cond).mean(), z)
    assert g_decode.abs().sum() > 0
    assert not any(p.grad is not None for p in teacher.backbone.parameters())


def test_student_trains_with_frozen_embedding(teacher):
    cond = teacher.encode_condition(prompts=PROMPTS)
    e = teacher.embed_ids(some_ids())
    student = teacher.make_student()
    # the student is in train mode: MaskGen upstream would re-mask its input here, ours must not
    assert student.training and not student.embeddings.weight.requires_grad
    assert student.lm_head.weight is student.embeddings.weight                 # tying survives the copy
    assert student.embeddings.weight is not teacher.backbone.embeddings.weight
    s_logits, s_feats = teacher.forward_embeddings(student, e, cond, (-1,))
    t_logits, t_feats = teacher.forward_embeddings(teacher.backbone, e, cond, (-1,))
    assert torch.allclose(s_logits, t_logits, atol=1e-6) and torch.allclose(s_feats[0], t_feats[0], atol=1e-6)
    s_logits.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.blocks[0].parameters())
    assert student.embeddings.weight.grad is None
    assert not teacher.backbone.training


def test_round_trip_matches_hub_mixin_loading(written, teacher):
    """The files load like PyTorchModelHubMixin loads them (safetensors load_model, shared names)."""
    from safetensors import safe_open
    from safetensors.torch import load_model

    folder, _, _ = written
    config = json.loads((folder / "generator" / "config.json").read_text())
    reference = MaskGenVQ(MaskGenConfig.from_dict(config)).eval()
    load_model(reference, str(folder / "generator" / "model.safetensors"))
    cond = teacher.encode_condition(prompts=PROMPTS)
    text, _, pooled, aesthetic = teacher.split_condition(cond)
    assert torch.allclose(reference(some_ids(), text, pooled, aesthetic),
                          teacher.backbone(some_ids(), text, pooled, aesthetic), atol=1e-6)
    with safe_open(str(folder / "generator" / "model.safetensors"), "pt") as f:
        assert "embeddings.weight" in f.keys() and "lm_head.weight" not in f.keys()
    with safe_open(str(folder / "tokenizer" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert {"latent_tokens", "encoder.patch_embed.weight", "decoder.ffn.0.weight"} <= keys
        assert torch.equal(f.get_tensor("quantize.embedding.weight"),
                           teacher.tokenizer.quantize.embedding.weight)


def test_checkpoint_key_mismatch_names_both_keys(written, tmp_path):
    from safetensors.torch import load_file, save_file

    folder, paths, options = written
    shutil.copytree(folder / "generator", tmp_path / "generator")
    file = tmp_path / "generator" / "model.safetensors"
    state = load_file(str(file))
    del state["pos_embed"]
    state["bogus.weight"] = torch.zeros(1)
    save_file(state, str(file))
    with pytest.raises(StateDictMismatch, match="pos_embed") as err:
        load_teacher("maskgen", {**paths, "generator": str(tmp_path / "generator")}, options, "cpu")
    assert "bogus.weight" in str(err.value)


def test_missing_files_name_their_key(written, tmp_path):
    _, paths, options = written
    with pytest.raises(TeacherFilesMissing) as err:
        check_paths("maskgen", {**paths, "generator": str(tmp_path / "absent")})
    assert err.value.key == "teacher.paths.generator"
    with pytest.raises(TeacherFilesMissing) as err:
        load_teacher("maskgen", {**paths, "tokenizer": str(tmp_path)}, options, "cpu")   # empty folder
    assert err.value.key == "teacher.paths.tokenizer"
    with pytest.raises(TeacherOptionError, match="teacher.options.cfg_scale"):
        load_teacher("maskgen", paths, {"cfg_scale": 3}, "cpu")


def test_sample_shape_range_and_determinism(teacher):
    cond = teacher.encode_condition(prompts=PROMPTS)
    run = lambda seed: teacher.sample(cond, 2, 12.0, torch.Generator().manual_seed(seed))
    a, b = run(0), run(0)
    assert a.shape == (2, L) and a.dtype == torch.long and 0 <= a.min() and a.max() < V
    assert torch.equal(a, b)
    # with a weak guidance and strong Gumbel noise the seed matters
    noisy = [teacher.sample(cond, 2, 1.0, torch.Generator().manual_seed(s), randomize=20.0) for s in range(4)]
    assert any(not torch.equal(noisy[0], o) for o in noisy[1:])
    assert teacher.sample(cond, 16, 12.0, torch.Generator().manual_seed(0)).max() < V


def test_precomputed_text_features(teacher):
    rows = fake.text_features()
    cond = teacher.encode_condition(prompts=PROMPTS)
    assert torch.equal(cond, rows[[fake.PROMPTS.index(p) for p in PROMPTS]])
    assert torch.equal(teacher.null_condition(3), rows[[0, 0, 0]])
    with pytest.raises(KeyError, match="no precomputed features"):
        teacher.encode_condition(prompts=["an unknown prompt"])
    with pytest.raises(ValueError, match="text-conditioned"):
        teacher.encode_condition(labels=torch.tensor([1, 2]))


def test_no_text_source_is_a_clear_error(teacher):
    bare = MaskGenTeacher(teacher.backbone, teacher.tokenizer)
    with pytest.raises(ValueError, match="teacher.paths.text_encoder"):
        bare.encode_condition(prompts=PROMPTS)


def test_decode_without_cond_uses_the_empty_prompts_guidance(teacher):
    ids = some_ids().clamp(max=V - 1)
    cond = teacher.encode_condition(prompts=PROMPTS)
    with_cond = teacher.decode_ids(ids, cond)
    null_images = teacher.decode_ids(ids, teacher.null_condition(2))
    assert not torch.allclose(with_cond, null_images)
    # no hidden state: a condition used before does not leak into a decode without one
    teacher.forward_embeddings(teacher.backbone, teacher.embed_ids(ids), cond)
    assert torch.equal(teacher.decode_ids(ids), null_images)
    p = F.one_hot(ids, V).float()
    assert torch.allclose(teacher.decode_probs(p), null_images, atol=1e-5)


def test_condition_packing_and_aesthetic_row(teacher):
    pen, fin, pooled = torch.randn(2, T, C), torch.randn(2, T, C), torch.randn(2, C)
    cond = teacher.pack_condition(pen, fin, pooled, 6.5)
    a, b, c, s = teacher.split_condition(cond)
    assert torch.equal(a, pen) and torch.equal(b, fin) and torch.equal(c, pooled)
    assert torch.equal(s, torch.full((2,), 6.5))
    e = teacher.embed_ids(some_ids())
    low = teacher.pack_condition(pen, fin, pooled, 3.0)
    assert not torch.allclose(teacher.forward_embeddings(teacher.backbone, e, cond)[0],
                              teacher.forward_embeddings(teacher.backbone, e, low)[0])
    with pytest.raises(ValueError, match=r"\[B, 12, 24\]"):
        teacher.split_condition(torch.zeros(2, T, C))


def test_schedule_and_micro_condition_formulas():
    assert mask_ratio(1.0) == 0.0 and mask_ratio(0.0) == 1.0
    assert abs(mask_ratio(0.5) - 2 / 3) < 1e-9                      # arccos(0.5) / (π/2)
    emb = sinusoidal_embedding(torch.tensor([650.0]), 8)
    freqs = torch.exp(-torch.log(torch.tensor(1000.0)) * torch.arange(4) / 4)
    assert torch.allclose(emb, torch.cat([torch.sin(650 * freqs), torch.cos(650 * freqs)])[None])


def tiny_open_clip():
    """A tiny open_clip CLIP (text width C, context T) and its text-feature wrapper."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
    from open_clip.tokenizer import SimpleTokenizer

    from softdimo.teachers.maskgen_text import OpenClipText

    torch.manual_seed(0)
    model = CLIP(embed_dim=C, quick_gelu=True,
                 vision_cfg=CLIPVisionCfg(layers=1, width=32, patch_size=8, image_size=16, head_width=16),
                 text_cfg=CLIPTextCfg(context_length=T, vocab_size=49408, width=C, heads=2, layers=2))
    return model, OpenClipText(model, SimpleTokenizer(context_length=T))


def test_open_clip_text_features_match_open_clip():
    """The three text tensors from one pass: pooled = open_clip's encode_text, final = ln_final states."""
    model, encoder = tiny_open_clip()
    assert model.visual is None                      # the image tower is dropped
    penultimate, final, pooled = encoder(PROMPTS)
    ids = encoder.tokenizer(PROMPTS)
    assert penultimate.shape == final.shape == (2, T, C) and pooled.shape == (2, C)
    assert torch.allclose(pooled, model.encode_text(ids), atol=1e-5)
    x = model.token_embedding(ids) + model.positional_embedding
    assert torch.allclose(final, model.ln_final(model.transformer(x, attn_mask=model.attn_mask)), atol=1e-5)
    x = x.clone()
    for block in model.transformer.resblocks[:-1]:
        x = block(x, attn_mask=model.attn_mask)
    assert torch.allclose(penultimate, x, atol=1e-5)


def test_text_encoder_path_packs_condition_with_aesthetic_option(teacher):
    _, encoder = tiny_open_clip()
    live = MaskGenTeacher(teacher.backbone, teacher.tokenizer, encoder, aesthetic_score=5.0)
    penultimate, final, pooled = encoder(PROMPTS)
    cond = live.encode_condition(prompts=PROMPTS)
    text, guidance, pooled_row, aesthetic = live.split_condition(cond)
    assert torch.equal(text, penultimate) and torch.equal(guidance, final) and torch.equal(pooled_row, pooled)
    assert torch.equal(aesthetic, torch.full((2,), 5.0)) and torch.all(cond[:, 2 * T + 1, 1:] == 0)
    assert torch.allclose(live.null_condition(2)[:, :T], encoder([""] * 2)[0], atol=1e-6)
    assert MaskGenTeacher(teacher.backbone, teacher.tokenizer, encoder).aesthetic_score == fake.AESTHETIC
    with pytest.raises(TeacherOptionError, match="aesthetic_score"):
        load_teacher("maskgen", {"generator": ".", "tokenizer": "."}, {"aesthetic_score": "high"}, "cpu")
