"""The README's main command, timed by stage, with how many cores were busy in each stage.

    python benchmarks/main_command.py OUT                  # a fresh clone of this repo, empty cache
    python benchmarks/main_command.py OUT --sweep sweeps/gan_mask.yaml --extra sweep.base.train.steps=50

Clones the repository's HEAD into ``OUT/clone`` (so uncommitted files do not count), points
``SOFTDIMO_CACHE`` at an empty ``OUT/cache`` and runs ``python -m orchestrator.sweep <sweep>`` in
the clone, as a new user would after ``pip install -e``. Every output line is time-stamped; the
machine's busy cores (/proc/stat) and the CPU time of the command's own process tree
(/proc/<pid>/stat, Ray's processes included) are sampled every second. The stages are cut at the sweep's
own lines: start-up until the first world component starts, the world build until the trial plan
is printed, the trials (with their evaluations) until the results table, then the end.
Writes ``OUT/timeline.txt`` (every line with its time), ``OUT/cores.tsv`` (the samples) and
``OUT/stages.md``; prints the table.
The command's own cores are meaningful on a busy machine too; its times are not: run it on a quiet one.
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
MARKERS = (("world build", "building world component"), ("trials and evaluation", "at once, each worker"),
           ("results and shutdown", "world-FID spread"))


def busy_cores() -> tuple[float, float]:
    """(busy jiffies, total jiffies) over all cores, from /proc/stat's first line."""
    fields = [float(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def tree_jiffies(root: int) -> dict[int, float]:
    """utime + stime of every live process under ``root`` (Ray's raylet and workers included)."""
    parent, cpu = {}, {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                f = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parent[int(d.name)], cpu[int(d.name)] = int(f[1]), float(f[11]) + float(f[12])
    keep, frontier = {root}, [root]
    while frontier:
        kids = [p for p, pp in parent.items() if pp in frontier and p not in keep]
        keep.update(kids)
        frontier = kids
    return {p: cpu[p] for p in keep if p in cpu}


class Sampler(threading.Thread):
    """Once a second until stopped: (time, busy cores of the machine, busy cores of the command's
    process tree). A process that ends between samples loses its last second at most."""

    def __init__(self, root: int):
        super().__init__(daemon=True)
        self.root = root
        self.samples: list[tuple[float, float, float]] = []
        self.stop = threading.Event()

    def run(self):
        cores, hz = os.cpu_count() or 1, os.sysconf("SC_CLK_TCK")
        last, last_tree, last_t = busy_cores(), tree_jiffies(self.root), time.time()
        while not self.stop.wait(1.0):
            now, tree, t = busy_cores(), tree_jiffies(self.root), time.time()
            total = now[1] - last[1]
            own = sum(max(0.0, v - last_tree.get(p, 0.0)) for p, v in tree.items()) / hz / (t - last_t)
            self.samples.append((t, cores * (now[0] - last[0]) / total if total else 0.0, own))
            last, last_tree, last_t = now, tree, t


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
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=out / "clone", env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    sampler = Sampler(proc.pid)
    sampler.start()
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
            "| stage | start (s) | seconds | cores busy with the command | cores busy, whole machine |",
            "|---|---|---|---|---|"]

    def means(t0: float, t1: float) -> str:
        got = [(m, o) for t, m, o in sampler.samples if t0 <= t < t1]
        if not got:
            return "- | -"
        return f"{sum(o for _, o in got) / len(got):.2f} | {sum(m for m, _ in got) / len(got):.2f}"

    for name, t0, t1 in stages(lines, start, end):
        rows.append(f"| {name} | {t0 - start:.0f} | {t1 - t0:.0f} | {means(t0, t1)} |")
    rows.append(f"| **total** | 0 | **{end - start:.0f}** ({(end - start) / 60:.1f} min) | "
                f"{means(start, end + 1)} |")
    text = "\n".join(rows) + "\n"
    (out / "stages.md").write_text(text)
    (out / "cores.tsv").write_text("".join(f"{t - start:.1f}\t{m:.2f}\t{o:.2f}\n" for t, m, o in sampler.samples))
    print(text)
    return rc


if __name__ == "__main__":
    sys.exit(main())
