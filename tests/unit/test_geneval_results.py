"""GenEval results.jsonl in the official schema (djghosh13/geneval evaluate_images.py), read back
both ways, grouped as its summary_scores.py groups them, ties ordered as its argsort orders them."""
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from evaluators.geneval.detectors import Detection
from evaluators.geneval.official import Rules, evaluate_images, filter_detections, summarise
from evaluators.geneval.results import KEYS, read_results, write_results

DOG = {"tag": "counting", "include": [{"class": "dog", "count": 2}], "prompt": "a photo of two dogs"}
CAT = {"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"}


class Fixed:
    name = "fixed"

    def __init__(self, detections):
        self.detections = detections

    def detect(self, image):
        return self.detections if int(image[0, 0, 0]) else []


def rows():
    dets = [Detection("dog", 0.95, (0, 0, 4, 4)), Detection("dog", 0.97, (4, 4, 8, 8)),
            Detection("cat", 0.5, (1, 1, 2, 2))]
    images = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    images[0] = images[2] = 1
    return evaluate_images([DOG, CAT], images, 2, Fixed(dets), None)


def test_rows_have_the_official_keys_and_values():
    r = rows()
    assert all(tuple(row) == KEYS for row in r)
    first = r[0]
    assert first["filename"] == "00000/samples/00000.png" and first["correct"] is True
    assert json.loads(first["metadata"]) == DOG and first["reason"] == ""
    # details: kept boxes per class, [x0, y0, x1, y1, score], best first (counting threshold 0.9)
    assert json.loads(first["details"]) == {"dog": [[4, 4, 8, 8, 0.97], [0, 0, 4, 4, 0.95]]}
    assert r[1]["reason"] == "expected dog>=2, found 0" and r[1]["details"] == "{}"


def test_official_summary_reads_ours_and_ours_reads_official(tmp_path):
    path = write_results(rows(), tmp_path / "results.jsonl")
    # what summary_scores.py does with the file: pandas records, prompts by metadata, tasks by tag
    df = pd.read_json(path, orient="records", lines=True)
    ours = summarise(read_results(path))
    assert len(df.groupby("metadata")) == ours["n_prompts"] == 2
    assert df.groupby("metadata")["correct"].any().mean() == pytest.approx(ours["correct_prompts"])
    tasks = [t["correct"].mean() for _, t in df.groupby("tag", sort=False)]
    assert np.mean(tasks) == pytest.approx(ours["overall"])
    # a file as the official tool writes it (pandas, escaped slashes, absolute paths) reads back
    official = tmp_path / "official.jsonl"
    frame = pd.DataFrame([{**row, "filename": f"/out/{row['filename']}"} for row in rows()])
    frame.to_json(official, orient="records", lines=True)
    assert summarise(read_results(official)) == ours
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt_id": 0, "tag": "counting", "correct": true}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: not a GenEval results row"):
        read_results(bad)


def test_exact_score_ties_keep_the_later_detection_first():
    """The official ordering is np.argsort(scores)[::-1]: on a tie the later detection comes first."""
    a, b, c = (Detection("dog", 0.8, (i, 0, i + 1, 1)) for i in range(3))
    kept = filter_detections([a, b, c], "two_object", Rules())["dog"]
    assert kept == [c, b, a]
    scores = np.array([0.8, 0.8, 0.8])
    assert list(np.argsort(scores)[::-1]) == [2, 1, 0]
    higher = Detection("dog", 0.9, (9, 0, 10, 1))
    assert filter_detections([a, higher, b], "two_object", Rules())["dog"] == [higher, b, a]


def test_cli_summarises_a_results_file(tmp_path, capsys):
    from evaluators.geneval.results import main

    path = write_results(rows(), tmp_path / "results.jsonl")
    assert main([str(path)]) == 0
    assert json.loads(capsys.readouterr().out) == summarise(read_results(path))
    assert main([str(tmp_path / "nope.jsonl")]) == 2


def _rows(task_prompts: dict) -> list[dict]:
    """results rows: {task: [[correct per image] per prompt]}."""
    return [{"tag": task, "correct": c, "metadata": json.dumps({"task": task, "prompt": i})}
            for task, prompts in task_prompts.items() for i, images in enumerate(prompts) for c in images]


def test_overall_se_is_the_binomial_error_for_one_image_per_prompt_and_adds_over_tasks():
    from evaluators.geneval.results import overall_se

    one = {"colors": [[i % 4 == 0] for i in range(400)]}                 # p = 0.25, n = 400
    binomial = math.sqrt(0.25 * 0.75 / 400)
    assert overall_se(_rows(one), draws=4000) == pytest.approx(binomial, rel=0.08)
    assert overall_se(_rows(one)) == overall_se(_rows(one))             # seeded
    # overall = the mean of two independent tasks: SE = sqrt(se1² + se2²) / 2
    two = {**one, "counting": [[i % 2 == 0] for i in range(400)]}
    both = math.sqrt(binomial ** 2 + 0.25 / 400) / 2
    assert overall_se(_rows(two), draws=4000) == pytest.approx(both, rel=0.08)
    assert overall_se(_rows({"colors": [[True, True]] * 10})) == 0.0    # no spread, no error


def test_overall_se_resamples_prompts_not_images():
    """A prompt's images share its difficulty: 4 identical images per prompt carry one prompt's
    information, so the SE is that of 100 prompts, not of 400 independent images."""
    from evaluators.geneval.results import overall_se

    prompts = [[i % 4 == 0] * 4 for i in range(100)]
    assert overall_se(_rows({"colors": prompts}), draws=4000) == pytest.approx(
        math.sqrt(0.25 * 0.75 / 100), rel=0.08)
    with pytest.raises(ValueError, match="no results"):
        overall_se([])
