"""GenEval-world: GenEval's six tasks and rules on the embedded world's text-to-image track.

The world's t2i captions already follow GenEval's task grammar (softdimo/world/scenes.py), so each
scene becomes one GenEval metadata line with the world's caption as its prompt; images are scored
by the same rules (evaluators/geneval/official.py) with the world's exact scene parser as the detector and
the world's palette as the colour classifier.

Vocabulary: classes are the world's shape names and colours the world's own colour names
(red, green, blue, yellow, magenta, cyan). We keep the world's names rather than mapping to
GenEval's ten: the prompts say "magenta" and "cyan", which have no GenEval counterpart, and a
many-to-one mapping (magenta -> purple or pink?) would make the colour tasks ambiguous.

Differences from the official metadata, all following the world's generator: counting prompts run
1-4 (GenEval: 2-4), always with the exclude clause count + 1; every line carries its witness
scene under the extra key "scene" (scenes.scene_to_dict), which the rules ignore. Position
witnesses are kept only when their relation survives changing both objects' centres and sizes by
``margin`` pixels (0.75 by default; about 86% of the generator's position scenes qualify), because
pixels pin a shape's box down only to about half a pixel (a square's edge can sit anywhere between
two pixel centres) and no parser can then recover a relation that sits on a threshold.
"""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from evaluators.geneval.detectors import WorldSceneDetector
from evaluators.geneval.official import (RELATIONS, TASKS, Rules, evaluate_images, load_metadata,
                                summarise, validate_metadata)
from softdimo.world.scenes import (BACKGROUND, COLOURS, PALETTE, POSITION_THRESHOLD, SHAPES,
                                   Scene, SceneObject, render, scene_from_dict, scene_to_dict)

# every combination of -m, 0, +m on (cx, cy, r) of both objects: [729, 6]
_CORNERS = np.array(list(itertools.product((-1.0, 0.0, 1.0), repeat=6)))


class WorldColourClassifier:
    """Colour of each crop = the palette colour most of its object pixels are nearest to.

    Crops are what GenEval's rules hand a colour classifier (object over ``bgcolor`` outside its
    mask); pixels nearest the background, the grey or farther than ``tolerance`` from every palette
    colour do not vote. Returns the world's colour names, or "none" when no pixel votes.
    """

    def __init__(self, bgcolor: Sequence[int] = Rules.bgcolor, tolerance: float = 80.0):
        self.refs = np.concatenate([PALETTE, BACKGROUND[None], np.array([bgcolor], np.uint8)]
                                   ).astype(np.float32)
        self.tolerance = tolerance

    def __call__(self, crops: Sequence[np.ndarray], class_name: str) -> list[str]:
        out = []
        for crop in crops:
            d2 = ((crop.reshape(-1, 1, 3).astype(np.float32) - self.refs) ** 2).sum(-1)
            label = d2.argmin(-1)
            votes = label[(label < len(PALETTE)) & (d2.min(-1) <= self.tolerance ** 2)]
            out.append(COLOURS[int(np.bincount(votes).argmax())] if len(votes) else "none")
        return out


def metadata_from_scene(scene: Scene) -> dict:
    """A t2i scene -> its GenEval metadata line (tag, include, optional exclude, prompt)."""
    o = scene.objects
    if scene.task == "single_object":
        include = [{"class": o[0].shape, "count": 1}]
    elif scene.task == "two_object":
        include = [{"class": o[0].shape, "count": 1}, {"class": o[1].shape, "count": 1}]
    elif scene.task == "counting":
        n = scene.meta.get("count", len(o))
        return {"tag": "counting", "include": [{"class": o[0].shape, "count": n}],
                "exclude": [{"class": o[0].shape, "count": n + 1}], "prompt": scene.caption}
    elif scene.task == "colors":
        include = [{"class": o[0].shape, "count": 1, "color": o[0].colour}]
    elif scene.task == "position":
        # GenEval's order: the reference object first, the caption's subject relative to it
        include = [{"class": o[1].shape, "count": 1},
                   {"class": o[0].shape, "count": 1, "position": [scene.meta["relation"], 0]}]
    elif scene.task == "color_attr":
        include = [{"class": o[0].shape, "count": 1, "color": o[0].colour},
                   {"class": o[1].shape, "count": 1, "color": o[1].colour}]
    else:
        raise ValueError(f"scene task {scene.task!r} is not a GenEval task {TASKS}")
    return {"tag": scene.task, "include": include, "prompt": scene.caption}


