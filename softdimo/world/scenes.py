"""Procedural scenes of coloured shapes: the embedded world's data (ARCHITECTURE §6).

A scene is 1-4 non-overlapping objects from SHAPES × COLOURS on a plain dark 32×32 canvas. Scenes
are data (dataclasses), so an exact parser can later score GenEval's rules against the spec that
produced an image. Two tracks:

- class-to-image (c2i): one object per scene, class id = shape_index * len(COLOURS) + colour_index;
- text-to-image (t2i): a caption from one of GenEval's six task types, and a scene built to make the
  caption true (position relations are checked with the same rule GenEval applies to boxes).

Images are uint8 [N, 3, H, W]; rendering is vectorised over scenes with numpy.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue", "yellow", "magenta", "cyan")
PALETTE = np.array([[230, 40, 40], [40, 200, 60], [50, 80, 235],
                    [235, 220, 50], [225, 60, 215], [50, 215, 225]], dtype=np.uint8)
BACKGROUND = np.array([22, 22, 30], dtype=np.uint8)
IMAGE_SIZE = 32
MAX_OBJECTS = 4
TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS = ("left of", "right of", "above", "below")
NUMBERS = ("one", "two", "three", "four")
# half-extent of the square relative to r: its area (2.9 r²) is close to the circle's (3.1 r²)
SQUARE_HALF = 0.85
# GenEval's relative_position: box offsets are shrunk by this fraction of the summed box sizes
POSITION_THRESHOLD = 0.1
# object radius ranges (pixels) by number of objects: large enough to read at 32×32
RADIUS = {1: (6.0, 11.0), 2: (5.0, 8.5), 3: (4.5, 7.0), 4: (4.0, 6.5)}


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    cx: float       # centre, pixels (x to the right, y downwards)
    cy: float
    r: float        # half-extent of the bounding box, pixels

    def box(self) -> tuple[float, float, float, float]:
        """Axis-aligned bounding box (x0, y0, x1, y1) in pixels."""
        return self.cx - self.r, self.cy - self.r, self.cx + self.r, self.cy + self.r


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    caption: str = ""
    task: str = ""
    label: int = -1                 # c2i class id, -1 on the t2i track
    meta: dict = field(default_factory=dict, compare=False)  # e.g. {"relation": "left of"}


def class_names() -> list[str]:
    """The 18 c2i class prompts, indexed by class id = shape_index * 6 + colour_index."""
    return [f"a photo of a {c} {s}" for s in SHAPES for c in COLOURS]


def _rng(seed: int | np.random.Generator | torch.Generator) -> np.random.Generator:
    if isinstance(seed, np.random.Generator):
        return seed
    if isinstance(seed, torch.Generator):
        seed = int(torch.randint(0, 2**62, (1,), generator=seed))
    return np.random.default_rng(seed)


def box_relations(box_a, box_b, threshold: float = POSITION_THRESHOLD) -> set[str]:
    """Relations of box a (x0, y0, x1, y1) with respect to box b under GenEval's rule.

    Offsets of the box centres are shrunk by ``threshold`` x the summed box sizes (a dead zone for
    near-aligned objects), then normalised by the raw offset's length; e.g. {"left of", "above"}.
    """
    a, b = np.asarray(box_a, dtype=np.float64), np.asarray(box_b, dtype=np.float64)
    offset = (a[:2] + a[2:]) / 2 - (b[:2] + b[2:]) / 2
    dims = (a[2:] - a[:2]) + (b[2:] - b[:2])
    revised = np.maximum(np.abs(offset) - threshold * dims, 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    out = set()
    if dx < -0.5:
        out.add("left of")
    if dx > 0.5:
        out.add("right of")
    if dy < -0.5:
        out.add("above")
    if dy > 0.5:
        out.add("below")
    return out


def relations(a: SceneObject, b: SceneObject) -> set[str]:
    """Relations of a with respect to b under GenEval's box rule (e.g. {"left of"})."""
    return box_relations(a.box(), b.box())


def _place(rng: np.random.Generator, n: int, radius: tuple[float, float] | None = None,
           tries: int = 200) -> list[tuple[float, float, float]]:
    """n (cx, cy, r) with bounding boxes inside the canvas and at least 1 px apart."""
    lo, hi = radius or RADIUS[n]
    for attempt in range(tries):
        # shrink the size range if the canvas keeps refusing (rare, only for 4 large objects)
        scale = 1.0 - 0.3 * attempt / tries
        placed: list[tuple[float, float, float]] = []
        for _ in range(n):
            for _ in range(50):
                r = rng.uniform(lo, hi) * scale
                cx, cy = rng.uniform(r + 0.5, IMAGE_SIZE - r - 0.5, size=2)
                if all(abs(cx - px) > r + pr + 1 or abs(cy - py) > r + pr + 1
                       for px, py, pr in placed):
                    placed.append((cx, cy, r))
                    break
            else:
                break
        if len(placed) == n:
            return placed
    raise RuntimeError(f"could not place {n} objects")


