"""GenEval: metadata validation, per-image rules, aggregation, the CLIP colour classifier."""
import json

import numpy as np
import pytest
import torch

from evaluators.geneval.detectors import Detection
from evaluators.geneval.official import (COLORS, TASKS, ClipColourClassifier, MetadataError, Rules,
                                evaluate_image, evaluate_images, filter_detections,
                                load_metadata, object_crops, relative_position, save_metadata,
                                summarise, validate_metadata)
from softdimo.world import scenes as S


pytestmark = pytest.mark.usefixtures("no_network")




def det(name, box, score=0.95, mask=None):
    return Detection(name, score, tuple(float(v) for v in box), mask)


def meta(tag, *include, exclude=None):
    m = {"tag": tag, "include": list(include), "prompt": f"a {tag} prompt"}
    if exclude:
        m["exclude"] = exclude
    return m


# ---------------------------------------------------------------- relative position

@pytest.mark.parametrize("offset, want", [
    ((-10, 0), {"left of"}), ((10, 0), {"right of"}), ((0, -10), {"above"}), ((0, 10), {"below"}),
    ((-10, -10), {"left of", "above"}), ((-10, -3), {"left of"}), ((10, 9), {"right of", "below"})])
def test_relations_of_offset_boxes(offset, want):
    b = (0, 0, 4, 4)
    a = (b[0] + offset[0], b[1] + offset[1], b[2] + offset[0], b[3] + offset[1])
    assert relative_position(a, b) == want


def test_relations_dead_zone_is_a_tenth_of_the_summed_sizes():
    b = (0, 0, 10, 10)          # summed widths 20: offsets shrink by 2 px before normalising
    assert relative_position((-1.5, 0, 8.5, 10), b) == set()          # inside the dead zone
    assert relative_position((0, 0, 10, 10), b) == set()              # no offset at all
    # outside it, |offset| - 2 > |offset| / 2 is needed: the relation starts at 4 px
    assert relative_position((-3.99, 0, 6.01, 10), b) == set()
    assert relative_position((-4.01, 0, 5.99, 10), b) == {"left of"}
    assert relative_position((0, 4.01, 10, 14.01), b) == {"below"}
    assert relative_position((-4.01, 0, 5.99, 10), b, position_threshold=0.2) == set()
    assert relative_position((-8.01, 0, 1.99, 10), b, position_threshold=0.2) == {"left of"}
    assert relative_position((-4.01, 0, 5.99, 10), b, position_threshold=0.0) == {"left of"}
    assert relative_position((-0.01, 0, 9.99, 10), b, position_threshold=0.0) == {"left of"}


def test_relations_match_the_worlds_rule():
    rng = np.random.default_rng(0)
    for _ in range(300):
        a, b = (S.SceneObject("circle", "red", *rng.uniform([0, 0, 2], [32, 32, 8]))
                for _ in range(2))
        assert relative_position(a.box(), b.box()) == S.relations(a, b)


# ---------------------------------------------------------------- filtering

def test_filtering_thresholds_sorts_and_caps_without_nms():
    dets = [det("dog", (0, 0, 5, 5), s) for s in (0.3, 0.31, 0.9, 0.95, 0.5)]
    kept = filter_detections(dets, "two_object")["dog"]
    assert [d.score for d in kept] == [0.95, 0.9, 0.5, 0.31]          # strictly above 0.3
    assert [d.score for d in filter_detections(dets, "counting")["dog"]] == [0.95]
    many = [det("cat", (0, 0, 5, 5), 0.5 + i / 100) for i in range(20)]   # identical boxes
    assert len(filter_detections(many, "single_object")["cat"]) == 16
    nms = filter_detections(many, "single_object", Rules(max_overlap=0.5))["cat"]
    assert len(nms) == 1 and nms[0].score == pytest.approx(0.69)


# ---------------------------------------------------------------- rules, task by task

