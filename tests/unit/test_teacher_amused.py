"""aMUSEd adapter: diffusers' UVit2DModel + VQModel from a fake diffusers folder (tests/fakes/amused.py)."""
from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from softdimo.checkpoints import StateDictMismatch
from softdimo.teachers import (TeacherFilesMissing, TeacherOptionError, check_paths, load_teacher)
from softdimo.teachers.amused import AmusedTeacher
from softdimo.teachers.protocol import Teacher
from tests.fakes import amused as fake

pytestmark = pytest.mark.usefixtures("no_network")

PROMPTS = ["a red circle", "a photo of a cat"]


@pytest.fixture(scope="module", params=[True, False], ids=["512-like", "256-like"])
def written(request, tmp_path_factory):
    """(downsample, paths, options) of one fake folder per variant."""
    folder = tmp_path_factory.mktemp(f"amused_{request.param}")
    paths, options = fake.write(folder, downsample=request.param)
    return request.param, paths, options


@pytest.fixture(scope="module")
def teacher(written) -> AmusedTeacher:
    return load_teacher("amused", written[1], written[2], "cpu")


def some_ids(teacher: AmusedTeacher, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, teacher.V, (2, teacher.seq_len), generator=g)
    ids[0, :5] = teacher.mask_id                     # a partly masked state, as the trainer feeds
    return ids


def upstream_logits(teacher: AmusedTeacher, net, ids: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """UVit2DModel.forward itself, logits permuted to [B, L, V]."""
    text, pooled = teacher._unpack(cond)
    micro = teacher.micro_conds(ids.shape[0], ids.device, text.dtype)
    out = net(ids.reshape(ids.shape[0], *teacher.grid_shape), text, pooled, micro)
    return out.flatten(2).transpose(1, 2)


def test_protocol_attributes(teacher, written):
    downsample = written[0]
    assert isinstance(teacher, Teacher)
    assert (teacher.V, teacher.mask_id, teacher.seq_len) == (8, fake.MASK_ID, 16)
    assert teacher.token_shape == (16,) and teacher.grid_shape == (4, 4)
    assert teacher.feature_len == (4 if downsample else 16)     # the 512 model halves h and w
    assert (teacher.depth, teacher.hidden_width, teacher.num_classes) == (2, 8, 0)
    assert teacher.conditioning == "text" and teacher.image_size == 4
    assert teacher.sampling == {"steps": 12, "cfg": 10.0, "temperature": 1.0, "randomize": 2.0}
    # §9.3: frozen and in eval mode
    for net in (teacher.backbone, teacher.vqvae):
        assert not net.training and not any(p.requires_grad for p in net.parameters())


def test_shapes_and_hard_path_is_upstream_forward(teacher):
    cond = teacher.encode_condition(prompts=PROMPTS)
    assert cond.shape == (2, 78, 8)                  # 77 CLIP states + the pooled row
    ids = some_ids(teacher)
    logits, feats = teacher.forward_embeddings(teacher.backbone, teacher.embed_ids(ids), cond, (0, -1))
    assert logits.shape == (2, teacher.seq_len, teacher.V)      # no mask column in aMUSEd's head
    assert [f.shape for f in feats] == [(2, teacher.feature_len, teacher.hidden_width)] * 2
    assert not torch.allclose(feats[0], feats[1])
    torch.testing.assert_close(logits, upstream_logits(teacher, teacher.backbone, ids, cond),
                               atol=1e-5, rtol=0)
    with pytest.raises(IndexError):
        teacher.forward_embeddings(teacher.backbone, teacher.embed_ids(ids), cond, (teacher.depth,))


def test_one_hot_soft_path_equals_hard_path(teacher):
    cond = teacher.encode_condition(prompts=PROMPTS)
    ids = torch.randint(0, teacher.V, (2, teacher.seq_len), generator=torch.Generator().manual_seed(1))
    p = F.one_hot(ids, teacher.V).float()
    torch.testing.assert_close(teacher.embed_probs(p), teacher.embed_ids(ids), atol=1e-5, rtol=0)
    hard = teacher.forward_embeddings(teacher.backbone, teacher.embed_ids(ids), cond)[0]
    soft = teacher.forward_embeddings(teacher.backbone, teacher.embed_probs(p), cond)[0]
    torch.testing.assert_close(soft, hard, atol=1e-5, rtol=0)
    torch.testing.assert_close(teacher.mask_embedding(),
                               teacher.embed_ids(torch.tensor([[teacher.mask_id]]))[0, 0])
    images = teacher.decode_ids(ids)
    assert images.shape == (2, 3, teacher.image_size, teacher.image_size)
    assert images.min() >= 0 and images.max() <= 1
    torch.testing.assert_close(teacher.decode_probs(p), images, atol=1e-5, rtol=0)
    # the pipeline's own decode: VQModel.decode looking the codes up (lookup_from_codebook)
    shape = (2, *teacher.grid_shape, teacher.vqvae.config.latent_channels)
    upstream = teacher.vqvae.decode(ids.reshape(-1), force_not_quantize=True, shape=shape).sample
    torch.testing.assert_close(images, upstream.clip(0, 1), atol=1e-5, rtol=0)


def test_gradients_reach_p(teacher):
    cond = teacher.encode_condition(prompts=PROMPTS)
    z = torch.randn(2, teacher.seq_len, teacher.V, requires_grad=True)
    p = z.softmax(-1)
    logits = teacher.forward_embeddings(teacher.backbone, teacher.embed_probs(p), cond)[0]
    (g_logits,) = torch.autograd.grad(logits.square().sum(), z)
    (g_image,) = torch.autograd.grad(teacher.decode_probs(z.softmax(-1)).sum(), z)
    assert g_logits.abs().sum() > 0 and g_image.abs().sum() > 0


def test_student_trains_with_frozen_embedding(teacher):
    cond = teacher.encode_condition(prompts=PROMPTS)
    student = teacher.make_student()
    assert student.training and student is not teacher.backbone
    assert not student.embed.embeddings.weight.requires_grad
    e = teacher.embed_ids(some_ids(teacher))
    logits = teacher.forward_embeddings(student, e, cond)[0]
    torch.testing.assert_close(logits, teacher.forward_embeddings(teacher.backbone, e, cond)[0])
    logits.square().mean().backward()
    for block in (student.transformer_layers[0], student.down_block, student.mlm_layer):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in block.parameters())
    assert student.embed.embeddings.weight.grad is None
    assert all(p.grad is None for p in teacher.backbone.parameters())