def _objects(rng: np.random.Generator, shapes: list[str], colours: list[str],
             radius: tuple[float, float] | None = None) -> tuple[SceneObject, ...]:
    spots = _place(rng, len(shapes), radius)
    return tuple(SceneObject(s, c, float(x), float(y), float(r))
                 for s, c, (x, y, r) in zip(shapes, colours, spots))


def _pick(rng: np.random.Generator, options: tuple[str, ...], k: int = 1) -> list[str]:
    """k distinct entries of options."""
    return [options[i] for i in rng.choice(len(options), size=k, replace=False)]


def _any_colours(rng: np.random.Generator, k: int) -> list[str]:
    return [COLOURS[i] for i in rng.integers(0, len(COLOURS), size=k)]


def _t2i_scene(rng: np.random.Generator, task: str) -> Scene:
    if task == "single_object":
        (s,) = _pick(rng, SHAPES)
        return Scene(_objects(rng, [s], _any_colours(rng, 1)), f"a photo of a {s}", task)
    if task == "two_object":
        a, b = _pick(rng, SHAPES, 2)
        return Scene(_objects(rng, [a, b], _any_colours(rng, 2)),
                     f"a photo of a {a} and a {b}", task)
    if task == "counting":
        n = int(rng.integers(1, MAX_OBJECTS + 1))
        (s,) = _pick(rng, SHAPES)
        noun = s if n == 1 else s + "s"
        return Scene(_objects(rng, [s] * n, _any_colours(rng, n)),
                     f"a photo of {NUMBERS[n - 1]} {noun}", task, meta={"count": n})
    if task == "colors":
        (s,), (c,) = _pick(rng, SHAPES), _pick(rng, COLOURS)
        return Scene(_objects(rng, [s], [c]), f"a photo of a {c} {s}", task)
    if task == "position":
        a, b = _pick(rng, SHAPES, 2)
        rel = RELATIONS[int(rng.integers(len(RELATIONS)))]
        colours = _any_colours(rng, 2)
        for _ in range(1000):
            objs = _objects(rng, [a, b], colours)
            # the caption must be the only relation that holds, so it is unambiguous
            if relations(objs[0], objs[1]) == {rel}:
                return Scene(objs, f"a photo of a {a} {rel} a {b}", task, meta={"relation": rel})
        raise RuntimeError(f"could not realise relation {rel!r}")
    if task == "color_attr":
        a, b = _pick(rng, SHAPES, 2)
        ca, cb = _pick(rng, COLOURS, 2)
        return Scene(_objects(rng, [a, b], [ca, cb]), f"a photo of a {ca} {a} and a {cb} {b}", task)
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