def test_single_and_two_object_prompts():
    one = meta("single_object", {"class": "dog", "count": 1})
    assert evaluate_image(one, [det("dog", (0, 0, 9, 9))], None, None) == (True, "")
    assert evaluate_image(one, [det("cat", (0, 0, 9, 9))], None, None) == \
        (False, "expected dog>=1, found 0")
    assert evaluate_image(one, [det("dog", (0, 0, 9, 9), 0.2)], None, None)[0] is False
    two = meta("two_object", {"class": "dog", "count": 1}, {"class": "cat", "count": 1})
    assert evaluate_image(two, [det("dog", (0, 0, 9, 9)), det("cat", (20, 0, 29, 9))],
                          None, None) == (True, "")
    assert evaluate_image(two, [det("dog", (0, 0, 9, 9))], None, None) == \
        (False, "expected cat>=1, found 0")


def test_counting_prompts_need_the_exact_count_at_the_counting_threshold():
    m = meta("counting", {"class": "clock", "count": 3}, exclude=[{"class": "clock", "count": 4}])
    clocks = [det("clock", (10 * i, 0, 10 * i + 8, 8), 0.95) for i in range(4)]
    assert evaluate_image(m, clocks[:3], None, None) == (True, "")
    assert evaluate_image(m, clocks[:2], None, None) == (False, "expected clock>=3, found 2")
    assert evaluate_image(m, clocks, None, None) == (False, "expected clock<4, found 4")
    unsure = clocks[:3] + [det("clock", (50, 0, 58, 8), 0.85)]        # below 0.9: not counted
    assert evaluate_image(m, unsure, None, None) == (True, "")


def colour_image():
    """64x64 grey image: a red block at (0..16), a blue block at (32..48), rows 0..16."""
    image = np.full((64, 64, 3), 90, np.uint8)
    image[0:16, 0:16] = (250, 0, 0)
    image[0:16, 32:48] = (0, 0, 250)
    masks = []
    for x in (0, 32):
        m = np.zeros((64, 64), bool)
        m[2:14, x + 2:x + 14] = True
        masks.append(m)
    return image, masks


