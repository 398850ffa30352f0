"""GenEval results in the official ``results.jsonl`` schema, so that either side reads the other's.

djghosh13/geneval's ``evaluation/evaluate_images.py`` writes one JSON object per image (pandas
``to_json(orient="records", lines=True)``) with exactly these keys:

- ``filename``: the image's path, ``<imagedir>/<prompt index:05>/samples/<image index:05>.png``
  in the layout its ``generation/`` scripts write (ours are named the same, relative);
- ``tag``, ``prompt``: the prompt's task and text;
- ``correct`` (bool), ``reason`` (newline-joined failure messages, "" when correct);
- ``metadata``: the prompt's metadata line as a string, ``json.dumps(metadata)``;
- ``details``: ``json.dumps({class: [[x0, y0, x1, y1, score], ...]})`` of the detections kept per
  class (threshold, order, max_objects), as ``box.tolist()`` of mmdet's rows.

Its ``summary_scores.py`` groups prompts by the ``metadata`` string and tasks by ``tag``; our
``evaluators.geneval.official.summarise`` does the same, so it reads official files and the official script
reads ours.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Mapping, Sequence

KEYS = ("filename", "tag", "prompt", "correct", "reason", "metadata", "details")


def image_name(prompt_index: int, image_index: int) -> str:
    """The official generation layout: ``00012/samples/00003.png``."""
    return f"{prompt_index:05d}/samples/{image_index:05d}.png"


def official_row(prompt_index: int, image_index: int, metadata: Mapping, correct: bool,
                 reason: str, kept: Mapping[str, Sequence]) -> dict:
    """One results.jsonl row; ``kept``: class -> Detections after filtering, best first."""
    details = {name: [[float(v) for v in d.box] + [float(d.score)] for d in dets]
               for name, dets in kept.items() if dets}
    return {"filename": image_name(prompt_index, image_index), "tag": metadata["tag"],
            "prompt": metadata["prompt"], "correct": bool(correct), "reason": reason,
            "metadata": json.dumps(dict(metadata)), "details": json.dumps(details)}


def write_results(rows: Iterable[Mapping], path: str | Path) -> Path:
    """results.jsonl: one compact JSON object per row, keys in the official order."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps({k: row[k] for k in KEYS}) + "\n")
    return path


def read_results(path: str | Path) -> list[dict]:
    """Rows of a results.jsonl (ours or the official tool's); a row without the official keys is an
    error naming the file and line."""
    rows = []
    for lineno, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        missing = [k for k in ("tag", "correct", "metadata") if k not in row]
        if missing:
            raise ValueError(f"{path}:{lineno}: not a GenEval results row (missing {', '.join(missing)})")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no results rows")
    return rows


def overall_se(rows: Iterable[Mapping], draws: int = 1000, seed: int = 0) -> float:
    """The bootstrap standard error of GenEval's overall score (``official.summarise``: the
    unweighted mean of the task scores). Prompts are resampled with replacement within each task and
    keep their images together, since a prompt's images share its difficulty; rows as ``summarise``
    reads them (tag, correct, metadata)."""
    import numpy as np

    tasks: dict[str, dict[str, list[bool]]] = {}
    for r in rows:
        tasks.setdefault(r["tag"], {}).setdefault(r["metadata"], []).append(bool(r["correct"]))
    if not tasks:
        raise ValueError("no results to bootstrap")
    rng = np.random.default_rng(seed)
    overall = np.zeros(draws)
    for prompts in tasks.values():
        correct = np.array([sum(v) for v in prompts.values()], dtype=float)
        images = np.array([len(v) for v in prompts.values()], dtype=float)
        pick = rng.integers(0, len(correct), size=(draws, len(correct)))   # [draws, prompts]
        overall += correct[pick].sum(1) / images[pick].sum(1)
    return float((overall / len(tasks)).std(ddof=1))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m evaluators.geneval.results results.jsonl``: GenEval's summary of a results file
    (ours or the official tool's)."""
    import sys

    from evaluators.geneval.official import summarise

    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m evaluators.geneval.results RESULTS.jsonl", file=sys.stderr)
        return 2
    try:
        summary = summarise(read_results(args[0]))
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
