"""CLIP score, HPS and PickScore on tiny random networks of the real architectures, offline.

Checked: scores [B] and finite, gradients reach the pixels, the text-embedding cache, the CLIP-score
protocol's tokens, PIL-faithful resizes, strict checkpoint loading (HPS: the full-size key count on
the meta device), the PickScore folder round trip, and the factory.
"""
import json
import socket
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

from evaluators.networks import clip_scores as cs
from evaluators.networks.clip_scores import ClipScorer, HpsScorer, PickScorer
from evaluators.networks.scorers import SCORER_NAMES, Scorer, make_scorer
from evaluators.networks.weights import WEIGHTS_ENV, StateDictMismatch, WeightsMissing

TINY = "softdimo-test-tiny-clip"
TINY_CFG = {"embed_dim": 16,
            "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "head_width": 16,
                           "layers": 2},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2,
                         "layers": 2}}
PROMPTS = ["a red circle left of a blue square", "two dogs in the snow"]


@pytest.fixture(scope="module", autouse=True)
def no_network():
    """Module-wide (module fixtures build models too): any connection attempt fails the test."""
    def refuse(*args, **kwargs):
        raise OSError("network access in a unit test")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket, "getaddrinfo", refuse)
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def tiny_name(tmp_path_factory):
    import open_clip
    folder = tmp_path_factory.mktemp("open_clip_cfg")
    (folder / f"{TINY}.json").write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(folder / f"{TINY}.json")
    return TINY


def tiny_clip(name, seed=0):
    import open_clip
    torch.manual_seed(seed)
    return open_clip.create_model(name, pretrained=None)


@pytest.fixture(scope="module")
def clip_model(tiny_name):
    return tiny_clip(tiny_name)


@pytest.fixture
def images():
    return torch.rand(2, 3, 48, 40, generator=torch.Generator().manual_seed(1), requires_grad=True)


def check_scores_and_gradient(scorer, images):
    scores = scorer(images, PROMPTS)
    assert scores.shape == (2,) and scores.dtype == torch.float32
    assert torch.isfinite(scores).all()
    scores.sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all()
    assert images.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in scorer.model.parameters())
    return scores


def count_calls(monkeypatch, obj, method):
    calls = []
    original = getattr(obj, method)

    def wrapped(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)
    monkeypatch.setattr(obj, method, wrapped)
    return calls


def pil_float_resize(x, size, resample):
    """[1, C, H, W] float -> PIL 'F'-mode resize per channel (PIL takes (width, height))."""
    chans = [np.asarray(Image.fromarray(c.numpy().astype(np.float32)).resize(size[::-1], resample))
             for c in x[0]]
    return torch.from_numpy(np.stack(chans))[None]


# ---------------------------------------------------------------- preprocessing

def test_lanczos_and_bicubic_match_pil_float_mode():
    x = torch.rand(1, 3, 40, 30, generator=torch.Generator().manual_seed(0))
    for size in [(17, 23), (64, 48), (40, 30)]:
        ref = pil_float_resize(x, size, Image.LANCZOS).clamp(0, 1)
        assert (cs.lanczos_resize(x, size) - ref).abs().max() < 1e-5
        ref = pil_float_resize(x, size, Image.BICUBIC).clamp(0, 1)
        assert (cs.bicubic_resize(x, size) - ref).abs().max() < 2e-5


def test_resize_max_side_pad_is_hps_resize_max_size():
    x = torch.rand(1, 3, 15, 32, generator=torch.Generator().manual_seed(0)) * 0.5 + 0.25
    out = cs.resize_max_side_pad(x, 32)
    assert out.shape == (1, 3, 32, 32)
    # 15 rows stay 15, 17 rows of padding split 8 above, 9 below
    assert (out[..., :8, :] == 0).all() and (out[..., 23:, :] == 0).all()
    assert (out[..., 8:23, :] > 0).all()
    assert torch.equal(out[..., 8:23, :], x)
    tall = cs.resize_max_side_pad(torch.rand(1, 3, 64, 31), 32)
    assert tall.shape == (1, 3, 32, 32) and (tall[..., :, 0] == 0).all()


