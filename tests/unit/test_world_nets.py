"""The world's tiny CLIP, quality reward, feature network and spec hashing."""
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from softdimo.world import clip as C
from softdimo.world.features import FeatureNet, label_targets, scene_targets
from softdimo.world.quality import DEGRADATIONS, QualityScorer, degrade
from softdimo.world.scenes import Scene, SceneObject, c2i_scenes
from softdimo.world.layout import (WORLD_SPECS, default_cache_dir, seeded_init, world_dir,
                                   world_hash)
from softdimo.world.store import load_world


@pytest.fixture(scope="module")
def clip_pair(tmp_path_factory):
    """A randomly initialised tiny CLIP and the same model after an open_clip local-dir round trip."""
    # frozen like load_clip's output: nn.MultiheadAttention takes a different (fast) kernel when
    # no parameter needs a gradient, which differs in the last bits
    model = C._new_model(torch.Generator().manual_seed(0)).eval().requires_grad_(False)
    folder = tmp_path_factory.mktemp("clip")
    C.save_clip(model, folder)
    return model, C.load_clip(folder), folder


def test_clip_loss_with_unique_captions_is_standard_infonce():
    g = torch.Generator().manual_seed(1)
    img = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    txt = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    scale = torch.tensor(2.0)
    logits = scale.exp() * img @ txt.T
    ref = 0.5 * (F.cross_entropy(logits, torch.arange(5)) + F.cross_entropy(logits.T, torch.arange(5)))
    assert torch.allclose(C.clip_loss(img, txt, torch.eye(5, dtype=torch.bool), scale), ref)
    # duplicated captions are positives: two identical rows with the same caption share the target
    same = torch.eye(5, dtype=torch.bool)
    same[0, 1] = same[1, 0] = True
    t = same.float() / same.float().sum(1, keepdim=True)
    ref2 = 0.5 * (-(t * logits.log_softmax(1)).sum(1).mean() - (t * logits.T.log_softmax(1)).sum(1).mean())
    assert torch.allclose(C.clip_loss(img, txt, same, scale), ref2)
    # a hard negative column only enters the image -> text direction
    neg = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    full = torch.cat([logits, scale.exp() * img @ neg.T], 1)
    ref3 = 0.5 * (F.cross_entropy(full, torch.arange(5)) + F.cross_entropy(logits.T, torch.arange(5)))
    got = C.clip_loss(img, txt, torch.eye(5, dtype=torch.bool), scale, neg,
                      torch.zeros(5, 5, dtype=torch.bool))
    assert torch.allclose(got, ref3)


def test_clip_local_dir_round_trip_is_identical(clip_pair):
    model, loaded, folder = clip_pair
    config = json.loads((folder / C.CONFIG_NAME).read_text())
    assert config["model_cfg"] == C.clip_model_config() and config["preprocess_cfg"]["size"] == 32
    assert (folder / C.WEIGHTS_NAME).is_file()
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    tokens = C._tokenizer(16)(["a photo of a red circle", "", "a photo of two squares"])
    with torch.no_grad():
        assert torch.equal(model.encode_image(x), loaded.encode_image(x))
        assert torch.equal(model.encode_text(tokens), loaded.encode_text(tokens))
    with pytest.raises(FileNotFoundError, match="open_clip_config.json"):
        C.load_clip(folder / "missing")


def test_clip_text_gives_per_token_features_that_pool_to_encode_text(clip_pair):
    _, model, _ = clip_pair
    text = C.ClipText(model)
    prompts = ["a photo of a red circle", "a photo of a circle left of a square", ""]
    feats = text(prompts)
    assert feats.shape == (3, 16, 64) and (text.length, text.dim) == (16, 64)
    assert not feats.requires_grad
    tokens = text.tokens(prompts)
    eot = tokens.argmax(dim=-1)                      # open_clip's 'argmax' text pooling
    pooled = feats[torch.arange(3), eot] @ model.text_projection
    with torch.no_grad():
        assert torch.allclose(pooled, model.encode_text(tokens), atol=1e-5)
    # causal attention: positions before the first difference agree between two prompts
    assert torch.allclose(feats[0, :4], feats[1, :4], atol=1e-6)
    assert not torch.allclose(feats[0, 6], feats[1, 6])