def c2i_scenes(n: int, seed: int | np.random.Generator | torch.Generator) -> list[Scene]:
    """n single-object scenes with balanced class labels in a seeded random order."""
    rng = _rng(seed)
    names = class_names()
    labels = rng.permutation(np.arange(n) % len(names))
    scenes = []
    for y in labels.tolist():
        s, c = SHAPES[y // len(COLOURS)], COLOURS[y % len(COLOURS)]
        scenes.append(Scene(_objects(rng, [s], [c]), names[y], "c2i", label=y))
    return scenes


def t2i_scenes(n: int, seed: int | np.random.Generator | torch.Generator) -> list[Scene]:
    """n captioned scenes, the six GenEval task types in equal shares, in a seeded random order."""
    rng = _rng(seed)
    tasks = rng.permutation(np.arange(n) % len(TASKS))
    return [_t2i_scene(rng, TASKS[t]) for t in tasks.tolist()]


def render(scenes: list[Scene], size: int = IMAGE_SIZE) -> torch.Tensor:
    """Scenes -> uint8 images [N, 3, size, size]; hard edges, pixel centres at (i + 0.5)."""
    n = len(scenes)
    params = np.zeros((n, MAX_OBJECTS, 5), dtype=np.float32)   # cx, cy, r, shape id, colour id
    valid = np.zeros((n, MAX_OBJECTS), dtype=bool)
    for i, scene in enumerate(scenes):
        for k, o in enumerate(scene.objects):
            params[i, k] = (o.cx, o.cy, o.r, SHAPES.index(o.shape), COLOURS.index(o.colour))
            valid[i, k] = True
    grid = np.arange(size, dtype=np.float32) + 0.5
    images = np.broadcast_to(BACKGROUND[None, None, None, :], (n, size, size, 3)).copy()
    for k in range(MAX_OBJECTS):
        cx, cy, r, shape, colour = (params[:, k, j, None, None] for j in range(5))
        dx = grid[None, None, :] - cx          # [N, 1, W]
        dy = grid[None, :, None] - cy          # [N, H, 1]
        circle = dx * dx + dy * dy <= r * r
        square = np.maximum(np.abs(dx), np.abs(dy)) <= SQUARE_HALF * r
        # apex (cx, cy - r), base corners (cx ± r, cy + r): half-width grows by 1/2 per row
        triangle = (np.abs(dy) <= r) & (np.abs(dx) <= (dy + r) / 2)
        inside = np.where(shape == 0, circle, np.where(shape == 1, square, triangle))
        inside &= valid[:, k, None, None]
        colours = PALETTE[params[:, k, 4].astype(np.int64)]               # [N, 3]
        images = np.where(inside[..., None], colours[:, None, None, :], images)
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


def sample_c2i(n: int, seed: int | np.random.Generator | torch.Generator
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """n class-to-image samples -> (images uint8 [N, 3, 32, 32], labels long [N])."""
    scenes = c2i_scenes(n, seed)
    return render(scenes), torch.tensor([s.label for s in scenes], dtype=torch.long)


def sample_t2i(n: int, seed: int | np.random.Generator | torch.Generator
               ) -> tuple[torch.Tensor, list[str], list[Scene]]:
    """n text-to-image samples -> (images uint8 [N, 3, 32, 32], captions, scenes)."""
    scenes = t2i_scenes(n, seed)
    return render(scenes), [s.caption for s in scenes], scenes


_OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def hard_negative(scene: Scene, seed: int | np.random.Generator | torch.Generator) -> str:
    """A caption that differs from the scene's in one attribute, so it is false for the scene.

    colours/c2i: another colour or shape; single_object: another shape; two_object: one shape
    replaced by the third; counting: another number; position: the opposite relation;
    color_attr: the two colours swapped (attribute binding).
    """
    rng = _rng(seed)
    o = scene.objects
    if scene.task in ("colors", "c2i"):
        if rng.random() < 0.5:
            return scene.caption.replace(o[0].colour, _pick(rng, tuple(
                c for c in COLOURS if c != o[0].colour))[0])
        return scene.caption.replace(o[0].shape, _pick(rng, tuple(
            s for s in SHAPES if s != o[0].shape))[0])
    if scene.task == "single_object":
        return f"a photo of a {_pick(rng, tuple(s for s in SHAPES if s != o[0].shape))[0]}"
    if scene.task == "two_object":
        (third,) = [s for s in SHAPES if s not in (o[0].shape, o[1].shape)]
        a, b = (third, o[1].shape) if rng.random() < 0.5 else (o[0].shape, third)
        return f"a photo of a {a} and a {b}"
    if scene.task == "counting":
        m = int(_pick(rng, tuple(str(k) for k in range(1, MAX_OBJECTS + 1) if k != len(o)))[0])
        noun = o[0].shape if m == 1 else o[0].shape + "s"
        return f"a photo of {NUMBERS[m - 1]} {noun}"
    if scene.task == "position":
        rel = scene.meta["relation"]
        return scene.caption.replace(rel, _OPPOSITE[rel])
    if scene.task == "color_attr":
        return f"a photo of a {o[1].colour} {o[0].shape} and a {o[0].colour} {o[1].shape}"
    raise ValueError(f"no hard negative for task {scene.task!r}")


def scene_to_dict(scene: Scene) -> dict:
    """A JSON-ready form of a scene (floats kept exact, so render(from_dict(d)) is identical)."""
    return {"caption": scene.caption, "task": scene.task, "label": scene.label, "meta": scene.meta,
            "objects": [{"shape": o.shape, "colour": o.colour, "cx": o.cx,
                         "cy": o.cy, "r": o.r} for o in scene.objects]}


def scene_from_dict(d: dict) -> Scene:
    return Scene(tuple(SceneObject(**o) for o in d["objects"]), d["caption"], d["task"],
                 d["label"], d.get("meta", {}))