def test_protocol_preprocess_crops_square_then_lanczos_256_then_clip_transform():
    x = torch.rand(2, 3, 300, 200, generator=torch.Generator().manual_seed(0))
    out = cs.protocol_preprocess(x, 32)
    square = x[..., 50:250, :]
    expected = cs.clip_preprocess(cs.lanczos_resize(square, (256, 256)), 32)
    assert out.shape == (2, 3, 32, 32) and torch.allclose(out, expected)
    at_256 = torch.rand(1, 3, 256, 256)
    assert torch.equal(cs.protocol_preprocess(at_256, 32), cs.clip_preprocess(at_256, 32))


def test_clip_preprocess_shortest_side_and_centre_crop():
    x = torch.rand(1, 3, 40, 80)
    resized = cs.resize_shortest(x, 20)
    assert resized.shape == (1, 3, 20, 40)
    assert cs.clip_preprocess(x, 20).shape == (1, 3, 20, 20)
    assert torch.equal(cs.center_crop(resized, 20), resized[..., 10:30])


# ---------------------------------------------------------------- CLIP score

def test_protocol_tokens_splice_prefix_after_sot_and_force_eot(clip_model):
    scorer = ClipScorer.from_model(clip_model)
    tok = scorer.tokenizer
    prefix = tok.encode("A photo depicts")
    assert len(prefix) == 3
    tokens = scorer.tokens(["a cat", "word " * 100])
    short = [tok.sot_token_id] + prefix + tok.encode("a cat") + [tok.eot_token_id]
    assert tokens.shape == (2, 77)
    assert tokens[0, :len(short)].tolist() == short and (tokens[0, len(short):] == 0).all()
    assert tokens[1, 1:4].tolist() == prefix
    assert tokens[1, -1] == tok.eot_token_id and (tokens[1] != 0).all()
    assert tokens[1, 4:-1].tolist() == tok.encode("word " * 100)[:72]
    # splicing = prefixing the text, for prompts that fit
    assert torch.equal(tokens[0], tok(["A photo depicts a cat"])[0])


def test_clip_scorer_is_a_differentiable_cosine(clip_model, images):
    scorer = ClipScorer.from_model(clip_model)
    assert isinstance(scorer, Scorer) and scorer.name == "clip"
    scores = check_scores_and_gradient(scorer, images)
    with torch.no_grad():
        img = F.normalize(clip_model.encode_image(scorer.preprocess(images)), dim=-1)
        txt = F.normalize(clip_model.encode_text(scorer.tokens(PROMPTS)), dim=-1)
    assert torch.allclose(scores, (img * txt).sum(-1), atol=1e-5)
    assert (scores.abs() <= 1).all()


def test_text_embeddings_are_cached_per_prompt(clip_model, monkeypatch):
    scorer = ClipScorer.from_model(clip_model)
    calls = count_calls(monkeypatch, scorer.model, "encode_text")
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        first = scorer(x, PROMPTS)
        again = scorer(x, PROMPTS[::-1])
        one = scorer(x[:1], ["a new prompt"])
        swapped = scorer(x.flip(0), PROMPTS[::-1])
    assert len(calls) == 2 and calls[1][0].shape[0] == 1
    assert torch.allclose(swapped, first.flip(0))
    assert not torch.allclose(again, first)
    assert set(scorer.text.store) == set(PROMPTS) | {"a new prompt"} and one.shape == (1,)


def test_bf16_autocast_scores_close_to_fp32_with_float32_preprocessing(clip_model, images):
    scorer = ClipScorer.from_model(clip_model)
    seen = []
    original = scorer.preprocess

    def recording(x):
        seen.append(original(x))
        return seen[-1]
    scorer.preprocess = recording
    with torch.no_grad():
        full = scorer(images, PROMPTS)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = scorer(images, PROMPTS)
    assert seen[1].dtype == torch.float32 and torch.equal(seen[0], seen[1])
    assert half.dtype == torch.float32 and torch.allclose(half, full, atol=0.03)


