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
import shlex
import sys
from pathlib import Path
from typing import Sequence

from orchestrator.claims_report import report
from orchestrator.config import run_cli
from orchestrator.source import ROOT, commit

FILES = (ROOT / "sweeps/claims/c2i.yaml", ROOT / "sweeps/claims/t2i.yaml")


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
