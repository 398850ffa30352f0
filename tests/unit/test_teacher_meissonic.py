"""The Meissonic adapter on a tiny random Meissonic written in the published diffusers layout."""
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from softdimo.checkpoints import StateDictMismatch
from softdimo.teachers import TeacherFilesMissing, TeacherOptionError, check_paths, load_teacher
from softdimo.teachers.meissonic_modules import MeissonicConfig, Transformer2DModel
from softdimo.teachers.protocol import Teacher
from tests.fakes import meissonic as fake

pytestmark = pytest.mark.usefixtures("no_network")

B = 2
PROMPTS = ["a red circle", "a photo of a cat"]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    folder = tmp_path_factory.mktemp("meissonic")
    paths, options = fake.write(folder)
    return folder, paths, options


@pytest.fixture
def teacher(no_network, written):
    _, paths, options = written
    return load_teacher("meissonic", paths, options, "cpu")


@pytest.fixture
def cond(teacher):
    return teacher.encode_condition(prompts=PROMPTS)


def random_ids(teacher, seed=0, masked=0.3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, teacher.V, (B, teacher.seq_len), generator=g)
    mask = torch.rand(B, teacher.seq_len, generator=g) < masked
    return torch.where(mask, teacher.mask_id, ids), mask


def copy_folder(written, tmp_path):
    folder, paths, options = written
    target = tmp_path / "Meissonic"
    shutil.copytree(paths["folder"], target)
    return target, options


def test_attributes_follow_the_config(teacher):
    assert isinstance(teacher, Teacher)
    assert (teacher.V, teacher.mask_id) == (16, 16)            # mask id = vocab_size − 1
    assert teacher.seq_len == 64 and teacher.token_shape == (64,) and teacher.grid_shape == (8, 8)
    assert teacher.feature_len == 16                            # 8×8 tokens, 2× down_block
    assert (teacher.depth, teacher.hidden_width) == (2, 32)
    assert (teacher.conditioning, teacher.num_classes, teacher.image_size) == ("text", 0, 16)
    assert teacher.sampling == {"steps": 64, "cfg": 9.0, "temperature": 1.0, "randomize": 2.0}


def test_teacher_is_frozen_and_in_eval_mode(teacher):
    for net in (teacher.backbone, teacher.vqvae):
        assert not net.training
        assert not any(p.requires_grad for p in net.parameters())


def test_logits_and_feature_shapes(teacher, cond):
    ids, _ = random_ids(teacher)
    logits, features = teacher.forward_embeddings(teacher.backbone, teacher.embed_ids(ids), cond, (0, -1))
    assert logits.shape == (B, teacher.seq_len, teacher.V)     # no [MASK] column
    assert [f.shape for f in features] == [(B, teacher.feature_len, teacher.hidden_width)] * 2
    assert not torch.equal(features[0], features[1])
    with pytest.raises(IndexError):
        teacher.forward_embeddings(teacher.backbone, teacher.embed_ids(ids), cond, (teacher.depth,))


def test_logits_are_the_modules_channels_first_logits_and_return_dict_quirk(teacher, cond):
    ids, _ = random_ids(teacher)
    logits, _ = teacher.forward_embeddings(teacher.backbone, teacher.embed_ids(ids), cond)
    micro = torch.tensor([[16.0, 16.0, 0.0, 0.0, 6.0]]).expand(B, -1)
    args = (ids.reshape(B, 8, 8), cond[:, :-1], cond[:, -1], torch.zeros(1))
    bare = teacher.backbone(*args, micro_conds=micro)             # return_dict=True: bare tensor
    assert isinstance(bare, torch.Tensor) and bare.shape == (B, teacher.V, 8, 8)
    wrapped = teacher.backbone(*args, micro_conds=micro, return_dict=False)
    assert isinstance(wrapped, tuple) and len(wrapped) == 1
    torch.testing.assert_close(logits, bare.reshape(B, teacher.V, -1).permute(0, 2, 1))