def robust_relations(a: SceneObject, b: SceneObject, margin: float) -> set[str] | None:
    """a's relations w.r.t. b (scenes.relations) if they stay the same under every ±margin pixel
    change of (cx, cy, r) of both objects (the corners of that box of changes), else None."""
    p = np.array([a.cx, a.cy, a.r, b.cx, b.cy, b.r]) + margin * _CORNERS          # [729, 6]
    offset = p[:, 0:2] - p[:, 3:5]
    dims = 2 * (p[:, 2:3] + p[:, 5:6])                       # box sizes 2r, same on both axes
    revised = np.maximum(np.abs(offset) - POSITION_THRESHOLD * dims, 0) * np.sign(offset)
    dead = np.all(np.abs(revised) < 1e-3, axis=1)
    dx, dy = (revised / np.maximum(np.linalg.norm(offset, axis=1, keepdims=True), 1e-12)).T
    holds = {"left of": dx < -0.5, "right of": dx > 0.5, "above": dy < -0.5, "below": dy > 0.5}
    if np.all(dead):
        return set()
    if np.any(dead):
        return None
    out = set()
    for rel in RELATIONS:
        if np.all(holds[rel]):
            out.add(rel)
        elif np.any(holds[rel]):
            return None
    return out


def _scenes(world_or_scenes: Any) -> list[Scene]:
    if hasattr(world_or_scenes, "reference"):                 # a loaded World
        scenes = world_or_scenes.reference("t2i").scenes
        if scenes is None:
            raise ValueError("the world's t2i reference split has no scene specs")
        return list(scenes)
    return [scene_from_dict(s) if isinstance(s, Mapping) else s for s in world_or_scenes]


def world_metadata(world_or_scenes: Any, n_per_task: int, seed: int,
                   margin: float = 0.75) -> list[dict]:
    """GenEval metadata for the six tasks from the world's t2i scenes (a World's held-out
    reference split, or a sequence of Scene / scene dicts): n_per_task lines per task, task by
    task in TASKS order. Within a task, distinct captions come first in a seeded order and repeat
    (with other witness scenes where there are any) only once all have been used."""
    rng = np.random.default_rng(seed)
    scenes = _scenes(world_or_scenes)
    out = []
    for task in TASKS:
        groups: dict[str, list[Scene]] = {}
        for s in scenes:
            if s.task != task or (task == "position" and robust_relations(
                    s.objects[0], s.objects[1], margin) != {s.meta["relation"]}):
                continue
            groups.setdefault(s.caption, []).append(s)
        if not groups:
            raise ValueError(f"no usable {task!r} scenes among {len(scenes)} to build metadata")
        captions = [c for c in groups]
        captions = [captions[i] for i in rng.permutation(len(captions))]
        for c in captions:
            groups[c] = [groups[c][i] for i in rng.permutation(len(groups[c]))]
        for i in range(n_per_task):
            caption = captions[i % len(captions)]
            witness = groups[caption][(i // len(captions)) % len(groups[caption])]
            entry = metadata_from_scene(witness)
            entry["scene"] = scene_to_dict(witness)
            out.append(validate_metadata(entry, f"{task} line {i}", SHAPES, COLOURS))
    return out


def load_world_metadata(path: str | Path) -> list[dict]:
    """Read GenEval-world metadata (.jsonl) saved with geneval.save_metadata, validated against
    the world's shapes and colours."""
    return load_metadata(path, classes=SHAPES, colours=COLOURS)


def render_witnesses(metadata: Sequence[Mapping]) -> torch.Tensor:
    """The world's own render of each line's witness scene -> uint8 [P, 3, 32, 32]."""
    return render([scene_from_dict(m["scene"]) for m in metadata])


def evaluate_world_images(metadata: Sequence[Mapping], images: torch.Tensor,
                          images_per_prompt: int, rules: Rules = Rules()) -> list[dict]:
    """Per-image GenEval rows (the official results.jsonl schema) for uint8 images
    [P × images_per_prompt, 3, H, W], prompt-major, with the world parser and palette colours."""
    return evaluate_images(metadata, images, images_per_prompt, WorldSceneDetector(),
                           WorldColourClassifier(rules.bgcolor), rules)


def score_world_images(metadata: Sequence[Mapping], images: torch.Tensor,
                       images_per_prompt: int, rules: Rules = Rules()) -> dict[str, float]:
    """GenEval-world scores: overall, the six task scores, correct_images, correct_prompts,
    n_images, n_prompts (see geneval.summarise)."""
    return summarise(evaluate_world_images(metadata, images, images_per_prompt, rules))