def test_cache_filled_in_inference_mode_serves_a_later_reward(clip_model):
    scorer = ClipScorer.from_model(clip_model)
    with torch.inference_mode():
        evaluated = scorer(torch.rand(2, 3, 32, 32), PROMPTS)
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    scorer(x, PROMPTS).sum().backward()
    assert evaluated.shape == (2,) and torch.isfinite(x.grad).all()


def test_clip_scorer_loads_a_local_file_strictly(clip_model, tiny_name, tmp_path):
    file = tmp_path / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in clip_model.state_dict().items()}, str(file))
    scorer = make_scorer("clip", path=file, model=tiny_name)
    assert isinstance(scorer, ClipScorer)
    for k, v in scorer.model.state_dict().items():
        assert torch.equal(v, clip_model.state_dict()[k]), k
    broken = dict(load_file(str(file)))
    del broken["ln_final.bias"]
    save_file(broken, str(file))
    with pytest.raises(RuntimeError, match="ln_final.bias"):
        ClipScorer(path=file, model=tiny_name)


# ---------------------------------------------------------------- HPS

def test_full_size_vit_h_14_has_the_686_keys_of_the_hps_checkpoint():
    import open_clip
    with torch.device("meta"):
        model = open_clip.create_model("ViT-H-14", pretrained=None, device="meta")
    assert len(model.state_dict()) == 686
    assert model.visual.image_size == (224, 224) and model.context_length == 77


def test_hps_checkpoint_round_trip_and_score(tiny_name, tmp_path, images):
    source = tiny_clip(tiny_name, seed=3)
    file = tmp_path / "HPS_v2_compressed.pt"
    torch.save({"state_dict": source.state_dict()}, file)
    scorer = make_scorer("hps", path=file, model=tiny_name)
    assert isinstance(scorer, HpsScorer) and scorer.name == "hps" and scorer.version == "v2.0"
    for k, v in scorer.model.state_dict().items():
        assert torch.equal(v, source.state_dict()[k]), k
    scores = check_scores_and_gradient(scorer, images)
    with torch.no_grad():
        img = F.normalize(source.encode_image(scorer.preprocess(images)), dim=-1)
        txt = F.normalize(source.encode_text(scorer.tokens(PROMPTS)), dim=-1)
    assert torch.allclose(scores, torch.diagonal(img @ txt.T), atol=1e-5)   # no logit scale
    assert make_scorer("hps_v21", path=file, model=tiny_name).name == "hps_v21"


def test_hps_checkpoint_with_missing_or_extra_keys_is_refused(clip_model, tiny_name, tmp_path):
    state = dict(clip_model.state_dict())
    del state["visual.proj"]
    state["visual.extra.weight"] = torch.zeros(2)
    file = tmp_path / "bad.pt"
    torch.save({"state_dict": state}, file)
    with pytest.raises(StateDictMismatch) as err:
        HpsScorer(path=file, model=tiny_name)
    assert "visual.proj" in str(err.value) and "visual.extra.weight" in str(err.value)
    torch.save(state, file)
    with pytest.raises(StateDictMismatch, match="state_dict"):
        HpsScorer(path=file, model=tiny_name)
    with pytest.raises(ValueError, match="v2.1"):
        HpsScorer(path=file, version="v3")


# ---------------------------------------------------------------- PickScore