def test_clip_score_is_cosine_and_differentiable_in_pixels(clip_pair):
    _, model, _ = clip_pair
    score = C.ClipScore(model)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3), requires_grad=True)
    prompts = ["a photo of a red circle", "a photo of three triangles"]
    s = score(x, prompts)
    assert s.shape == (2,) and (s.abs() <= 1 + 1e-6).all()
    with torch.no_grad():
        img = F.normalize(model.encode_image((x - torch.tensor(C.MEAN)[:, None, None])
                                             / torch.tensor(C.STD)[:, None, None]), dim=-1)
        txt = F.normalize(model.encode_text(C._tokenizer(16)(prompts)), dim=-1)
    assert torch.allclose(s, (img * txt).sum(-1), atol=1e-5)
    s.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    # other sizes are resized inside, still differentiable
    y = torch.rand(1, 3, 64, 64, requires_grad=True)
    score(y, prompts[:1]).sum().backward()
    assert y.grad.abs().sum() > 0


def test_quality_scorer_shapes_gradients_and_degradations():
    with seeded_init(torch.Generator().manual_seed(0)):
        q = QualityScorer(width=8)
    x = torch.rand(4, 3, 32, 32, requires_grad=True)
    out = q(x)
    assert out.shape == (4,)
    out.sum().backward()
    assert x.grad.abs().sum() > 0
    clean = torch.rand(2 * len(DEGRADATIONS), 3, 32, 32, generator=torch.Generator().manual_seed(4))
    a = degrade(clean, torch.Generator().manual_seed(5))
    b = degrade(clean, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.shape == clean.shape
    assert a.min() >= 0 and a.max() <= 1
    assert (a - clean).abs().flatten(1).amax(1).min() > 0      # every image was changed


def test_feature_net_shapes_gradients_and_targets():
    with seeded_init(torch.Generator().manual_seed(0)):
        f = FeatureNet(width=8, feature_dim=32)
    x = torch.rand(3, 3, 32, 32, requires_grad=True)
    h = f.features(x)
    presence, count = f(x)
    assert h.shape == (3, 32) and presence.shape == (3, 27) and count.shape == (3, 4)
    h.sum().backward()
    assert x.grad.abs().sum() > 0
    scene = Scene((SceneObject("triangle", "blue", 8, 8, 4), SceneObject("circle", "blue", 24, 24, 4)))
    p, c = scene_targets([scene])
    expected = torch.zeros(27)
    expected[[2 * 6 + 2, 0 * 6 + 2, 18 + 2, 24 + 2, 24 + 0]] = 1
    assert torch.equal(p[0], expected) and c.tolist() == [1]
    single = c2i_scenes(18, 0)
    p1, c1 = scene_targets(single)
    p2, c2 = label_targets(torch.tensor([s.label for s in single]))
    assert torch.equal(p1, p2) and torch.equal(c1, c2)


def test_seeded_init_is_reproducible_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    with seeded_init(torch.Generator().manual_seed(9)):
        a = torch.nn.Linear(4, 4).weight.clone()
    assert torch.equal(torch.rand(1), before)
    with seeded_init(torch.Generator().manual_seed(9)):
        b = torch.nn.Linear(4, 4).weight.clone()
    assert torch.equal(a, b)


def test_world_hash_tracks_every_field_and_cache_dir_env(monkeypatch, tmp_path):
    spec = WORLD_SPECS["test"]
    assert world_hash(spec) == world_hash(dataclasses.replace(spec))
    hashes = {world_hash(dataclasses.replace(spec, **{f.name: _changed(getattr(spec, f.name))}))
              for f in dataclasses.fields(spec)}
    assert world_hash(spec) not in hashes and len(hashes) == len(dataclasses.fields(spec))
    monkeypatch.setenv("SOFTDIMO_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    assert world_dir(spec).parent == tmp_path and world_dir(spec).name.startswith("world-test-")
    monkeypatch.delenv("SOFTDIMO_CACHE")
    assert default_cache_dir().parts[-2:] == (".cache", "softdimo")


def _changed(value):
    return value + "x" if isinstance(value, str) else value * 2 + 1


def test_load_world_without_build_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not built"):
        load_world("test", tmp_path, build_if_missing=False)
    with pytest.raises(KeyError, match="unknown world spec"):
        load_world("huge", tmp_path, build_if_missing=False)


def test_a_world_built_whole_before_component_markers_counts_as_complete(tmp_path):
    from softdimo.world.layout import COMPONENTS, built_components, with_dependencies
    (tmp_path / "manifest.json").write_text("{}")
    assert built_components(tmp_path) == set(COMPONENTS)
    (tmp_path / "components").mkdir()
    assert built_components(tmp_path) == set()
    assert with_dependencies(["t2i"]) == {"base", "clip", "t2i_teacher", "features"}
    assert with_dependencies(["c2i"]) == {"base", "c2i_teacher", "features"}
    with pytest.raises(KeyError, match="unknown world component 'nope'"):
        with_dependencies(["nope"])
