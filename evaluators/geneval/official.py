"""GenEval (Ghosh et al. 2023): prompt metadata, per-image rules, aggregation, colour classifiers.

A faithful re-implementation of djghosh13/geneval's `evaluate_images.py` + `summary_scores.py`
over a pluggable detector (evaluators/geneval/detectors.py) and colour classifier, because the official
mmdet 2.x / mmcv stack does not install on this project's torch (evaluators.md §11.2).

Per image (``evaluate_image``): keep each class's detections scoring > 0.3 (0.9 for counting
prompts), best first, at most 16, no NMS; then every ``include`` clause must find ``count``
objects of its class, of its colour (CLIP zero-shot on the object composited over grey #999 and
cropped to its box) and in its relation to every object of an earlier clause; every ``exclude``
clause must find fewer than ``count``. Scores (``summarise``): per task the fraction of correct
images, overall the unweighted mean of the task scores, plus the fractions of correct images and
of prompts with at least one correct image.

Metadata: one JSON object per line as in GenEval's evaluation_metadata.jsonl (553 prompts;
staged locally as weights key "geneval_meta", never downloaded).
Shapes: N images, K detections, E CLIP embedding width, C colours.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Protocol, Sequence

import numpy as np
import torch

from evaluators.geneval.detectors import GENEVAL_CLASSES, Detection, Detector, to_hwc_uint8

TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
RELATIONS = ("left of", "right of", "above", "below")
COLOUR_TEMPLATES = ("a photo of a {c} {obj}", "a photo of a {c}-colored {obj}",
                    "a photo of a {c} object")
# top-level keys of a metadata line; "scene" is GenEval-world's witness scene (ignored by the rules)
_KEYS = {"tag", "prompt", "include", "exclude", "scene"}


@dataclass(frozen=True)
class Rules:
    """GenEval's options (``--options key=value`` in evaluate_images.py) with their defaults."""
    threshold: float = 0.3
    counting_threshold: float = 0.9
    max_objects: int = 16
    max_overlap: float = 1.0            # NMS IoU limit; 1.0 disables NMS
    position_threshold: float = 0.1
    bgcolor: tuple[int, int, int] = (153, 153, 153)     # "#999" behind the object's mask
    crop: bool = True


class MetadataError(ValueError):
    """A malformed metadata line; the message is one line naming the file and line number."""


def validate_metadata(entry: Any, where: str = "metadata", classes: Sequence[str] | None = None,
                      colours: Sequence[str] | None = None) -> dict:
    """Check one metadata object; raise MetadataError naming ``where`` and the bad field.

    classes / colours: the allowed vocabularies (default: GenEval's 80 classes and 10 colours).
    """
    classes = GENEVAL_CLASSES if classes is None else classes
    colours = COLORS if colours is None else colours

    def fail(msg: str):
        raise MetadataError(f"{where}: {msg}")

    if not isinstance(entry, dict):
        fail(f"expected a JSON object, got {type(entry).__name__}")
    if unknown := set(entry) - _KEYS:
        fail(f"unknown keys {sorted(unknown)}; allowed: {sorted(_KEYS)}")
    if entry.get("tag") not in TASKS:
        fail(f"'tag' must be one of {list(TASKS)}, got {entry.get('tag')!r}")
    if not isinstance(entry.get("prompt"), str) or not entry["prompt"]:
        fail("'prompt' must be a non-empty string")
    include = entry.get("include")
    if not isinstance(include, list) or not include:
        fail("'include' must be a non-empty list of clauses")
    for i, clause in enumerate(include):
        _check_clause(clause, f"include[{i}]", i, classes, colours, fail, exclude=False)
    exclude = entry.get("exclude", [])
    if not isinstance(exclude, list):
        fail("'exclude' must be a list of clauses")
    for i, clause in enumerate(exclude):
        _check_clause(clause, f"exclude[{i}]", i, classes, colours, fail, exclude=True)
    return entry


