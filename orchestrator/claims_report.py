"""The claims page from the claims sweeps' folders (``python -m orchestrator.report --claims`` and
``python -m orchestrator.claims``): each trial's mean over its evaluations in the second half of
training (one run's world-FID swings tens of points between checkpoints 50 iterations apart,
LOG.md 2026-12-07; the sweep's ``evaluation.late_checkpoints`` plans them), grouped by arm and
seed, the teacher's references (evaluated once per sweep, cached), the page (``claims_page``),
logged to every sweep's parent MLflow run under ``claims/``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Sequence

from orchestrator.config import UserError
from orchestrator.source import commit

TEACHER_STEPS = (1, 16)      # the references: the teacher's one-step and 16-step CFG sampling
REFS_VERSION = 2             # part of the references' cache key; 2: GenEval scores carry their SE


def teacher_references(layout, state: dict, progress: bool = False) -> dict:
    """{steps: {eval/<metric>: value, ...}} of the sweep's teacher, cached in the sweep folder.

    The protocol is the trials': the sweep's evaluation settings (metrics, images, seed, test-time
    settings), the first trial's resolved config (world, teacher), the teacher's own CFG."""
    from evaluators.suite import Evaluator
    from orchestrator.config import from_dict
    from orchestrator.sweeping.schema import EvaluationSection, eval_settings
    from trainers.config import TestTime
    from trainers.state import resolve_device

    evaluation = dict(state["file"]["evaluation"])
    key = {"evaluation": evaluation, "teacher": state["trials"][0]["config"]["teacher"],
           "world": state["trials"][0]["config"]["world"], "steps": list(TEACHER_STEPS),
           "version": REFS_VERSION}
    if layout.teacher_refs.is_file():
        cached = json.loads(layout.teacher_refs.read_text())
        if cached.get("key") == key:
            return {int(k): v for k, v in cached["steps"].items()}
    section = dict(evaluation)       # the cache key keeps the plain JSON
    if section.get("test_time"):
        section["test_time"] = TestTime(**section["test_time"])
    settings = eval_settings(EvaluationSection(**section))
    settings.test_time = None          # the references are the teacher's plain sampling
    cfg = from_dict(state["trials"][0]["config"], f"{layout.state}: trials[0]")
    evaluator = Evaluator(settings, device=resolve_device("auto"), progress=progress)
    refs = {}
    for steps in TEACHER_STEPS:
        refs[steps] = evaluator.evaluate_teacher(cfg, steps)
        print(f"{layout.name}: teacher {steps} step(s): "
              + "  ".join(f"{k} {v:.4g}" for k, v in refs[steps].items()), flush=True)
    layout.teacher_refs.write_text(json.dumps({"key": key, "steps": refs}, indent=2))
    return refs


def gather(sweep_dirs: Sequence[Path], progress: bool = False):
    """-> (claims_page.Data, {track: source line}, [(tracking uri, sweep name)]) from sweep folders."""
    from orchestrator.claims_page import Data
    from orchestrator.sweeping.layout import SweepLayout, second_half

    data, sources, parents = Data(), {}, []
    for folder in sweep_dirs:
        layout = SweepLayout(Path(folder))
        if not layout.state.is_file():
            raise UserError(f"{folder}: not a sweep folder (no {layout.STATE})")
        state = json.loads(layout.state.read_text())
        kind = state["trials"][0]["config"]["teacher"]["kind"]
        track = {"world_c2i": "c2i", "world_t2i": "t2i"}.get(kind)
        if track is None:
            raise UserError(f"{folder}: the claims are about the embedded world; this sweep's teacher is {kind}")
        arms = data.arms.setdefault(track, {})
        seeds, counts = set(), set()
        for trial in state.get("students", []) + state["trials"]:
            arm = "student" if layout.is_student(trial["key"]) else trial["overrides"].get("arm")
            log = layout.trial(trial["key"]).eval_log
            if arm is None or not log.is_file():
                continue
            records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
            if not records:
                continue
            seeds.add(trial["config"]["seed"])
            curves = data.curves.setdefault(track, {}).setdefault(arm, {})
            for r in records:
                for metric, value in r["metrics"].items():
                    curves.setdefault(metric, {}).setdefault(r["step"], []).append(float(value))
            late = second_half(records)
            counts.add(len(late))
            for metric in late[-1]["metrics"]:
                values = [float(r["metrics"][metric]) for r in late if metric in r["metrics"]]
                arms.setdefault(arm, {}).setdefault(metric, []).append(sum(values) / len(values))
        twice = seeds & set(data.seeds.get(track, []))
        if twice:     # a track may span folders (more seeds in another sweep), a seed only one
            raise UserError(f"{folder}: seed {min(twice)} of the {track} claims is also in an earlier "
                            "folder; give each sweep folder once, with seeds of its own")
        data.seeds[track] = sorted(set(data.seeds.get(track, [])) | seeds)
        data.teacher[track] = teacher_references(layout, state, progress)
        n_late = "–".join(str(n) for n in sorted({min(counts), max(counts)})) if counts else "0"
        line = (f"sweep `{state['name']}` ({len(state['trials'])} trials, "
                f"{len(state.get('students', []))} students); a seed's value is the mean of its "
                f"{n_late} evaluation(s) over the second half of training; {_commits(state)}")
        sources[track] = f"{sources[track]}; {line}" if track in sources else line
        parents.append((state.get("tracking_uri"), state["name"]))
    return data, sources, parents


def _commits(state: dict) -> str:
    """Where a sweep's runs ran: its first commit, then those it was resumed on (sweep.json's
    ``commits``, oldest first)."""
    from orchestrator.source import UNRECORDED

    names = ["an unrecorded commit" if c == UNRECORDED else f"`{c}`" for c in state.get("commits") or []]
    if not names:
        return "run on an unrecorded commit"
    return f"run on {names[0]}" + "".join(f", resumed on {n}" for n in names[1:])


def report(sweep_dirs: Sequence[Path], out: Path, command: str, commit_id: str | None,
           experiment: str = "softdimo", progress: bool = False) -> dict:
    """Render the claims page into ``out`` and log it to every sweep's parent run (claims/)."""
    from orchestrator import tracking
    from orchestrator.claims_page import render

    data, sources, parents = gather(sweep_dirs, progress)
    files, page, verdicts = render(data, out, command, commit_id or commit(), sources)
    for uri, name in parents:
        if not uri:
            continue
        try:
            parent = tracking.find_parent(uri, experiment, name)
            tracking.log_files(uri, parent.info.run_id, files, "claims")
        except Exception as err:   # the folder is the page; the upload is a convenience
            print(f"warning: could not log the claims page to sweep {name}'s run: {err}", file=sys.stderr)
    print(f"claims page: {(out / 'claims.md').resolve()}")
    for key, v in verdicts.items():
        print(f"  claim {key}: {v}")
    return verdicts