def test_one_hot_soft_path_equals_hard_path(teacher, cond):
    ids, mask = random_ids(teacher)
    codes = ids.clamp(max=teacher.V - 1)
    p = torch.nn.functional.one_hot(codes, teacher.V).float()
    soft = torch.where(mask[..., None], teacher.mask_embedding(), teacher.embed_probs(p))
    hard = teacher.embed_ids(ids)
    torch.testing.assert_close(soft, hard, atol=1e-5, rtol=0)
    soft_logits, _ = teacher.forward_embeddings(teacher.backbone, soft, cond)
    hard_logits, _ = teacher.forward_embeddings(teacher.backbone, hard, cond)
    torch.testing.assert_close(soft_logits, hard_logits, atol=1e-5, rtol=0)
    images = teacher.decode_ids(codes)
    assert images.shape == (B, 3, 16, 16) and images.min() >= 0 and images.max() <= 1
    torch.testing.assert_close(teacher.decode_probs(p), images, atol=1e-5, rtol=0)


def test_gradients_reach_p(teacher, cond):
    logits = torch.randn(B, teacher.seq_len, teacher.V, requires_grad=True)
    p = logits.softmax(-1)
    out, features = teacher.forward_embeddings(teacher.backbone, teacher.embed_probs(p), cond, (-1,))
    (out.square().mean() + features[0].mean()).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    logits.grad = None
    teacher.decode_probs(logits.softmax(-1)).mean().backward()
    assert logits.grad.abs().sum() > 0


def test_student_trains_with_its_embedding_frozen(teacher, cond):
    student = teacher.make_student()
    assert student.training and not teacher.backbone.training
    assert student.embed.embeddings.weight.requires_grad is False
    assert student.transformer_blocks[0].attn.to_q.weight.requires_grad
    ids, _ = random_ids(teacher)
    e = teacher.embed_ids(ids)
    before, _ = teacher.forward_embeddings(teacher.backbone, e, cond)
    out, features = teacher.forward_embeddings(student, e, cond, (0, -1))
    torch.testing.assert_close(out, before)                      # no dropout anywhere
    (out.square().mean() + sum(f.mean() for f in features)).backward()
    for block in (student.transformer_blocks[0], student.single_transformer_blocks[0]):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in block.parameters())
    assert student.embed.embeddings.weight.grad is None
    assert all(p.grad is None for p in teacher.backbone.parameters())


def test_saved_transformer_loads_with_the_same_logits(written, tmp_path):
    folder, options = copy_folder(written, tmp_path)
    torch.manual_seed(7)
    net = Transformer2DModel(MeissonicConfig.from_dict(fake.TRANSFORMER)).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    fake.write_transformer(folder / "transformer", net)
    loaded = load_teacher("meissonic", {"folder": folder}, options, "cpu")
    ids, _ = random_ids(loaded)
    cond = loaded.encode_condition(prompts=PROMPTS)
    micro = torch.tensor([[16.0, 16.0, 0.0, 0.0, 6.0]]).expand(B, -1)
    with torch.no_grad():
        expected = net(ids.reshape(B, 8, 8), cond[:, :-1], cond[:, -1], torch.zeros(1), micro_conds=micro)
    got, _ = loaded.forward_embeddings(loaded.backbone, loaded.embed_ids(ids), cond)
    torch.testing.assert_close(got, expected.flatten(2).transpose(1, 2), atol=1e-6, rtol=0)


@pytest.mark.parametrize("component", ["transformer", "vqvae"])
def test_checkpoint_with_missing_and_extra_keys_fails_naming_both(written, tmp_path, component):
    folder, options = copy_folder(written, tmp_path)
    weights = folder / component / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    removed = sorted(state)[0]
    del state[removed]
    state["extra.weight"] = torch.zeros(3)
    save_file(state, str(weights))
    with pytest.raises(StateDictMismatch) as error:
        load_teacher("meissonic", {"folder": folder}, options, "cpu")
    assert removed in str(error.value) and "extra.weight" in str(error.value)