def test_round_trip_gives_the_saved_modules(teacher, written):
    downsample = written[0]
    with torch.random.fork_rng():
        torch.manual_seed(0)                         # fake.write's default seed
        transformer, vqvae, _ = fake.build(downsample)
    cond = teacher.encode_condition(prompts=PROMPTS)
    ids = some_ids(teacher)
    torch.testing.assert_close(teacher.forward_embeddings(teacher.backbone, teacher.embed_ids(ids), cond)[0],
                               upstream_logits(teacher, transformer, ids, cond), atol=1e-5, rtol=0)
    book = vqvae.quantize.embedding.weight
    torch.testing.assert_close(teacher.vqvae.quantize.embedding.weight, book)
    codes = ids.clamp(max=teacher.V - 1)
    shape = (2, *teacher.grid_shape, book.shape[1])
    expected = vqvae.decode(codes.reshape(-1), force_not_quantize=True, shape=shape).sample.clip(0, 1)
    torch.testing.assert_close(teacher.decode_ids(codes), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("part", ["transformer", "vqvae"])
def test_checkpoint_key_mismatch_names_both_keys(written, tmp_path, part):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "amused"
    shutil.copytree(written[1]["folder"], folder)
    weights = folder / part / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    dropped = sorted(state)[0]
    state.pop(dropped)
    state["not_a_real.weight"] = torch.zeros(1)
    save_file(state, str(weights))
    with pytest.raises(StateDictMismatch) as err:
        load_teacher("amused", {"folder": folder}, {}, "cpu")
    assert dropped in str(err.value) and "not_a_real.weight" in str(err.value)


def test_missing_files_name_their_key(written, tmp_path):
    with pytest.raises(TeacherFilesMissing) as err:
        check_paths("amused", {"folder": str(tmp_path / "absent")})
    assert err.value.key == "teacher.paths.folder"
    with pytest.raises(TeacherFilesMissing) as err:
        check_paths("amused", {"folder": str(written[1]["folder"]),
                               "text_features": str(tmp_path / "absent.safetensors")})
    assert err.value.key == "teacher.paths.text_features"
    folder = tmp_path / "amused"
    shutil.copytree(written[1]["folder"], folder)
    (folder / "vqvae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(TeacherFilesMissing) as err:
        load_teacher("amused", {"folder": folder}, {}, "cpu")
    assert err.value.key == "teacher.paths.folder" and "vqvae" in str(err.value)


def test_sample_is_the_amused_scheduler(teacher):
    """Our loop against AmusedScheduler.step driven by UVit2DModel.forward, same seed: same tokens."""
    from diffusers import AmusedScheduler

    cond = teacher.encode_condition(prompts=PROMPTS)
    tokens = teacher.sample(cond, 2, 10.0, torch.Generator().manual_seed(0))
    assert tokens.shape == (2, teacher.seq_len) and tokens.dtype == torch.long
    assert tokens.min() >= 0 and tokens.max() < teacher.V
    assert torch.equal(tokens, teacher.sample(cond, 2, 10.0, torch.Generator().manual_seed(0)))

    steps, g = 5, torch.Generator().manual_seed(3)
    scheduler = AmusedScheduler(mask_token_id=teacher.mask_id)
    scheduler.set_timesteps(steps, (2, 0))
    null = teacher.null_condition(2)
    latents = torch.full((2, *teacher.grid_shape), teacher.mask_id)
    with torch.no_grad():
        for t in scheduler.timesteps:
            flat = latents.reshape(2, -1)
            c, u = (upstream_logits(teacher, teacher.backbone, flat, x) for x in (cond, null))
            guided = (u + 10.0 * (c - u)).transpose(1, 2).reshape(2, teacher.V, *teacher.grid_shape)
            latents = scheduler.step(guided, t, latents, generator=g).prev_sample
    mine = teacher.sample(cond, steps, 10.0, torch.Generator().manual_seed(3))
    assert torch.equal(mine, latents.reshape(2, -1))
    assert not torch.equal(mine, teacher.sample(cond, steps, 10.0, torch.Generator().manual_seed(4)))


def test_precomputed_text_features(written):
    paths = {**written[1], "text_features": written[1]["folder"].parent / "text_features.safetensors"}
    from_file = load_teacher("amused", paths, {}, "cpu")
    from_encoder = load_teacher("amused", written[1], {}, "cpu")
    assert not hasattr(from_file.text_encoder, "model")          # CLIP was not loaded
    torch.testing.assert_close(from_file.encode_condition(prompts=PROMPTS),
                               from_encoder.encode_condition(prompts=PROMPTS))
    torch.testing.assert_close(from_file.null_condition(3), from_encoder.null_condition(3))
    with pytest.raises(KeyError, match="a blue square"):
        from_file.encode_condition(prompts=["a blue square"])


def test_conditions_and_options(teacher):
    with pytest.raises(ValueError, match="text-conditioned"):
        teacher.encode_condition(labels=torch.tensor([0, 1]))
    bare = AmusedTeacher(teacher.backbone, teacher.vqvae, teacher.mask_id, text_encoder=None)
    with pytest.raises(ValueError, match="text_features"):
        bare.encode_condition(prompts=PROMPTS)
    null = teacher.null_condition(2)
    assert null.shape == (2, 78, 8) and torch.equal(null[0], null[1])
    assert not torch.allclose(null, teacher.encode_condition(prompts=PROMPTS))
    with pytest.raises(ValueError, match="condition must be"):
        teacher.forward_embeddings(teacher.backbone, teacher.embed_ids(some_ids(teacher)), null[:, :, :4])


def test_options(written):
    with pytest.raises(TeacherOptionError) as err:
        load_teacher("amused", written[1], {"guidance": 3}, "cpu")
    assert err.value.key == "teacher.options.guidance"
    plain = load_teacher("amused", written[1], {}, "cpu")
    other = load_teacher("amused", written[1], {"aesthetic_score": 4.0}, "cpu")
    cond = plain.encode_condition(prompts=PROMPTS)
    e = plain.embed_ids(some_ids(plain))
    assert not torch.allclose(plain.forward_embeddings(plain.backbone, e, cond)[0],
                              other.forward_embeddings(other.backbone, e, cond)[0])
