"""Which code ran: the checkout's git commit, recorded by every sweep (its state's ``commits``, the
MLflow tag ``mlflow.source.git.commit`` of its parent run and of each trial's run it starts or
resumes; a finished trial keeps the commit it ran on) and printed on the claims page, so a result
can be traced to the code that produced it.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TAG_COMMIT = "mlflow.source.git.commit"    # MLflow's own key: the UI shows it as the run's git commit
UNRECORDED = "unrecorded"     # the first run of a sweep whose state predates the record


def commit(root: Path = ROOT) -> str:
    """The commit checked out at ``root`` ("<sha>+changes" when tracked files differ from it), or
    "unknown" (no git, or an installed copy outside a checkout)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+changes" if dirty else "")


def history(earlier, now: str) -> list[str]:
    """A sweep's commits, oldest first: those of its earlier runs, then ``now`` if it differs from
    the last (a resume on the same code adds nothing)."""
    commits = [c for c in earlier if isinstance(c, str)] if isinstance(earlier, list) else []
    return commits if commits and commits[-1] == now else commits + [now]
