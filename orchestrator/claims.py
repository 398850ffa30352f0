"""The paper's claims in one command: the claims sweeps, the teacher's references, the claims page.

    python -m orchestrator.claims                                   # sweeps/claims/{c2i,t2i}.yaml
    python -m orchestrator.claims --out docs/results/claims          # where the page goes
    python -m orchestrator.claims sweep.search.seed='{grid: [0, 1]}' train.steps=200 --dry-run

Each sweep file of ``--files`` runs as ``python -m orchestrator.sweep FILE [key=value ...]`` (a
sweep whose folder exists is resumed: finished students and trials are not rerun, so the command
can be repeated after an interruption), then ``python -m orchestrator.report --claims`` renders the
page from their folders. The teacher's references (1 and 16 sampling steps, its own CFG) are
evaluated once per sweep with the sweep's own evaluation settings and seeds, and cached in the
sweep folder (``teacher.json``, see ``SweepLayout``).
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from orchestrator.config import UserError, run_cli

ROOT = Path(__file__).resolve().parents[1]
FILES = (ROOT / "sweeps/claims/c2i.yaml", ROOT / "sweeps/claims/t2i.yaml")
TEACHER_STEPS = (1, 16)


def commit() -> str:
    """The checkout's commit (with "+changes" when the tree differs from it), or "unknown"."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+changes" if dirty else "")


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
           "world": state["trials"][0]["config"]["world"], "steps": list(TEACHER_STEPS)}
    if layout.teacher_refs.is_file():
        cached = json.loads(layout.teacher_refs.read_text())
        if cached.get("key") == key:
            return {int(k): v for k, v in cached["steps"].items()}
    if evaluation.get("test_time"):
        evaluation["test_time"] = TestTime(**evaluation["test_time"])
    settings = eval_settings(EvaluationSection(**evaluation))
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
    from orchestrator.sweeping.layout import SweepLayout

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
        seeds = set()
        for trial in state.get("students", []) + state["trials"]:
            arm = "student" if layout.is_student(trial["key"]) else trial["overrides"].get("arm")
            log = layout.trial(trial["key"]).eval_log
            if arm is None or not log.is_file():
                continue
            records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
            if not records:
                continue
            seeds.add(trial["config"]["seed"])
            final = max(records, key=lambda r: r["step"])["metrics"]
            for metric, value in final.items():
                arms.setdefault(arm, {}).setdefault(metric, []).append(float(value))
        data.seeds[track] = sorted(seeds)
        data.teacher[track] = teacher_references(layout, state, progress)
        sources[track] = f"sweep `{state['name']}` ({len(state['trials'])} trials, " \
                         f"{len(state.get('students', []))} students)"
        parents.append((state.get("tracking_uri"), state["name"]))
    return data, sources, parents


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


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m orchestrator.claims", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="for every claims sweep: training keys, or sweep.* keys of the sweep files")
    p.add_argument("--files", nargs="+", type=Path, default=list(FILES), help="the claims sweep files")
    p.add_argument("--out", type=Path, default=Path("docs/results/claims"), help="the page's folder")
    p.add_argument("--dry-run", action="store_true", help="print the sweeps' trials; run nothing")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray instance")
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_intermixed_args(argv)
    from orchestrator import sweep
    from orchestrator.sweeping.spec import load_sweep

    command = "python -m orchestrator.claims " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    commit_id = commit()         # before the runs: the code they ran on
    specs = [load_sweep(f, args.overrides) for f in args.files]   # every file checked before any runs
    if args.dry_run:
        return max(sweep.main([str(f), *args.overrides, "--dry-run"]) for f in args.files)
    flags = (["--quiet"] if args.quiet else []) + (["--num-cpus", str(args.num_cpus)] if args.num_cpus else [])
    failed = False
    for f, spec in zip(args.files, specs):
        resume = ["--resume"] if spec.layout.state.is_file() else []
        failed |= sweep.main([str(f), *args.overrides, *flags, *resume]) != 0
    report([s.sweep_dir for s in specs], args.out, command.strip(), commit_id, progress=not args.quiet)
    return 1 if failed else 0


if __name__ == "__main__":
    run_cli(main)
