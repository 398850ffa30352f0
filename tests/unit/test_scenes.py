"""The shapes world's scenes: determinism, pixels that match the spec, captions that are true."""
import numpy as np
import pytest
import torch

from softdimo.world import scenes as S


def _palette_present(image: torch.Tensor) -> set[str]:
    """Colour names whose exact palette RGB occurs in a uint8 image [3, H, W]."""
    pixels = {tuple(p) for p in image.reshape(3, -1).T.tolist()}
    return {name for name, rgb in zip(S.COLOURS, S.PALETTE.tolist()) if tuple(rgb) in pixels}


def test_same_seed_same_samples_other_seed_differs():
    a_img, a_cap, _ = S.sample_t2i(24, 3)
    b_img, b_cap, _ = S.sample_t2i(24, 3)
    c_img, _, _ = S.sample_t2i(24, 4)
    assert torch.equal(a_img, b_img) and a_cap == b_cap
    assert not torch.equal(a_img, c_img)
    x1, y1 = S.sample_c2i(18, torch.Generator().manual_seed(0))
    x2, y2 = S.sample_c2i(18, torch.Generator().manual_seed(0))
    assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_c2i_labels_are_balanced_and_pixels_show_the_class_colour():
    images, labels = S.sample_c2i(36, 1)
    assert images.shape == (36, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.dtype == torch.long
    assert torch.equal(torch.bincount(labels, minlength=18), torch.full((18,), 2))
    names = S.class_names()
    assert len(names) == 18 and names[1 * 6 + 2] == "a photo of a blue square"
    for img, y in zip(images, labels.tolist()):
        assert _palette_present(img) == {S.COLOURS[y % 6]}


def test_t2i_objects_fit_do_not_overlap_and_colours_are_in_the_pixels():
    images, captions, scenes = S.sample_t2i(120, 2)
    for img, scene in zip(images, scenes):
        assert 1 <= len(scene.objects) <= S.MAX_OBJECTS
        assert _palette_present(img) == {o.colour for o in scene.objects}
        for i, a in enumerate(scene.objects):
            x0, y0, x1, y1 = a.box()
            assert x0 >= 0 and y0 >= 0 and x1 <= 32 and y1 <= 32 and a.r >= 3.5
            for b in scene.objects[i + 1:]:
                assert abs(a.cx - b.cx) > a.r + b.r or abs(a.cy - b.cy) > a.r + b.r


def test_all_six_tasks_appear_and_captions_are_true():
    _, captions, scenes = S.sample_t2i(120, 5)
    assert {s.task for s in scenes} == set(S.TASKS)
    for caption, scene in zip(captions, scenes):
        shapes = [o.shape for o in scene.objects]
        colours = [o.colour for o in scene.objects]
        assert caption == scene.caption and caption.startswith("a photo of ")
        if scene.task == "counting":
            n = len(scene.objects)
            assert S.NUMBERS[n - 1] in caption and len(set(shapes)) == 1 and shapes[0] in caption
        elif scene.task == "position":
            rel = scene.meta["relation"]
            assert caption == f"a photo of a {shapes[0]} {rel} a {shapes[1]}"
            assert S.relations(scene.objects[0], scene.objects[1]) == {rel}
        elif scene.task == "color_attr":
            assert caption == f"a photo of a {colours[0]} {shapes[0]} and a {colours[1]} {shapes[1]}"
            assert shapes[0] != shapes[1] and colours[0] != colours[1]
        elif scene.task == "two_object":
            assert caption == f"a photo of a {shapes[0]} and a {shapes[1]}"
        elif scene.task == "colors":
            assert caption == f"a photo of a {colours[0]} {shapes[0]}"
        else:
            assert caption == f"a photo of a {shapes[0]}" and len(shapes) == 1


def test_render_geometry_matches_the_shape_definitions():
    r = 8.0
    scenes = [S.Scene((S.SceneObject(shape, "red", 16.0, 16.0, r),)) for shape in S.SHAPES]
    images = S.render(scenes)
    filled = (images[:, 0] == S.PALETTE[0, 0]).sum(dim=(1, 2)).float()
    side = 2 * S.SQUARE_HALF * r
    assert filled[0] == pytest.approx(np.pi * r * r, rel=0.05)       # circle
    assert filled[1] == pytest.approx(side * side, rel=0.12)          # square
    assert filled[2] == pytest.approx(2 * r * r, rel=0.1)             # triangle: ½·2r·2r
    assert tuple(images[0, :, 0, 0].tolist()) == tuple(S.BACKGROUND.tolist())
    # the triangle points up: its top rows are narrower than its bottom rows
    rows = (images[2, 0] == S.PALETTE[0, 0]).sum(dim=1)
    assert rows[9] < rows[22]


def test_relations_follow_geneval_box_rule():
    a = S.SceneObject("circle", "red", 6.0, 16.0, 4.0)
    b = S.SceneObject("square", "red", 26.0, 16.0, 4.0)
    assert S.relations(a, b) == {"left of"} and S.relations(b, a) == {"right of"}
    c = S.SceneObject("square", "red", 8.0, 26.0, 4.0)
    assert S.relations(a, c) == {"above"}
    # centres closer than 10% of the summed box sizes: no relation at all
    d = S.SceneObject("square", "red", 7.0, 16.5, 4.0)
    assert S.relations(a, d) == set()
    # a diagonal offset gives both relations
    e = S.SceneObject("square", "red", 26.0, 36.0, 4.0)
    assert S.relations(a, e) == {"left of", "above"}


def test_hard_negatives_change_one_attribute_and_are_false():
    rng = np.random.default_rng(0)
    _, _, scenes = S.sample_t2i(60, 6)
    for scene in scenes + S.c2i_scenes(6, 0):
        negative = S.hard_negative(scene, rng)
        assert negative != scene.caption and negative.startswith("a photo of ")
        if scene.task == "position":
            opposite = {"left of": "right of", "right of": "left of", "above": "below",
                        "below": "above"}[scene.meta["relation"]]
            assert opposite in negative
        if scene.task == "color_attr":
            o = scene.objects
            assert negative == f"a photo of a {o[1].colour} {o[0].shape} and a {o[0].colour} {o[1].shape}"


def test_scene_dict_round_trip_renders_identically():
    _, _, scenes = S.sample_t2i(12, 7)
    back = [S.scene_from_dict(S.scene_to_dict(s)) for s in scenes]
    assert back == scenes
    assert torch.equal(S.render(back), S.render(scenes))
    with pytest.raises(ValueError, match="unknown task"):
        S._t2i_scene(np.random.default_rng(0), "drawing")
