"""The README's main command, timed by stage, with how many cores were busy in each stage.

    python benchmarks/main_command.py OUT                  # a fresh clone of this repo, empty cache
    python benchmarks/main_command.py OUT --sweep sweeps/gan_mask.yaml --extra sweep.base.train.steps=50

Clones the repository's HEAD into ``OUT/clone`` (so uncommitted files do not count), points
``SOFTDIMO_CACHE`` at an empty ``OUT/cache`` and runs ``python -m orchestrator.sweep <sweep>`` in
the clone, as a new user would after ``pip install -e``. Every output line is time-stamped; the
machine's busy cores are sampled from /proc/stat every second. The stages are cut at the sweep's
own lines: start-up until the first world component starts, the world build until the trial plan
is printed, the trials (with their evaluations) until the results table, then the end.
Writes ``OUT/timeline.txt`` (every line with its time) and ``OUT/stages.md``; prints the table.
This measures the whole machine: run it on a quiet one.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARKERS = (("world build", "building world component"), ("trials and evaluation", "trial(s) at once"),
           ("results and shutdown", "world-FID spread"))


def busy_cores() -> tuple[float, float]:
    """(busy jiffies, total jiffies) over all cores, from /proc/stat's first line."""
    fields = [float(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


class Sampler(threading.Thread):
    """Busy-core samples (time, busy cores) once a second until stopped."""

    def __init__(self):
        super().__init__(daemon=True)
        self.samples: list[tuple[float, float]] = []
        self.stop = threading.Event()

    def run(self):
        cores = os.cpu_count() or 1
        last = busy_cores()
        while not self.stop.wait(1.0):
            now = busy_cores()
            total = now[1] - last[1]
            self.samples.append((time.time(), cores * (now[0] - last[0]) / total if total else 0.0))
            last = now


def stages(lines: list[tuple[float, str]], start: float, end: float) -> list[tuple[str, float, float]]:
    """[(stage, t0, t1)] cut at the first line holding each marker, in order."""
    cuts, i = [("start-up", start)], 0
    for t, text in lines:
        if i < len(MARKERS) and MARKERS[i][1] in text:
            cuts.append((MARKERS[i][0], t))
            i += 1
    return [(name, t0, cuts[k + 1][1] if k + 1 < len(cuts) else end) for k, (name, t0) in enumerate(cuts)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--sweep", default="sweeps/gan_mask.yaml")
    p.add_argument("--extra", nargs="*", default=[], help="overrides after the sweep file")
    args = p.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=False)
    subprocess.run(["git", "clone", "-q", str(ROOT), str(out / "clone")], check=True)
    commit = subprocess.run(["git", "-C", str(out / "clone"), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True, check=True).stdout.strip()
    env = {**os.environ, "SOFTDIMO_CACHE": str(out / "cache"), "PYTHONPATH": str(out / "clone"),
           "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "orchestrator.sweep", args.sweep, *args.extra]
    sampler = Sampler()
    sampler.start()
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=out / "clone", env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    lines = []
    with open(out / "timeline.txt", "w") as log:
        for text in proc.stdout:
            t = time.time()
            lines.append((t, text.rstrip("\n")))
            log.write(f"{t - start:8.1f}  {text}")
            log.flush()
    rc = proc.wait()
    end = time.time()
    sampler.stop.set()
    sampler.join()
    rows = [f"`{' '.join(cmd[1:])}` in a fresh clone of {commit}, empty cache, "
            f"{os.cpu_count()} cores; exit {rc}", "",
            "| stage | start (s) | seconds | mean busy cores |", "|---|---|---|---|"]
    for name, t0, t1 in stages(lines, start, end):
        busy = [b for t, b in sampler.samples if t0 <= t < t1]
        mean = f"{sum(busy) / len(busy):.2f}" if busy else "-"
        rows.append(f"| {name} | {t0 - start:.0f} | {t1 - t0:.0f} | {mean} |")
    busy = [b for _, b in sampler.samples]
    rows.append(f"| **total** | 0 | **{end - start:.0f}** ({(end - start) / 60:.1f} min) | "
                f"{sum(busy) / max(1, len(busy)):.2f} |")
    text = "\n".join(rows) + "\n"
    (out / "stages.md").write_text(text)
    print(text)
    return rc


if __name__ == "__main__":
    sys.exit(main())