@pytest.fixture(scope="module")
def pick_folders(tmp_path_factory):
    """A tiny PickScore CLIPModel folder and a processor folder with the real CLIP BPE."""
    import open_clip
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizerFast
    root = tmp_path_factory.mktemp("pickscore")
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 2,
                     "max_position_embeddings": 77},
        vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 32,
                       "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2},
        projection_dim=16)
    CLIPModel(config).save_pretrained(root / "model")
    # the HF CLIP vocabulary is open_clip's bundled BPE with HF's names for the two special tokens
    bpe = open_clip.SimpleTokenizer()
    vocab = dict(bpe.encoder)
    vocab["<|startoftext|>"] = vocab.pop("<start_of_text>")
    vocab["<|endoftext|>"] = vocab.pop("<end_of_text>")
    merges = [pair for pair, _ in sorted(bpe.bpe_ranks.items(), key=lambda kv: kv[1])]
    CLIPTokenizerFast(vocab=vocab, merges=merges).save_pretrained(root / "processor")
    (root / "processor" / "preprocessor_config.json").write_text(json.dumps(
        {"crop_size": {"height": 32, "width": 32}, "size": {"shortest_edge": 32},
         "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25]}))
    return root / "model", root / "processor"


def test_pickscore_loads_local_folders_and_scores(pick_folders, images, monkeypatch):
    model_dir, proc_dir = pick_folders
    scorer = make_scorer("pickscore", path=model_dir, processor=proc_dir)
    assert isinstance(scorer, PickScorer) and scorer.name == "pickscore"
    assert scorer.size == 32 and scorer.mean == (0.5, 0.5, 0.5)
    scores = check_scores_and_gradient(scorer, images)
    import open_clip
    ids = scorer.tokenizer(PROMPTS, padding=True, return_tensors="pt")["input_ids"]
    reference = open_clip.SimpleTokenizer()(PROMPTS)[:, :ids.shape[1]]
    assert torch.equal(ids[reference != 0], reference[reference != 0])   # same BPE ids as CLIP's
    m = scorer.model
    with torch.no_grad():
        x = cs.clip_preprocess(images, 32, (0.5,) * 3, (0.25,) * 3)
        img = m.visual_projection(m.vision_model(pixel_values=x).pooler_output)
        batch = scorer.tokenizer(PROMPTS, padding=True, return_tensors="pt")
        txt = m.text_projection(m.text_model(**batch).pooler_output)
        cos = F.cosine_similarity(img, txt)
    assert torch.allclose(scores, m.logit_scale.exp() * cos, atol=1e-4)
    calls = count_calls(monkeypatch, scorer.model, "get_text_features")
    with torch.no_grad():
        scorer(images, PROMPTS)
    assert not calls


def test_pickscore_refuses_a_folder_with_missing_keys(pick_folders, tmp_path):
    import shutil
    model_dir, proc_dir = pick_folders
    broken = tmp_path / "model"
    shutil.copytree(model_dir, broken)
    state = load_file(str(broken / "model.safetensors"))
    del state["text_model.final_layer_norm.bias"]
    save_file(state, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(StateDictMismatch, match="text_model.final_layer_norm.bias"):
        PickScorer(path=broken, processor=proc_dir)


# ---------------------------------------------------------------- factory

def test_make_scorer_names_missing_weights_before_building(tmp_path, monkeypatch):
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path))
    for name, key, file in [("clip", "clip_g14", "open_clip_model.safetensors"),
                            ("hps", "hps_v2", "HPS_v2_compressed.pt"),
                            ("hps_v21", "hps_v21", "HPS_v2.1_compressed.pt"),
                            ("pickscore", "pickscore", "PickScore_v1")]:
        with pytest.raises(WeightsMissing) as err:
            make_scorer(name)
        assert str(err.value).startswith(f"{key}: ") and file in str(err.value)


def test_make_scorer_dispatches_imagereward_and_rejects_unknown_names(monkeypatch):
    built = {}

    class FakeImageReward:
        name = "imagereward"

        def __init__(self, path=None, med_config=None, vocab=None, device="cpu"):
            built.update(path=path, med_config=med_config, vocab=vocab, device=device)

        def __call__(self, images, prompts):
            return images.mean(dim=(1, 2, 3))

    module = types.ModuleType("evaluators.networks.image_reward")
    module.ImageRewardScorer = FakeImageReward
    monkeypatch.setitem(sys.modules, "evaluators.networks.image_reward", module)
    scorer = make_scorer("imagereward", device="meta", path="ir.pt", vocab="vocab.txt")
    assert isinstance(scorer, Scorer)
    assert built == {"path": "ir.pt", "med_config": None, "vocab": "vocab.txt", "device": "meta"}
    assert SCORER_NAMES == ("clip", "hps", "hps_v21", "pickscore", "imagereward")
    with pytest.raises(ValueError, match="clip, hps, hps_v21, pickscore, imagereward"):
        make_scorer("aesthetic")