def _check_clause(clause: Any, name: str, index: int, classes: Sequence[str],
                  colours: Sequence[str], fail, exclude: bool) -> None:
    allowed = {"class", "count"} if exclude else {"class", "count", "color", "position"}
    if not isinstance(clause, dict):
        fail(f"{name} must be an object, got {type(clause).__name__}")
    if unknown := set(clause) - allowed:
        fail(f"{name}: unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}")
    if clause.get("class") not in classes:
        fail(f"{name}: unknown class {clause.get('class')!r}")
    count = clause.get("count")
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        fail(f"{name}: 'count' must be a positive integer, got {count!r}")
    if "color" in clause and clause["color"] not in colours:
        fail(f"{name}: 'color' must be one of {list(colours)}, got {clause['color']!r}")
    if "position" in clause:
        pos = clause["position"]
        if (not isinstance(pos, (list, tuple)) or len(pos) != 2 or pos[0] not in RELATIONS
                or not isinstance(pos[1], int) or isinstance(pos[1], bool)
                or not 0 <= pos[1] < index):
            fail(f"{name}: 'position' must be [relation in {list(RELATIONS)}, index of an "
                 f"earlier include clause], got {pos!r}")


def load_metadata(path: str | Path | None = None, classes: Sequence[str] | None = None,
                  colours: Sequence[str] | None = None) -> list[dict]:
    """Read and validate a GenEval metadata .jsonl; path None -> the staged official file.

    Blank lines are skipped; errors name the file and 1-based line number.
    """
    if path is None or not Path(path).is_file():
        from evaluators.networks.weights import resolve    # lazy: only the staged-file path needs it
        path = resolve("geneval_meta", path)
    out = []
    for lineno, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            raise MetadataError(f"{where}: invalid JSON ({e.msg})") from None
        out.append(validate_metadata(entry, where, classes, colours))
    if not out:
        raise MetadataError(f"{path}: no metadata lines")
    return out


def save_metadata(entries: Iterable[Mapping], path: str | Path) -> Path:
    """Write metadata as .jsonl, one compact JSON object per line."""
    path = Path(path)
    path.write_text("".join(json.dumps(dict(e)) + "\n" for e in entries))
    return path


def relative_position(box_a: Sequence[float], box_b: Sequence[float],
                      position_threshold: float = 0.1) -> set[str]:
    """Relations of box a with respect to box b (GenEval's rule), e.g. {"left of", "above"}.

    Offsets of the box centres are shrunk by position_threshold × the summed box sizes (a dead
    zone for near-aligned objects), then normalised by the raw offset's length.
    """
    from softdimo.world.scenes import box_relations   # one implementation of the rule

    return box_relations(box_a, box_b, position_threshold)


def _iou_plus_one(a: Sequence[float], b: Sequence[float]) -> float:
    """GenEval's compute_iou (integer-pixel '+1' convention), used only when max_overlap < 1."""
    def area(x0, y0, x1, y1):
        return max(x1 - x0 + 1, 0) * max(y1 - y0 + 1, 0)
    inter = area(max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3]))
    union = area(*a) + area(*b) - inter
    return inter / union if union else 0.0


def filter_detections(detections: Iterable[Detection], tag: str,
                      rules: Rules = Rules()) -> dict[str, list[Detection]]:
    """Per class: score > threshold (counting_threshold for counting prompts), best first, at most
    max_objects, greedy NMS only if max_overlap < 1. Exact score ties put the later detection
    first, as the official ``np.argsort(scores)[::-1]`` does (a stable ascending sort, reversed)."""
    threshold = rules.counting_threshold if tag == "counting" else rules.threshold
    by_class: dict[str, list[Detection]] = {}
    for d in detections:
        if d.score > threshold:
            by_class.setdefault(d.class_name, []).append(d)
    out = {}
    for name, dets in by_class.items():
        order = sorted(reversed(dets), key=lambda d: -d.score)[:rules.max_objects]
        kept: list[Detection] = []
        while order:
            best = order.pop(0)
            kept.append(best)
            if rules.max_overlap < 1:
                order = [d for d in order if _iou_plus_one(best.box, d.box) < rules.max_overlap]
        out[name] = kept
    return out