class RecordingClassifier:
    """Stub colour classifier: the colour of a crop's centre pixel; records what it saw."""
    names = {(250, 0, 0): "red", (0, 0, 250): "blue", (153, 153, 153): "grey"}

    def __init__(self):
        self.seen = []

    def __call__(self, crops, class_name):
        self.seen.append((class_name, crops))
        return [self.names.get(tuple(int(v) for v in c[c.shape[0] // 2, c.shape[1] // 2]),
                               "other") for c in crops]


def test_colour_prompts_ask_the_classifier_about_masked_crops():
    image, (red, blue) = colour_image()
    dets = [det("car", (0, 0, 16, 16), 0.9, red), det("bus", (32, 0, 48, 16), 0.8, blue)]
    clf = RecordingClassifier()
    ok = meta("colors", {"class": "car", "count": 1, "color": "red"})
    assert evaluate_image(ok, dets, clf, image) == (True, "")
    (name, (crop,)), = clf.seen
    assert name == "car" and crop.shape == (16, 16, 3)
    assert (crop[2:14, 2:14] == (250, 0, 0)).all()
    assert (crop[0, :] == 153).all() and (crop[:, 15] == 153).all()   # grey outside the mask
    bad = meta("colors", {"class": "bus", "count": 1, "color": "red"})
    assert evaluate_image(bad, dets, clf, torch.from_numpy(image).permute(2, 0, 1)) == \
        (False, "expected red bus>=1, found 0 red; and 1 blue")
    attr = meta("color_attr", {"class": "car", "count": 1, "color": "red"},
                {"class": "bus", "count": 1, "color": "blue"})
    assert evaluate_image(attr, dets, clf, image) == (True, "")
    swapped = meta("color_attr", {"class": "car", "count": 1, "color": "blue"},
                   {"class": "bus", "count": 1, "color": "red"})
    correct, reason = evaluate_image(swapped, dets, clf, image)
    assert not correct and reason.splitlines() == [
        "expected blue car>=1, found 0 blue; and 1 red",
        "expected red bus>=1, found 0 red; and 1 blue"]
    with pytest.raises(ValueError, match="colour classifier"):
        evaluate_image(ok, dets, None, image)


def test_crops_round_boxes_like_pil_and_pad_outside_the_image():
    image = np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3)
    (crop,) = object_crops(image, [det("x", (1.4, 2.6, 5.5, 9.0))], Rules())
    assert crop.shape == (6, 5, 3)          # round(): x 1..6 (5.5 -> 6), y 3..9 past the edge
    np.testing.assert_array_equal(crop[:5], image[3:8, 1:6])
    assert (crop[5] == 0).all()
    (whole,) = object_crops(image, [det("x", (1, 1, 3, 3))], Rules(crop=False))
    np.testing.assert_array_equal(whole, image)
    with pytest.raises(ValueError, match="does not match"):
        object_crops(image, [det("x", (1, 1, 3, 3), mask=np.ones((4, 4), bool))])


@pytest.mark.parametrize("relation, offset", [("left of", (-20, 0)), ("right of", (20, 0)),
                                              ("above", (0, -20)), ("below", (0, 20))])
def test_position_prompts_check_every_relation(relation, offset):
    m = meta("position", {"class": "dog", "count": 1},
             {"class": "cat", "count": 1, "position": [relation, 0]})
    dog = det("dog", (30, 30, 40, 40))
    cat = det("cat", (30 + offset[0], 30 + offset[1], 40 + offset[0], 40 + offset[1]))
    assert evaluate_image(m, [dog, cat], None, None) == (True, "")
    flipped = det("cat", (30 - offset[0], 30 - offset[1], 40 - offset[0], 40 - offset[1]))
    opposite = {"left of": "right of", "right of": "left of", "above": "below",
                "below": "above"}[relation]
    assert evaluate_image(m, [dog, flipped], None, None) == \
        (False, f"expected cat {relation} target, found {opposite} target")


def test_position_dead_zone_missing_target_and_every_pair():
    m = meta("position", {"class": "dog", "count": 1},
             {"class": "cat", "count": 1, "position": ["left of", 0]})
    dog = det("dog", (30, 30, 40, 40))
    near = det("cat", (28.5, 30, 38.5, 40))                  # 1.5 px < 0.1 x 20: no relation
    assert evaluate_image(m, [dog, near], None, None) == \
        (False, "expected cat left of target, found  target")
    far = det("cat", (17, 30, 27, 40))
    assert evaluate_image(m, [far], None, None) == (False, "expected dog>=1, found 0\n"
                                                           "no target for cat to be left of")
    two = meta("position", {"class": "dog", "count": 2},
               {"class": "cat", "count": 1, "position": ["left of", 0]})
    dogs = [dog, det("dog", (0, 30, 10, 40), 0.9)]           # the cat is right of the 2nd dog
    assert evaluate_image(two, dogs + [far], None, None)[0] is False
    assert evaluate_image(two, [dog, det("dog", (50, 30, 60, 40), 0.9), far], None, None)[0]


def test_a_colour_failure_leaves_no_target_for_later_positions():
    image, (red, blue) = colour_image()
    m = meta("position", {"class": "car", "count": 1, "color": "blue"},
             {"class": "bus", "count": 1, "position": ["right of", 0]})
    dets = [det("car", (0, 0, 16, 16), 0.9, red), det("bus", (32, 0, 48, 16), 0.9, blue)]
    correct, reason = evaluate_image(m, dets, RecordingClassifier(), image)
    assert not correct and reason.splitlines()[1] == "no target for bus to be right of"


# ---------------------------------------------------------------- aggregation

def test_summary_is_the_unweighted_mean_of_task_scores():
    rows = []
    table = {"single_object": [1, 1, 1, 1], "two_object": [1, 0, 0, 0], "counting": [0, 0],
             "colors": [1, 1, 0, 0, 0, 0], "position": [0, 0, 0, 0], "color_attr": [1, 0]}
    for tag, flags in table.items():
        for k, f in enumerate(flags):   # two images per prompt
            rows.append({"tag": tag, "metadata": f"{tag}{k // 2}", "correct": bool(f)})
    s = summarise(rows)
    per_task = {"single_object": 1.0, "two_object": 0.25, "counting": 0.0, "colors": 1 / 3,
                "position": 0.0, "color_attr": 0.5}
    for tag, v in per_task.items():
        assert s[tag] == pytest.approx(v)
    assert s["overall"] == pytest.approx(sum(per_task.values()) / 6)
    assert s["correct_images"] == pytest.approx(8 / 22)
    # prompts with any correct image: so 2/2, two 1/2, count 0/1, colors 1/3, pos 0/2, attr 1/1
    assert s["correct_prompts"] == pytest.approx(5 / 11)
    assert (s["n_images"], s["n_prompts"]) == (22, 11)
    with pytest.raises(ValueError):
        summarise([])


def test_evaluate_images_is_prompt_major_and_checks_the_count():
    class ByPixel:                      # "dog" iff the image's first pixel is bright
        name = "stub"

        def detect(self, image):
            return [det("dog", (0, 0, 4, 4))] if int(image[0, 0, 0]) > 100 else []
    m = [meta("single_object", {"class": "dog", "count": 1}), meta("colors", {"class": "dog", "count": 1})]
    images = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    images[1] = 255
    rows = evaluate_images(m, images, 2, ByPixel(), None)
    assert [(r["filename"], r["correct"]) for r in rows] == \
        [("00000/samples/00000.png", False), ("00000/samples/00001.png", True),
         ("00001/samples/00000.png", False), ("00001/samples/00001.png", False)]
    assert summarise(rows)["correct_prompts"] == 0.5
    # the official summary_scores.py counts a prompt per distinct metadata line: twice the same
    # line is one prompt
    twice = evaluate_images([m[0], m[0]], images, 2, ByPixel(), None)
    assert summarise(twice)["n_prompts"] == 1 and summarise(twice)["correct_prompts"] == 1.0
    with pytest.raises(ValueError, match="2 prompts"):
        evaluate_images(m, images[:3], 2, ByPixel(), None)


# ---------------------------------------------------------------- metadata files

GOOD = {"tag": "position", "include": [{"class": "teddy bear", "count": 1},
                                       {"class": "dog", "count": 1, "position": ["right of", 0]}],
        "prompt": "a photo of a dog right of a teddy bear"}


def test_metadata_round_trips_through_jsonl(tmp_path):
    counting = {"tag": "counting", "include": [{"class": "clock", "count": 2}],
                "exclude": [{"class": "clock", "count": 3}], "prompt": "a photo of two clocks"}
    path = save_metadata([GOOD, counting], tmp_path / "m.jsonl")
    path.write_text(path.read_text() + "\n")                  # blank lines are skipped
    assert load_metadata(path) == [GOOD, counting]


@pytest.mark.parametrize("change, message", [
    (lambda m: m.update(tag="colours"), "'tag' must be one of"),
    (lambda m: m.pop("prompt"), "'prompt' must be"),
    (lambda m: m.update(include=[]), "'include' must be"),
    (lambda m: m["include"][0].update(count=0), "include[0]: 'count' must be"),
    (lambda m: m["include"][0].update(count="2"), "include[0]: 'count' must be"),
    (lambda m: m["include"][0].update(count=True), "include[0]: 'count' must be"),
    (lambda m: m["include"][0].update({"class": "unicorn"}), "unknown class 'unicorn'"),
    (lambda m: m["include"][0].update(color="teal"), "'color' must be one of"),
    (lambda m: m["include"][1].update(position=["right of", 1]), "'position' must be"),
    (lambda m: m["include"][1].update(position=["beside", 0]), "'position' must be"),
    (lambda m: m.update(includes=[]), "unknown keys ['includes']"),
    (lambda m: m.update(exclude=[{"class": "dog", "count": 1, "color": "red"}]),
     "exclude[0]: unknown keys ['color']"),
])
def test_metadata_errors_name_the_line_and_field(tmp_path, change, message):
    bad = json.loads(json.dumps(GOOD))
    change(bad)
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(MetadataError) as e:
        load_metadata(path)
    assert str(e.value).startswith(f"{path}:2: ") and message in str(e.value)
    assert "\n" not in str(e.value)


def test_metadata_rejects_broken_json_non_objects_and_empty_files(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps(GOOD) + "\n{\"tag\": \n")
    with pytest.raises(MetadataError, match=r"m.jsonl:2: invalid JSON"):
        load_metadata(path)
    path.write_text("[1, 2]\n")
    with pytest.raises(MetadataError, match=r"m.jsonl:1: expected a JSON object"):
        load_metadata(path)
    path.write_text("\n")
    with pytest.raises(MetadataError, match="no metadata lines"):
        load_metadata(path)


def test_the_official_file_comes_from_the_weights_registry(tmp_path, monkeypatch):
    weights = pytest.importorskip("evaluators.networks.weights")
    monkeypatch.setenv(weights.WEIGHTS_ENV, str(tmp_path))
    with pytest.raises(weights.WeightsMissing, match="geneval_meta"):
        load_metadata()
    (tmp_path / "geneval").mkdir()
    save_metadata([GOOD], tmp_path / "geneval" / "evaluation_metadata.jsonl")
    assert load_metadata() == [GOOD]


def test_tasks_are_the_worlds_tasks():
    assert TASKS == S.TASKS
    validate_metadata(GOOD)


# ---------------------------------------------------------------- CLIP colour classifier

def tiny_clip():
    import open_clip
    from open_clip.model import CLIP
    cfg = {"embed_dim": 16, "quick_gelu": True,
           "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "head_width": 16,
                          "layers": 1},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2,
                        "layers": 1}}
    torch.manual_seed(0)
    model = CLIP(**cfg).eval()
    return cfg, model, open_clip.SimpleTokenizer(context_length=16), \
        open_clip.image_transform(32, is_train=False)


