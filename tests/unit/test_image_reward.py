"""ImageReward port: key layout of the published checkpoint, strict loading, tokenizer, preprocessing,
normalisation, gradients, and agreement with transformers' own BLIP modules, on tiny random networks."""
import json

import pytest
import torch

from evaluators.networks.blip import BlipConfig
from evaluators.networks.image_reward import (REWARD_MEAN, REWARD_STD, POSITION_IDS_KEY, ImageReward,
                                     ImageRewardScorer, key_list, load_image_reward, load_tokenizer,
                                     preprocess)
from evaluators.networks.weights import StateDictMismatch, WeightsMissing

WORDS = ["a", "red", "cat", "on", "the", "mat", "dog", "blue", "sky", "##s"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
TINY = BlipConfig(image_size=32, patch_size=8, vision_width=32, vision_layers=2, vision_heads=4,
                  text_width=24, text_layers=2, text_heads=4, text_intermediate=48,
                  vocab_size=len(SPECIAL) + len(WORDS) + 2, max_positions=40, embed_dim=8)
PROMPTS = ["a red cat on the mat", "a blue dog", "the sky"]


pytestmark = pytest.mark.usefixtures("no_network")




@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
    path = tmp_path_factory.mktemp("bert") / "vocab.txt"
    path.write_text("\n".join(SPECIAL + WORDS) + "\n", encoding="utf-8")
    return path


def tiny_model(seed: int = 0) -> ImageReward:
    """A tiny ImageReward whose weights are all perturbed, so no layer is the identity."""
    torch.manual_seed(seed)
    model = ImageReward(TINY).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.requires_grad_(False)


@pytest.fixture(scope="module")
def scorer(vocab):
    return ImageRewardScorer(model=tiny_model(), tokenizer=load_tokenizer(vocab))


def images(b: int = 3, h: int = 40, w: int = 48, seed: int = 1) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def upstream_names(vision_layers: int = 24, text_layers: int = 12) -> set[str]:
    """The state-dict names of upstream's ImageReward(nn.Module) (blip = BLIP_Pretrain, mlp = MLP), written
    out from ImageReward.py, BLIP/blip_pretrain.py, BLIP/vit.py and BLIP/med.py (without position_ids)."""
    wb = lambda prefix: {f"{prefix}.weight", f"{prefix}.bias"}
    v = "blip.visual_encoder"
    names = {f"{v}.cls_token", f"{v}.pos_embed"} | wb(f"{v}.patch_embed.proj") | wb(f"{v}.norm")
    for i in range(vision_layers):
        for part in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            names |= wb(f"{v}.blocks.{i}.{part}")
    t = "blip.text_encoder"
    names |= {f"{t}.embeddings.word_embeddings.weight", f"{t}.embeddings.position_embeddings.weight"}
    names |= wb(f"{t}.embeddings.LayerNorm")
    for i in range(text_layers):
        for attn in ("attention", "crossattention"):
            for part in ("self.query", "self.key", "self.value", "output.dense", "output.LayerNorm"):
                names |= wb(f"{t}.encoder.layer.{i}.{attn}.{part}")
        for part in ("intermediate.dense", "output.dense", "output.LayerNorm"):
            names |= wb(f"{t}.encoder.layer.{i}.{part}")
    names |= wb("blip.vision_proj") | wb("blip.text_proj")
    for i in (0, 2, 4, 6, 7):
        names |= wb(f"mlp.layers.{i}")
    return names


def test_full_size_state_dict_matches_the_published_key_layout():
    keys = dict(key_list())
    assert len(keys) == 624
    assert set(keys) == upstream_names()
    assert keys["blip.visual_encoder.pos_embed"] == (1, 197, 1024)
    assert keys["blip.visual_encoder.cls_token"] == (1, 1, 1024)
    assert keys["blip.visual_encoder.patch_embed.proj.weight"] == (1024, 3, 16, 16)
    assert keys["blip.visual_encoder.blocks.23.attn.qkv.weight"] == (3072, 1024)
    assert keys["blip.visual_encoder.blocks.23.mlp.fc1.weight"] == (4096, 1024)
    assert keys["blip.text_encoder.embeddings.word_embeddings.weight"] == (30524, 768)
    assert keys["blip.text_encoder.embeddings.position_embeddings.weight"] == (512, 768)
    assert keys["blip.text_encoder.encoder.layer.11.crossattention.self.key.weight"] == (768, 1024)
    assert keys["blip.text_encoder.encoder.layer.11.intermediate.dense.weight"] == (3072, 768)
    assert keys["blip.vision_proj.weight"] == (256, 1024)
    assert keys["mlp.layers.0.weight"] == (1024, 768)
    assert keys["mlp.layers.7.weight"] == (1, 16)
    # ViT-L/16 303.3M + BERT 142.0M + projections and head, as counted from upstream's modules
    assert sum(torch.Size(s).numel() for s in keys.values()) == pytest.approx(446.67e6, rel=1e-4)


def test_tiny_model_has_the_same_layout():
    assert {name for name, _ in key_list(TINY)} == upstream_names(TINY.vision_layers, TINY.text_layers)


def test_med_config_gives_the_default_text_encoder(tmp_path):
    med = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
           "hidden_dropout_prob": 0.1, "hidden_size": 768, "initializer_range": 0.02,
           "intermediate_size": 3072, "layer_norm_eps": 1e-12, "max_position_embeddings": 512,
           "model_type": "bert", "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 0,
           "type_vocab_size": 2, "vocab_size": 30524, "encoder_width": 768, "add_cross_attention": True}
    (tmp_path / "med_config.json").write_text(json.dumps(med))
    assert BlipConfig.from_med_config(tmp_path / "med_config.json") == BlipConfig()
    (tmp_path / "bad.json").write_text(json.dumps(med | {"hidden_act": "relu"}))
    with pytest.raises(ValueError, match="hidden_act"):
        BlipConfig.from_med_config(tmp_path / "bad.json")