def object_crops(image: torch.Tensor | np.ndarray, detections: Sequence[Detection],
                 rules: Rules = Rules()) -> list[np.ndarray]:
    """What the colour classifier sees: each object over rules.bgcolor outside its mask, cropped
    to its box rounded as PIL's Image.crop rounds (zeros outside the image) -> uint8 [h, w, 3]."""
    hwc = to_hwc_uint8(image)
    h, w, _ = hwc.shape
    crops = []
    for d in detections:
        if d.mask is not None and d.mask.shape != (h, w):
            raise ValueError(f"mask {d.mask.shape} does not match the image {(h, w)}")
        img = hwc if d.mask is None else np.where(d.mask[..., None], hwc,
                                                  np.array(rules.bgcolor, dtype=np.uint8))
        if rules.crop:
            x0, y0, x1, y1 = (int(round(v)) for v in d.box)
            x1, y1 = max(x1, x0 + 1), max(y1, y0 + 1)      # PIL would hand CLIP an empty image
            canvas = np.zeros((y1 - y0, x1 - x0, 3), dtype=np.uint8)
            sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
            if sx1 > sx0 and sy1 > sy0:
                canvas[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = img[sy0:sy1, sx0:sx1]
            img = canvas
        crops.append(np.ascontiguousarray(img))
    return crops


class ColourClassifier(Protocol):
    def __call__(self, crops: Sequence[np.ndarray], class_name: str) -> list[str]:
        """uint8 crops [h, w, 3] of objects of class_name -> one colour name per crop."""
        ...


def evaluate_image(metadata: Mapping, detections: Iterable[Detection],
                   colour_classifier: ColourClassifier | None,
                   image: torch.Tensor | np.ndarray | None,
                   rules: Rules = Rules()) -> tuple[bool, str]:
    """GenEval's verdict for one image -> (correct, reasons joined by newlines; "" if correct).

    Reasons use GenEval's wording, e.g. "expected dog>=2, found 1". The classifier and image are
    only needed for prompts with a colour clause.
    """
    objects = filter_detections(detections, metadata["tag"], rules)
    correct, reasons, groups = True, [], []
    for clause in metadata["include"]:
        name, count = clause["class"], clause["count"]
        found = objects.get(name, [])[:count]
        matched = len(found) >= count
        if not matched:
            reasons.append(f"expected {name}>={count}, found {len(found)}")
        else:
            if "color" in clause:
                if colour_classifier is None or image is None:
                    raise ValueError("a colour clause needs a colour classifier and the image")
                colours = colour_classifier(object_crops(image, found, rules), name)
                want = clause["color"]
                if colours.count(want) < count:
                    matched = False
                    seen = ", ".join(f"{colours.count(c)} {c}" for c in dict.fromkeys(colours))
                    reasons.append(f"expected {want} {name}>={count}, found "
                                   f"{colours.count(want)} {want}; and {seen}")
            if "position" in clause and matched:
                relation, target = clause["position"]
                if groups[target] is None:
                    matched = False
                    reasons.append(f"no target for {name} to be {relation}")
                else:
                    matched = _check_position(found, groups[target], relation, name, reasons,
                                              rules.position_threshold)
        correct &= matched
        groups.append(found if matched else None)
    for clause in metadata.get("exclude", []):
        n = len(objects.get(clause["class"], []))
        if n >= clause["count"]:
            correct = False
            reasons.append(f"expected {clause['class']}<{clause['count']}, found {n}")
    return correct, "\n".join(reasons)


def _check_position(found: Sequence[Detection], targets: Sequence[Detection], relation: str,
                     name: str, reasons: list[str], threshold: float) -> bool:
    for obj in found:
        for target in targets:
            rels = relative_position(obj.box, target.box, threshold)
            if relation not in rels:
                reasons.append(f"expected {name} {relation} target, found "
                               f"{' and '.join(sorted(rels))} target")
                return False
    return True


def evaluate_images(metadata: Sequence[Mapping], images: torch.Tensor | Sequence,
                    images_per_prompt: int, detector: Detector,
                    colour_classifier: ColourClassifier | None,
                    rules: Rules = Rules()) -> list[dict]:
    """Score images [N = len(metadata) × images_per_prompt, 3, H, W] uint8, prompt-major
    (images[i·k + j] is image j of prompt i) -> one row per image in the official results.jsonl
    schema (evaluators.geneval.results.official_row): filename, tag, prompt, correct, reason,
    metadata (the prompt's line as a JSON string), details (kept boxes per class, as JSON)."""
    from evaluators.geneval.results import official_row

    if len(images) != len(metadata) * images_per_prompt:
        raise ValueError(f"expected {len(metadata)} prompts × {images_per_prompt} images = "
                         f"{len(metadata) * images_per_prompt} images, got {len(images)}")
    rows = []
    for i, meta in enumerate(metadata):
        for j in range(images_per_prompt):
            image = images[i * images_per_prompt + j]
            detections = detector.detect(image)
            correct, reason = evaluate_image(meta, detections, colour_classifier, image, rules)
            kept = filter_detections(detections, meta["tag"], rules)
            rows.append(official_row(i, j, meta, correct, reason, kept))
    return rows


def summarise(results: Iterable[Mapping]) -> dict[str, float]:
    """Rows with tag, correct, metadata (ours or the official tool's) -> {overall, <task>...,
    correct_images, correct_prompts, n_images, n_prompts}, as GenEval's summary_scores.py computes
    them: a prompt is a distinct ``metadata`` string, overall the unweighted mean of the tasks."""
    rows = list(results)
    if not rows:
        raise ValueError("no results to summarise")
    tasks: dict[str, list[bool]] = {}
    prompts: dict[str, bool] = {}
    for r in rows:
        tasks.setdefault(r["tag"], []).append(bool(r["correct"]))
        prompts[r["metadata"]] = prompts.get(r["metadata"], False) or bool(r["correct"])
    per_task = {t: float(np.mean(tasks[t])) for t in TASKS if t in tasks}
    per_task.update({t: float(np.mean(v)) for t, v in tasks.items() if t not in per_task})
    return {"overall": float(np.mean(list(per_task.values()))), **per_task,
            "correct_images": float(np.mean([bool(r["correct"]) for r in rows])),
            "correct_prompts": float(np.mean(list(prompts.values()))),
            "n_images": float(len(rows)), "n_prompts": float(len(prompts))}


class ClipColourClassifier:
    """GenEval's zero-shot colour classifier on an open_clip model (production: ViT-L-14 OpenAI).

    Per class name, W [C, E] = normalised mean of the normalised text embeddings of the three
    templates for each colour (clip_benchmark's zero_shot_classifier); a crop's colour is
    argmax(image_embedding · Wᵀ). preprocess: open_clip's PIL val transform for the model.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, preprocess,
                 colours: Sequence[str] = COLORS, batch: int = 16):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer, self.preprocess = tokenizer, preprocess
        self.colours, self.batch = tuple(colours), batch
        self._weights: dict[str, torch.Tensor] = {}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def text_weights(self, class_name: str) -> torch.Tensor:
        """Zero-shot weights [C, E] (unit rows) for objects called class_name; cached."""
        if class_name not in self._weights:
            rows = []
            for c in self.colours:
                texts = [t.format(c=c, obj=class_name) for t in COLOUR_TEMPLATES]
                emb = self.model.encode_text(self.tokenizer(texts).to(self.device)).float()
                mean = torch.nn.functional.normalize(emb, dim=-1).mean(0)
                rows.append(mean / mean.norm())
            self._weights[class_name] = torch.stack(rows)
        return self._weights[class_name]

    @torch.no_grad()
    def __call__(self, crops: Sequence[np.ndarray], class_name: str) -> list[str]:
        from PIL import Image
        if not crops:
            return []
        weights = self.text_weights(class_name)
        dtype = next(self.model.parameters()).dtype
        out = []
        for start in range(0, len(crops), self.batch):
            x = torch.stack([self.preprocess(Image.fromarray(c)) for c in
                             crops[start:start + self.batch]]).to(self.device, dtype)
            emb = torch.nn.functional.normalize(self.model.encode_image(x).float(), dim=-1)
            out += [self.colours[i] for i in (emb @ weights.T).argmax(-1).tolist()]
        return out

    @classmethod
    def from_weights(cls, path: str | Path | None = None, model_name: str = "ViT-L-14-quickgelu",
                     device: str | torch.device = "cpu") -> "ClipColourClassifier":
        """open_clip ``model_name`` (GenEval: ViT-L-14 with QuickGELU, OpenAI weights) with the
        state dict at path (weights key "clip_l14"), loaded with a strict key check."""
        import open_clip

        from evaluators.networks.weights import load_strict, resolve
        file = resolve("clip_l14", path)
        with torch.device(device):     # initialise on the target device: ViT-L is 428M params
            model, _, preprocess = open_clip.create_model_and_transforms(
                model_name, pretrained=None, device=device)
        load_strict(model, read_state_dict(file), str(file))
        return cls(model, open_clip.get_tokenizer(model_name), preprocess)


def read_state_dict(file: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors, or from a torch file with weights_only=True."""
    file = Path(file)
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(file))
    state = torch.load(file, map_location="cpu", weights_only=True)
    return state.get("state_dict", state)