def test_clip_colour_classifier_is_a_zero_shot_argmax():
    _, model, tokenizer, preprocess = tiny_clip()
    clf = ClipColourClassifier(model, tokenizer, preprocess, batch=2)
    w = clf.text_weights("dog")
    assert w.shape == (len(COLORS), 16)
    torch.testing.assert_close(w.norm(dim=-1), torch.ones(len(COLORS)))
    assert clf.text_weights("dog") is w and not torch.equal(clf.text_weights("cat"), w)
    rng = np.random.default_rng(0)
    crops = [rng.integers(0, 256, (h, 11, 3), dtype=np.uint8) for h in (5, 9, 20)]
    got = clf(crops, "dog")
    from PIL import Image
    x = torch.stack([preprocess(Image.fromarray(c)) for c in crops])
    emb = model.encode_image(x)
    want = [COLORS[i] for i in (emb @ w.T).argmax(-1).tolist()]
    assert got == want
    assert ClipColourClassifier(model, tokenizer, preprocess, batch=16)(crops, "dog") == got
    assert clf([], "dog") == []


def test_clip_colour_classifier_loads_a_local_state_dict_strictly(tmp_path):
    weights = pytest.importorskip("evaluators.networks.weights")
    import open_clip
    from safetensors.torch import save_file
    cfg, model, _, _ = tiny_clip()
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "geneval-tiny-test.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "configs")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    clf = ClipColourClassifier.from_weights(tmp_path / "w.safetensors", "geneval-tiny-test")
    torch.testing.assert_close(clf.text_weights("dog"),
                               ClipColourClassifier(model, clf.tokenizer, clf.preprocess)
                               .text_weights("dog"))
    state["extra.weight"] = state.pop("logit_scale")
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(weights.StateDictMismatch, match="logit_scale.*extra.weight"):
        ClipColourClassifier.from_weights(tmp_path / "bad.safetensors", "geneval-tiny-test")
    with pytest.raises(weights.WeightsMissing, match="clip_l14"):
        ClipColourClassifier.from_weights(tmp_path / "absent.safetensors")
