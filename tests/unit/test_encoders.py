"""Each family's image encoder (softdimo.teachers.encoding) on the tiny random fakes in the
published file layouts: the same files as the teacher, ids in the teacher's layout and range, and
encode -> decode equal to the tokenizer's own quantised reconstruction."""
from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
from PIL import Image

from softdimo.checkpoints import StateDictMismatch
from softdimo.teachers import TeacherFilesMissing, load_teacher
from softdimo.teachers.encoding import ENCODERS, Encoder, Preprocess, load_encoder, prepare_image

pytestmark = pytest.mark.usefixtures("no_network")
FAMILIES = ("maskgit", "maskbit", "maskgen", "amused", "meissonic")


@pytest.fixture(scope="module")
def fakes(tmp_path_factory):
    """kind -> (paths, options, encoder, teacher), every fake written once."""
    out = {}
    for kind in FAMILIES:
        paths, options = importlib.import_module(f"tests.fakes.{kind}").write(tmp_path_factory.mktemp(kind))
        paths = {k: str(v) for k, v in paths.items()}
        out[kind] = (paths, options, load_encoder(kind, paths, options),
                     load_teacher(kind, paths, options, "cpu"))
    return out


def images(size: int, n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", FAMILIES)
def test_ids_match_the_teacher_layout(fakes, kind):
    _, _, enc, teacher = fakes[kind]
    assert isinstance(enc, Encoder) and enc.kind == kind
    assert (enc.V, enc.seq_len, enc.preprocess.size) == (teacher.V, teacher.seq_len, teacher.image_size)
    x = images(enc.preprocess.size, n=4)
    ids = enc.encode(x)
    assert ids.shape == (4, teacher.seq_len) and ids.dtype == torch.long
    assert 0 <= int(ids.min()) and int(ids.max()) < teacher.V
    assert torch.equal(ids, enc.encode(x))                       # deterministic
    assert len(ids.unique()) > 1                                 # the images are not all one code
    assert torch.equal(enc.encode(x[1:2]), ids[1:2])             # a row does not depend on the batch


def test_maskgit_round_trip_is_the_vqmodel_reconstruction(fakes):
    _, _, enc, teacher = fakes["maskgit"]
    x = images(enc.preprocess.size)
    vq = enc.vqgan
    with torch.no_grad():
        h = vq.quant_conv(vq.encoder(x * 2 - 1))                                 # [B, C, h, w]
        flat = h.permute(0, 2, 3, 1).reshape(-1, h.shape[1])
        ids = torch.cdist(flat, vq.quantize.embedding.weight).argmin(1).view(x.shape[0], -1)
        zq = vq.quantize.embedding.weight[ids.view(-1)].view(h.shape[0], h.shape[2], h.shape[3], -1)
        recon = ((teacher.vqgan.decode(zq.permute(0, 3, 1, 2)) + 1) / 2).clamp(0, 1)
    assert torch.equal(enc.encode(x), ids)
    torch.testing.assert_close(teacher.decode_ids(ids), recon, atol=1e-5, rtol=0)


def test_maskbit_groups_are_the_bits_the_decoder_takes(fakes):
    _, _, enc, teacher = fakes["maskbit"]
    x = images(enc.preprocess.size)
    with torch.no_grad():
        bits = torch.where(enc.tokenizer.encoder(x) > 0, 1.0, -1.0)              # LFQ's sign
        recon = enc.tokenizer.decode(bits).clamp(0, 1)
    torch.testing.assert_close(teacher.decode_ids(enc.encode(x)), recon, atol=1e-5, rtol=0)


def test_maskgen_round_trip_is_the_quantized_reconstruction(fakes):
    _, _, enc, teacher = fakes["maskgen"]
    x = images(enc.preprocess.size)
    net = enc.net
    with torch.no_grad():
        z = net.encoder(x, net.latent_tokens)                                    # [B, d, 1, L]
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        ids = torch.cdist(flat, net.quantize.embedding.weight).argmin(1).view(x.shape[0], -1)
    assert torch.equal(enc.encode(x), ids)
    cond = teacher.null_condition(x.shape[0])
    out = teacher.decode_ids(ids, cond)
    assert out.shape == (x.shape[0], 3, teacher.image_size, teacher.image_size)


@pytest.mark.parametrize("kind", ("amused", "meissonic"))
def test_muse_round_trip_is_the_vqmodel_decode(fakes, kind):
    _, _, enc, teacher = fakes[kind]
    x = images(enc.preprocess.size)
    with torch.no_grad():
        recon = enc.vqvae.decode(enc.vqvae.encode(x).latents).sample.clamp(0, 1)   # quantizes inside
    torch.testing.assert_close(teacher.decode_ids(enc.encode(x)), recon, atol=1e-5, rtol=0)


def test_world_encoder_reproduces_the_world_tokens(test_world):
    import os

    enc = load_encoder("world_c2i", options={"spec": "test", "cache_dir": os.environ["SOFTDIMO_CACHE"]})
    data = test_world.data("c2i")
    assert enc.preprocess.size == data.images.shape[-1]
    assert torch.equal(enc.encode(data.images[:16].float() / 255), data.tokens[:16])


def test_missing_and_foreign_files_name_the_key(fakes, tmp_path):
    paths, options, _, _ = fakes["maskgit"]
    with pytest.raises(TeacherFilesMissing, match="teacher.paths.vqgan"):
        load_encoder("maskgit", {**paths, "vqgan": str(tmp_path / "none.ckpt")}, options)
    with pytest.raises(KeyError, match="no encoder"):
        load_encoder("dalle", {}, {})
    assert set(ENCODERS) >= set(FAMILIES) | {"world_c2i", "world_t2i"}
    # a VQGAN checkpoint whose encoder keys are missing fails the strict load, naming them
    ckpt = torch.load(paths["vqgan"], weights_only=True)
    ckpt["state_dict"] = {k: v for k, v in ckpt["state_dict"].items() if k != "quant_conv.weight"}
    torch.save(ckpt, tmp_path / "last.ckpt")
    with pytest.raises(StateDictMismatch, match="quant_conv.weight"):
        load_encoder("maskgit", {**paths, "vqgan": str(tmp_path / "last.ckpt")}, options)


def test_prepare_image_resizes_the_shorter_edge_and_centre_crops():
    wide = Image.fromarray(np.arange(40 * 60 * 3, dtype=np.uint8).reshape(40, 60, 3))
    out = prepare_image(wide, Preprocess(20, "bicubic"))
    assert out.shape == (3, 20, 20) and out.dtype == np.uint8
    exact = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    assert np.array_equal(prepare_image(Image.fromarray(exact), Preprocess(16)), exact.transpose(2, 0, 1))
    grey = prepare_image(Image.fromarray(exact[..., 0], mode="L"), Preprocess(16))
    assert grey.shape == (3, 16, 16)                             # converted to RGB