def test_tokenizer_from_a_local_vocab(vocab):
    tok = load_tokenizer(vocab)
    n = len(SPECIAL) + len(WORDS)
    assert len(tok) == n + 2 == TINY.vocab_size
    assert tok.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [n, n + 1]
    ids = tok(["A Red CATS"], padding="max_length", truncation=True, max_length=35)["input_ids"][0]
    word = {w: len(SPECIAL) + i for i, w in enumerate(WORDS)}
    assert ids[:6] == [2, word["a"], word["red"], word["cat"], word["##s"], 3]
    assert ids[6:] == [0] * 29
    long = tok([" ".join(["dog"] * 50)], padding="max_length", truncation=True, max_length=35)["input_ids"][0]
    assert len(long) == 35 and long[0] == 2 and long[-1] == 3


def test_scores_have_one_value_per_image(scorer):
    x = images()
    scores = scorer(x, PROMPTS)
    assert scores.shape == (3,) and scores.dtype == torch.float32 and torch.isfinite(scores).all()
    tokens = scorer.model.blip.visual_encoder(preprocess(x, TINY.image_size))
    assert tokens.shape == (3, TINY.num_patches + 1, TINY.vision_width)
    # each image is scored on its own: the batch gives the per-image scores
    single = torch.cat([scorer(x[i:i + 1], PROMPTS[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(scores, single, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="one prompt per image"):
        scorer(x, PROMPTS[:2])


def test_gradient_reaches_every_image_and_is_finite(scorer):
    x = images().requires_grad_(True)
    scorer(x, PROMPTS).sum().backward()
    assert torch.isfinite(x.grad).all()
    assert (x.grad.flatten(1).abs().sum(1) > 0).all()
    assert all(p.grad is None and not p.requires_grad for p in scorer.model.parameters())


def test_published_normalisation_is_applied(vocab):
    model = tiny_model()
    with torch.no_grad():
        for p in model.mlp.parameters():
            p.zero_()
        model.mlp.layers[7].bias.fill_(1.0)       # raw head output 1 for every input
    scores = ImageRewardScorer(model=model, tokenizer=load_tokenizer(vocab))(images(), PROMPTS)
    torch.testing.assert_close(scores, torch.full((3,), (1.0 - 0.16717362830052426) / 1.0333394966054072))
    assert (REWARD_MEAN, REWARD_STD) == (0.16717362830052426, 1.0333394966054072)


def test_preprocessing_matches_torchvision_resize_and_centre_crop():
    tvf = pytest.importorskip("torchvision.transforms.functional")
    from torchvision.transforms import InterpolationMode
    x = images(2, 50, 70)
    ref = tvf.center_crop(tvf.resize(x, 32, interpolation=InterpolationMode.BICUBIC, antialias=True), 32)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    torch.testing.assert_close(preprocess(x, 32), (ref - mean) / std)
    tall = images(1, 64, 32)                      # no resize needed: only the centre rows remain
    torch.testing.assert_close(preprocess(tall, 32), (tall[..., 16:48, :] - mean) / std)


@pytest.mark.parametrize("wrap", ["raw", "raw+position_ids", "state_dict", "model"])
def test_checkpoint_round_trip_gives_identical_scores(tmp_path, vocab, scorer, wrap):
    state = scorer.model.state_dict()
    if wrap == "raw+position_ids":                # upstream med.py persists this buffer
        state = state | {POSITION_IDS_KEY: torch.arange(TINY.max_positions).expand(1, -1)}
    torch.save(state if wrap.startswith("raw") else {wrap: state, "epoch": 3}, tmp_path / "ir.pt")
    loaded = load_image_reward(tmp_path / "ir.pt", TINY)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    again = ImageRewardScorer(model=loaded, tokenizer=load_tokenizer(vocab))
    x = images()
    assert torch.equal(again(x, PROMPTS), scorer(x, PROMPTS))


def test_mismatched_checkpoints_are_refused_with_the_keys_listed(tmp_path, scorer):
    state = scorer.model.state_dict()
    bad = {k: v for k, v in state.items() if k != "mlp.layers.7.bias"}
    bad["blip.text_encoder.pooler.dense.weight"] = torch.zeros(24, 24)
    bad["blip.vision_proj.weight"] = torch.zeros(3, 3)
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(StateDictMismatch) as err:
        load_image_reward(tmp_path / "bad.pt", TINY)
    message = str(err.value)
    assert "missing keys (1): mlp.layers.7.bias" in message
    assert "unexpected keys (1): blip.text_encoder.pooler.dense.weight" in message
    assert "blip.vision_proj.weight: (3, 3) in the file, (8, 32) in the model" in message
    torch.save(state | {POSITION_IDS_KEY: torch.zeros(1, TINY.max_positions, dtype=torch.long)},
               tmp_path / "pos.pt")
    with pytest.raises(StateDictMismatch, match="position_ids is not arange"):
        load_image_reward(tmp_path / "pos.pt", TINY)


def test_missing_staged_files_raise_weights_missing(tmp_path):
    with pytest.raises(WeightsMissing):
        ImageRewardScorer(path=tmp_path / "ImageReward.pt", med_config=tmp_path / "med_config.json",
                          vocab=tmp_path / "vocab.txt")


def test_encoders_agree_with_transformers_blip(scorer):
    """transformers' BLIP is an independent port of the same upstream code: same weights, same outputs."""
    from transformers import BlipTextConfig, BlipVisionConfig
    from transformers.models.blip.modeling_blip import BlipVisionModel
    from transformers.models.blip.modeling_blip_text import BlipTextModel

    vision = BlipVisionModel(BlipVisionConfig(
        hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=32,
        patch_size=8, layer_norm_eps=1e-6)).eval()
    text = BlipTextModel(BlipTextConfig(
        vocab_size=TINY.vocab_size, hidden_size=24, encoder_hidden_size=32, intermediate_size=48,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=40, bos_token_id=None,
        sep_token_id=None), add_pooling_layer=False).eval()
    ours = scorer.model.state_dict()
    rename = [("embeddings.class_embedding", "cls_token"), ("embeddings.position_embedding", "pos_embed"),
              ("embeddings.patch_embedding", "patch_embed.proj"), ("post_layernorm", "norm"),
              ("encoder.layers.", "blocks."), ("self_attn.projection", "attn.proj"),
              ("self_attn.qkv", "attn.qkv"), ("layer_norm1", "norm1"), ("layer_norm2", "norm2")]

    def theirs_to_ours(name: str) -> str:
        for a, b in rename:
            name = name.replace(a, b)
        return "blip.visual_encoder." + name

    vision.load_state_dict({k: ours[theirs_to_ours(k)] for k in vision.state_dict()}, strict=True)
    text_state = {k: ours["blip.text_encoder." + k] for k in text.state_dict() if "position_ids" not in k}
    assert not text.load_state_dict(text_state, strict=False).unexpected_keys
    x = preprocess(images(), 32)
    ids, mask = scorer.tokenize(PROMPTS)
    with torch.no_grad():
        tokens = scorer.model.blip.visual_encoder(x)
        torch.testing.assert_close(tokens, vision(pixel_values=x).last_hidden_state, rtol=1e-5, atol=1e-5)
        hidden = scorer.model.blip.text_encoder(ids, mask, tokens)
        reference = text(input_ids=ids, attention_mask=mask, encoder_hidden_states=tokens).last_hidden_state
    torch.testing.assert_close(hidden, reference, rtol=1e-5, atol=1e-5)
