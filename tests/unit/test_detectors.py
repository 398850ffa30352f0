"""GenEval detectors (the world's exact scene parser, HF Mask2Former) and GenEval-world."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from evaluators.geneval.detectors import (GENEVAL_CLASSES, MASK2FORMER_NAME, Detection, Detector,
                                  Mask2FormerDetector, WorldSceneDetector, box_from_mask,
                                  shape_masks, to_hwc_uint8)
from evaluators.geneval.official import TASKS, object_crops, relative_position, save_metadata
from evaluators.geneval.world import (WorldColourClassifier, evaluate_world_images,
                                      load_world_metadata, metadata_from_scene, render_witnesses,
                                      robust_relations, score_world_images, world_metadata)
from softdimo.world import scenes as S


pytestmark = pytest.mark.usefixtures("no_network")




def scene(*objects, caption=""):
    return S.Scene(tuple(S.SceneObject(*o) for o in objects), caption)


def test_images_convert_to_hwc_uint8_and_boxes_follow_mask2bbox():
    chw = torch.zeros(3, 4, 5, dtype=torch.uint8)
    assert to_hwc_uint8(chw).shape == (4, 5, 3)
    assert to_hwc_uint8(np.zeros((4, 5, 3), np.uint8)).shape == (4, 5, 3)
    with pytest.raises(ValueError, match="uint8"):
        to_hwc_uint8(torch.zeros(3, 4, 5))
    mask = np.zeros((6, 8), bool)
    mask[1:3, 2:7] = True
    assert box_from_mask(mask) == (2.0, 1.0, 7.0, 3.0)


@pytest.mark.parametrize("shape", S.SHAPES)
def test_shape_masks_rasterise_exactly_like_render(shape):
    rng = np.random.default_rng(0)
    params = np.column_stack([rng.uniform(8, 24, 50), rng.uniform(8, 24, 50),
                              rng.uniform(2.5, 7.9, 50)])
    grid = np.arange(32) + 0.5
    ours = shape_masks(shape, params, grid, grid)
    images = S.render([scene((shape, "red", *p)) for p in params])
    theirs = (images != torch.from_numpy(S.BACKGROUND)[:, None, None]).any(1).numpy()
    np.testing.assert_array_equal(ours, theirs)


def parsed_matches(parsed, objects):
    """Pair each scene object with the nearest parsed object of its shape and colour."""
    pairs = []
    for o in objects:
        same = [p for p in parsed if (p.shape, p.colour) == (o.shape, o.colour)]
        pairs.append((o, min(same, key=lambda p: (p.cx - o.cx) ** 2 + (p.cy - o.cy) ** 2)))
    return pairs


def test_world_parser_is_exact_on_the_worlds_renders():
    scenes = S.t2i_scenes(120, 11) + S.c2i_scenes(24, 12)
    images = S.render(scenes)
    det = WorldSceneDetector()
    robust = agree = pairs = 0
    for sc, image in zip(scenes, images):
        parsed = det.parse(image)
        # class, colour and count: exact on every scene
        assert sorted((p.shape, p.colour) for p in parsed) == \
            sorted((o.shape, o.colour) for o in sc.objects), sc
        assert all(d.score == 1.0 for d in det.detect(image))
        matched = parsed_matches(parsed, sc.objects)
        for o, p in matched:   # the pixels pin a box edge down to half a pixel at worst
            assert max(abs(p.cx - o.cx), abs(p.cy - o.cy), abs(p.r - o.r)) < 0.6
        for i, (oa, pa) in enumerate(matched):
            for j, (ob, pb) in enumerate(matched):
                if i == j:
                    continue
                pairs += 1
                same = S.relations(pa, pb) == S.relations(oa, ob)
                agree += same
                # relations are exact wherever the scene's relation has a pixel of slack
                if robust_relations(oa, ob, 0.75) is not None:
                    robust += 1
                    assert same, (sc, oa, ob)
    assert robust > 0.8 * pairs and agree >= 0.97 * pairs, (robust, agree, pairs)


def test_world_parser_reads_position_scenes_through_geneval_boxes():
    scenes = [s for s in S.t2i_scenes(300, 4) if s.task == "position"]
    det = WorldSceneDetector()
    checked = 0
    for sc, image in zip(scenes, S.render(scenes)):
        a, b = sc.objects
        if robust_relations(a, b, 0.75) != {sc.meta["relation"]}:
            continue
        by_shape = {d.class_name: d for d in det.detect(image)}
        assert relative_position(by_shape[a.shape].box, by_shape[b.shape].box) == \
            {sc.meta["relation"]}
        checked += 1
    assert checked >= 35


def test_world_parser_tolerates_noise_and_soft_edges():
    scenes = S.t2i_scenes(60, 5)
    k = 4   # render 4× larger and average-pool: edge pixels become colour blends
    big = [scene(*[(o.shape, o.colour, o.cx * k, o.cy * k, o.r * k) for o in s.objects])
           for s in scenes]
    soft = torch.nn.functional.avg_pool2d(S.render(big, size=32 * k).float(), k)
    noise = torch.from_numpy(np.random.default_rng(0).normal(0, 10, soft.shape)).float()
    images = (soft + noise).clamp(0, 255).round().to(torch.uint8)
    det = WorldSceneDetector()
    for sc, image in zip(scenes, images):
        assert sorted((p.shape, p.colour) for p in det.parse(image)) == \
            sorted((o.shape, o.colour) for o in sc.objects)
        assert all(d.score > 0.9 for d in det.detect(image))


def test_world_parser_ignores_background_and_specks_and_doubts_blobs():
    det = WorldSceneDetector()
    blank = S.render([scene()])[0]
    assert det.detect(blank) == []
    image = to_hwc_uint8(blank).copy()
    image[2:4, 2:4] = S.PALETTE[0]                 # 4-pixel speck: below min_area
    image[10:30, 14:17] = S.PALETTE[1]             # a plus sign is no world shape
    image[20:23, 5:26] = S.PALETTE[1]
    dets = det.detect(image)
    assert len(dets) == 1 and dets[0].score < 0.9 and dets[0].mask.sum() == 60 + 63 - 9
    assert isinstance(det, Detector)


def test_mask_boxes_mode_reports_the_tight_mask_box():
    image = S.render([scene(("square", "blue", 16.0, 16.0, 8.0))])[0]
    (scene_det,) = WorldSceneDetector().detect(image)
    (mask_det,) = WorldSceneDetector(boxes="mask").detect(image)
    assert mask_det.box == box_from_mask(mask_det.mask) == (9.0, 9.0, 23.0, 23.0)
    np.testing.assert_allclose(scene_det.box, (8.0, 8.0, 24.0, 24.0), atol=0.6)
    with pytest.raises(ValueError):
        WorldSceneDetector(boxes="both")


# HF's COCO instance configs spell four classes differently from GenEval
HF_COCO = [{"computer mouse": "mouse", "tv remote": "remote", "computer keyboard": "keyboard"}
           .get(n, n) for n in GENEVAL_CLASSES]


def tiny_mask2former(labels=HF_COCO):
    from transformers import (Mask2FormerConfig, Mask2FormerForUniversalSegmentation,
                              Mask2FormerImageProcessor, SwinConfig)
    backbone = SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                          window_size=4, image_size=64,
                          out_features=["stage1", "stage2", "stage3", "stage4"])
    config = Mask2FormerConfig(backbone_config=backbone, feature_size=32, mask_feature_size=32,
                               hidden_dim=32, encoder_feedforward_dim=64, dim_feedforward=64,
                               encoder_layers=1, decoder_layers=2, num_attention_heads=2,
                               num_queries=8, id2label=dict(enumerate(labels)),
                               use_pretrained_backbone=False)
    torch.manual_seed(0)
    model = Mask2FormerForUniversalSegmentation(config)
    processor = Mask2FormerImageProcessor(size={"shortest_edge": 64, "longest_edge": 64})
    return model, processor


def test_mask2former_adapter_returns_well_formed_detections():
    model, processor = tiny_mask2former()
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    det = Mask2FormerDetector(model, processor)
    assert "not the official mmdet detector" in det.name and det.name == MASK2FORMER_NAME
    assert "not the official mmdet detector" in Mask2FormerDetector.__doc__
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    dets = det.detect(torch.from_numpy(image).permute(2, 0, 1))
    assert 0 < len(dets) <= 8
    for d in dets:
        assert isinstance(d, Detection) and d.class_name in GENEVAL_CLASSES
        assert 0.0 <= d.score <= 1.0
        assert d.mask.dtype == bool and d.mask.shape == (64, 64) and d.mask.any()
        assert d.box == box_from_mask(d.mask)
    assert "computer mouse" in det.class_names and "mouse" not in det.class_names


def test_mask2former_adapter_rejects_labels_outside_geneval():
    model, processor = tiny_mask2former(labels=["LABEL_0", "person"])
    with pytest.raises(ValueError, match="LABEL_0"):
        Mask2FormerDetector(model, processor)


def test_mask2former_loads_from_a_local_folder_only(tmp_path):
    pytest.importorskip("evaluators.networks.weights")
    model, processor = tiny_mask2former()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    image = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    loaded = Mask2FormerDetector.from_pretrained(tmp_path)
    want = Mask2FormerDetector(model, processor).detect(image)
    got = loaded.detect(image)
    assert [(d.class_name, d.box) for d in got] == [(d.class_name, d.box) for d in want]
    np.testing.assert_allclose([d.score for d in got], [d.score for d in want], atol=1e-5)


# ---------------------------------------------------------------- GenEval-world

def test_world_metadata_follows_the_generator(tmp_path):
    scenes = S.t2i_scenes(240, 7)
    md = world_metadata(scenes, 8, seed=0)
    assert [m["tag"] for m in md] == [t for t in TASKS for _ in range(8)]
    singles = [m["prompt"] for m in md if m["tag"] == "single_object"]
    assert len(set(singles[:3])) == 3 and set(singles) == {f"a photo of a {s}" for s in S.SHAPES}
    for m in md:
        sc = S.scene_from_dict(m["scene"])
        assert m["prompt"] == sc.caption and m == {**metadata_from_scene(sc), "scene": m["scene"]}
        if m["tag"] == "counting":
            n = len(sc.objects)
            assert m["include"] == [{"class": sc.objects[0].shape, "count": n}]
            assert m["exclude"] == [{"class": sc.objects[0].shape, "count": n + 1}]
        if m["tag"] == "position":
            a, b = sc.objects
            assert m["include"] == [{"class": b.shape, "count": 1}, {
                "class": a.shape, "count": 1, "position": [sc.meta["relation"], 0]}]
            assert robust_relations(a, b, 0.75) == {sc.meta["relation"]}
    assert world_metadata(scenes, 8, seed=0) == md != world_metadata(scenes, 8, seed=1)
    world = SimpleNamespace(reference=lambda track: SimpleNamespace(scenes=scenes))
    assert world_metadata(world, 8, seed=0) == md
    assert load_world_metadata(save_metadata(md, tmp_path / "w.jsonl")) == md
    with pytest.raises(ValueError, match="no usable 'position' scenes"):
        world_metadata([s for s in scenes if s.task != "position"], 2, seed=0)


def test_the_worlds_own_renders_score_one():
    md = world_metadata(S.t2i_scenes(300, 8), 10, seed=1)
    images = render_witnesses(md).repeat_interleave(2, dim=0)          # 2 images per prompt
    scores = score_world_images(md, images, 2)
    assert scores["overall"] == 1.0 and scores["correct_prompts"] == 1.0
    assert all(scores[t] == 1.0 for t in TASKS) and scores["n_images"] == 120


def one(tag, objects, caption, **meta_):
    sc = S.Scene(tuple(S.SceneObject(*o) for o in objects), caption, tag, meta=meta_)
    return metadata_from_scene(sc), sc


@pytest.mark.parametrize("tag, right, wrong, reason", [
    ("single_object", [("circle", "red", 16, 16, 8)], [("square", "red", 16, 16, 8)],
     "expected circle>=1, found 0"),
    ("two_object", [("circle", "red", 8, 8, 5), ("square", "blue", 24, 24, 5)],
     [("circle", "red", 8, 8, 5), ("triangle", "blue", 24, 24, 5)], "expected square>=1, found 0"),
    ("counting", [("square", "cyan", 8, 8, 5), ("square", "red", 24, 24, 5)],
     [("square", "cyan", 8, 8, 5), ("square", "red", 24, 24, 5), ("square", "red", 8, 24, 5)],
     "expected square<3, found 3"),
    ("counting", [("square", "cyan", 8, 8, 5), ("square", "red", 24, 24, 5)],
     [("square", "cyan", 8, 8, 5)], "expected square>=2, found 1"),
    ("colors", [("triangle", "magenta", 16, 16, 8)], [("triangle", "cyan", 16, 16, 8)],
     "expected magenta triangle>=1, found 0 magenta; and 1 cyan"),
    ("position", [("circle", "red", 6, 16, 5), ("square", "blue", 26, 16, 5)],
     [("circle", "red", 26, 16, 5), ("square", "blue", 6, 16, 5)],
     "expected circle left of target, found right of target"),
    ("color_attr", [("circle", "red", 8, 8, 5), ("square", "blue", 24, 24, 5)],
     [("circle", "blue", 8, 8, 5), ("square", "blue", 24, 24, 5)],
     "expected red circle>=1, found 0 red; and 1 blue"),
])
def test_wrong_world_images_fail_for_the_right_reason(tag, right, wrong, reason):
    extra = {"relation": "left of"} if tag == "position" else {}
    if tag == "counting":
        extra = {"count": len(right)}
    m, sc = one(tag, right, "caption", **extra)
    images = S.render([sc, S.Scene(tuple(S.SceneObject(*o) for o in wrong))])
    rows = evaluate_world_images([m], images, 2)
    assert rows[0]["correct"] and rows[0]["reason"] == ""
    assert not rows[1]["correct"] and rows[1]["reason"] == reason


def test_world_colour_classifier_reads_the_palette_from_geneval_crops():
    clf = WorldColourClassifier()
    images = S.render([S.Scene((S.SceneObject("circle", c, 16, 16, 8),)) for c in S.COLOURS])
    crops = [object_crops(im, WorldSceneDetector().detect(im))[0] for im in images]
    assert clf(crops, "circle") == list(S.COLOURS)
    assert clf([np.full((4, 4, 3), 153, np.uint8)], "circle") == ["none"]


def test_robust_relations_need_slack_on_every_side():
    a, b = S.SceneObject("circle", "red", 6, 16, 5), S.SceneObject("square", "red", 26, 16, 5)
    assert robust_relations(a, b, 0.75) == {"left of"}
    # dx exactly at the 0.5 boundary: any nudge flips "above" on or off
    c = S.SceneObject("circle", "red", 16, 16, 2)
    d = S.SceneObject("circle", "red", 16 + 10 * np.sqrt(3), 26, 2)
    assert robust_relations(c, d, 0.75) is None