def test_missing_files_name_their_config_key(written, tmp_path):
    _, paths, options = written
    with pytest.raises(TeacherFilesMissing) as error:
        check_paths("meissonic", {"folder": tmp_path / "absent"})
    assert error.value.key == "teacher.paths.folder"
    with pytest.raises(TeacherFilesMissing) as error:
        check_paths("meissonic", {"folder": paths["folder"], "text_features": tmp_path / "absent.st"})
    assert error.value.key == "teacher.paths.text_features"
    folder, _ = copy_folder(written, tmp_path)
    (folder / "vqvae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(TeacherFilesMissing) as error:
        load_teacher("meissonic", {"folder": folder}, options, "cpu")
    assert error.value.key == "teacher.paths.folder" and "vqvae" in str(error.value)


def test_options_are_checked(written):
    _, paths, options = written
    with pytest.raises(TeacherOptionError) as error:
        load_teacher("meissonic", paths, {**options, "sample_size": 4}, "cpu")
    assert error.value.key == "teacher.options.sample_size"
    with pytest.raises(TeacherOptionError) as error:           # 10 px -> an odd 5×5 token grid
        load_teacher("meissonic", paths, {"resolution": 10}, "cpu")
    assert error.value.key == "teacher.options.resolution"


def test_timestep_option_is_the_models_timestep_argument(written, teacher, cond):
    _, paths, options = written
    other = load_teacher("meissonic", paths, {**options, "timestep": 500.0}, "cpu")
    ids, _ = random_ids(teacher)
    e = teacher.embed_ids(ids)
    ours, _ = teacher.forward_embeddings(teacher.backbone, e, cond)
    theirs, _ = other.forward_embeddings(other.backbone, e, cond)
    assert not torch.allclose(ours, theirs)
    micro = torch.tensor([[16.0, 16.0, 0.0, 0.0, 6.0]]).expand(B, -1)
    with torch.no_grad():
        direct = other.backbone(ids.reshape(B, 8, 8), cond[:, :-1], cond[:, -1], torch.tensor([500.0]),
                                micro_conds=micro)
    torch.testing.assert_close(theirs, direct.flatten(2).transpose(1, 2))


def test_text_conditions(written, teacher, cond):
    folder, paths, options = written
    assert cond.shape == (B, fake.MAX_TEXT + 1, 32)             # hidden_states[-2] + text_embeds row
    assert not torch.equal(cond[0], cond[1])
    torch.testing.assert_close(teacher.null_condition(3), teacher.encode_condition(prompts=[""] * 3))
    with pytest.raises(ValueError):
        teacher.encode_condition(labels=torch.tensor([1, 2]))
    precomputed = load_teacher("meissonic", {**paths, "text_features": folder / fake.TEXT_FEATURES},
                               options, "cpu")
    torch.testing.assert_close(precomputed.encode_condition(prompts=PROMPTS), cond)
    torch.testing.assert_close(precomputed.null_condition(B), teacher.null_condition(B))
    with pytest.raises(KeyError):
        precomputed.encode_condition(prompts=["a prompt nobody encoded"])


def test_without_text_encoder_prompts_fail_clearly(written, tmp_path):
    folder, options = copy_folder(written, tmp_path)
    shutil.rmtree(folder / "text_encoder")
    teacher = load_teacher("meissonic", {"folder": folder}, options, "cpu")
    with pytest.raises(ValueError, match="text_features"):
        teacher.encode_condition(prompts=PROMPTS)


def test_sample_is_deterministic_for_a_seed(teacher, cond):
    def run(seed):
        return teacher.sample(cond, steps=2, cfg=9.0, generator=torch.Generator().manual_seed(seed))
    tokens = run(0)
    assert tokens.shape == (B, teacher.seq_len) and tokens.dtype == torch.long
    assert tokens.min() >= 0 and tokens.max() < teacher.V
    assert torch.equal(tokens, run(0))
    assert not torch.equal(tokens, run(1))
    unguided = teacher.sample(cond, steps=2, cfg=1.0, generator=torch.Generator().manual_seed(0))
    assert unguided.shape == tokens.shape and unguided.max() < teacher.V


def test_sampler_step_keeps_the_cosine_count_masked(teacher):
    steps, length = 4, teacher.seq_len
    ids = torch.full((B, length), teacher.mask_id)
    g = torch.Generator().manual_seed(0)
    for i in range(steps):
        logits = torch.randn(B, length, teacher.V, generator=g)
        before = ids
        ids = teacher._unmask_step(ids, logits, i, steps, 2.0 * (1 - i / (steps - 1)), g)
        known = before != teacher.mask_id
        assert torch.equal(ids[known], before[known])              # decided tokens stay
        expected = 0 if i == steps - 1 else math.floor(length * math.cos(math.pi / 2 * (i + 1) / steps))
        assert (ids == teacher.mask_id).sum(-1).tolist() == [expected] * B
