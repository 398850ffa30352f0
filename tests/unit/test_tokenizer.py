"""VQTokenizer: shapes, the soft decode path, gradients, files and a short training run."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from softdimo.world.tokenizer import (TokenizerConfig, VQTokenizer, evaluate_tokenizer, kmeans,
                                      load_tokenizer, save_module, train_tokenizer)

TINY = TokenizerConfig(codebook_size=16, code_dim=4, channels=8, patch=4, image_size=16)


def tiny_tokenizer(seed: int = 0) -> VQTokenizer:
    return VQTokenizer(TINY, generator=torch.Generator().manual_seed(seed)).eval()


def blocks(n: int, seed: int = 0, size: int = 16) -> torch.Tensor:
    """uint8 images [n, 3, size, size]: a dark background with one coloured square each."""
    g = torch.Generator().manual_seed(seed)
    out = torch.full((n, 3, size, size), 20, dtype=torch.uint8)
    colours = torch.tensor([[230, 40, 40], [40, 200, 60], [50, 80, 240], [240, 220, 40]], dtype=torch.uint8)
    for i in range(n):
        s = int(torch.randint(3, 8, (), generator=g))
        y, x = torch.randint(0, size - s, (2,), generator=g).tolist()
        out[i, :, y:y + s, x:x + s] = colours[int(torch.randint(0, 4, (), generator=g))][:, None, None]
    return out


def test_shapes_and_range():
    tok = tiny_tokenizer()
    images = torch.rand(3, 3, 16, 16)
    ids = tok.encode(images)
    assert tok.seq_len == 16 and ids.shape == (3, 16) and ids.dtype == torch.long
    assert int(ids.min()) >= 0 and int(ids.max()) < TINY.codebook_size
    with torch.no_grad():
        out = tok.decode_ids(ids)
    assert out.shape == (3, 3, 16, 16)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def test_encode_is_nearest_code():
    tok = tiny_tokenizer()
    images = torch.rand(2, 3, 16, 16)
    z = tok.encode_latents(images)
    brute = torch.cdist(z.reshape(-1, TINY.code_dim), tok.codebook).argmin(1).view(2, 16)
    assert torch.equal(tok.encode(images), brute)


def test_decode_probs_of_one_hot_equals_decode_ids():
    tok = tiny_tokenizer()
    ids = torch.randint(0, TINY.codebook_size, (2, 16), generator=torch.Generator().manual_seed(1))
    p = F.one_hot(ids, TINY.codebook_size).float()
    torch.testing.assert_close(tok.decode_probs(p), tok.decode_ids(ids), atol=1e-5, rtol=0)


def test_gradients_reach_probabilities():
    tok = tiny_tokenizer().requires_grad_(False)
    logits = torch.randn(2, 16, TINY.codebook_size, requires_grad=True)
    tok.decode_probs(logits.softmax(-1)).pow(2).mean().backward()
    assert logits.grad is not None and float(logits.grad.abs().sum()) > 0


def test_ema_update_moves_code_toward_its_vectors():
    tok = tiny_tokenizer()
    z = torch.ones(10, TINY.code_dim) * 3.0
    ids = torch.zeros(10, dtype=torch.long)
    before = (tok.codebook[0] - z[0]).norm()
    for _ in range(200):
        tok.ema_update(z, ids)
    assert (tok.codebook[0] - z[0]).norm() < 0.2 * before


def test_restart_dead_moves_unused_codes_onto_latents():
    tok = tiny_tokenizer()
    tok.cluster_size.fill_(1.0)
    tok.cluster_size[[2, 5]] = 0.0
    z = torch.randn(7, TINY.code_dim)
    assert tok.restart_dead(z, torch.Generator().manual_seed(0)) == 2
    for k in (2, 5):
        assert torch.cdist(tok.codebook[k][None], z).min() == 0


def test_kmeans_recovers_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = torch.cat([c + 0.1 * torch.randn(50, 2, generator=g) for c in centres])
    found = kmeans(x, 3, torch.Generator().manual_seed(1))
    assert torch.cdist(centres, found).min(1).values.max() < 0.2


def test_save_load_round_trip(tmp_path):
    tok = tiny_tokenizer()
    tok.codebook.mul_(2.0)              # a buffer must travel too
    save_module(tok, TINY, tmp_path / "tok")
    assert (tmp_path / "tok.safetensors").exists() and (tmp_path / "tok.json").exists()
    back = load_tokenizer(tmp_path / "tok")
    assert back.config == TINY
    images = torch.rand(2, 3, 16, 16)
    assert torch.equal(back.encode(images), tok.encode(images))
    torch.testing.assert_close(back.decode_ids(tok.encode(images)), tok.decode_ids(tok.encode(images)))


def test_load_lists_missing_and_unexpected_keys(tmp_path):
    from safetensors.torch import load_file, save_file
    save_module(tiny_tokenizer(), TINY, tmp_path / "tok")
    state = load_file(str(tmp_path / "tok.safetensors"))
    state["extra.weight"] = state.pop("codebook")
    save_file(state, str(tmp_path / "tok.safetensors"))
    with pytest.raises(KeyError, match=r"missing keys \['codebook'\].*unexpected keys \['extra.weight'\]"):
        load_tokenizer(tmp_path / "tok")


def test_short_training_lowers_reconstruction_error():
    images = blocks(200)
    untrained = evaluate_tokenizer(tiny_tokenizer(), images)["mse"]
    model, stats = train_tokenizer(images, TINY, steps=40, batch_size=16, lr=3e-3,
                                   generator=torch.Generator().manual_seed(0), progress=False)
    assert stats["val_mse"] < 0.5 * untrained
    assert 1 <= stats["codes_in_use"] <= TINY.codebook_size
    assert stats["ae_steps"] == 10 and not model.training
    assert not any(p.requires_grad for p in model.parameters())


def test_training_is_deterministic_given_the_generator():
    runs = [train_tokenizer(blocks(64), TINY, steps=8, batch_size=8, lr=3e-3,
                            generator=torch.Generator().manual_seed(3), progress=False) for _ in range(2)]
    (a, sa), (b, sb) = runs
    assert sa["val_mse"] == sb["val_mse"]
    assert torch.equal(a.codebook, b.codebook)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
