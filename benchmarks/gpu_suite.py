"""The GPU suite of issue 13 in one command: CUDA tests, per-family steps, FID throughput, report.

    export PYTHONPATH=$PWD
    python benchmarks/gpu_suite.py OUT                 # on one H100/H200: about 6-8 minutes
    python benchmarks/gpu_suite.py OUT --smoke         # everything, tiny, on the CPU (about 2 min)
    python benchmarks/gpu_suite.py OUT --only steps --families maskgit,maskbit

Stages, each recorded in OUT/results.json and OUT/report.md as soon as it ends (a run cut short
keeps what it measured; an error in one stage or family is recorded and the rest still runs):

1. ``tests``: ``pytest -m gpu tests/gpu`` (bf16 autocast, CUDA generators, resume, memory, the soft
   path on CUDA, NCCL with one worker); on a machine without CUDA they are all skipped.
2. ``steps``: for each real teacher family (MaskGit, MaskBit, MaskGen-L, Meissonic, aMUSEd-512) with
   RANDOM weights at the published sizes, built on the GPU (benchmarks/random_teachers.py), the
   trainer's Di[M]O-only step and its joint step (+ GAN + reward as the preset has them) at Table
   5's batch / 4, bf16: s/step, images/s, peak memory, FLOPs (torch.utils.flop_counter), MFU,
   and the joint/Di[M]O-only time ratio next to the FLOP ratio (benchmarks/step_bench.py). For the
   families with an MFU target (MaskGit, MaskBit, MaskGen) one more joint step runs under
   torch.profiler: OUT/profile_<family>.txt and, in the report, host syncs and the top ops.
3. ``fid``: images/s of our FID feature path vs clean-fid's folder mode on the same 5,000 + 5,000
   images and the same random-weight Inception, with |ΔFID| (benchmarks/fid_throughput.py).
4. ``sweep``: the embedded-world gan_weight sweep with fractional GPUs per trial. It needs the full
   world (about 13 minutes to build on 2 CPU cores) and more than one call's time, so it runs only
   with ``--sweep`` (``--smoke`` resolves it with ``--dry-run`` instead, which starts no Ray).

``--budget-s`` (default 480 on CUDA) skips the stages that would start after that many seconds,
and says so in the report. --smoke uses tiny networks, batch 2, one timed step, 4 + 4 FID images
with 64 of the 2048 features, and one torch thread.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import re
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ElementTree
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:          # `python benchmarks/gpu_suite.py` from anywhere
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks import random_teachers as rt  # noqa: E402
from benchmarks import suite_report  # noqa: E402

STAGES = ("tests", "steps", "fid", "sweep")
# the families with an MFU target: one extra joint step each under torch.profiler, so that a missed
# target comes with its op table from the same run (the GPU time for a second run may not exist)
PROFILED = ("maskgit", "maskbit", "maskgen")
TESTS_LIMIT_S = 240
NEEDS = ("omegaconf", "diffusers", "open_clip", "cleanfid", "transformers", "scipy", "pytest",
         "pytest_timeout")


def environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0],
           "cpus": os.cpu_count(), "device": "cpu"}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device=props.name, gpu_memory_bytes=props.total_memory,
                   capability=f"{props.major}.{props.minor}", cudnn=torch.backends.cudnn.version())
    return env


def _text(data) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else (data or "")


def run_tests(out: Path, smoke: bool) -> dict:
    """The `gpu` test tier in a subprocess; counts from its JUnit XML."""
    junit = out / "tests_junit.xml"
    # a hung test (an NCCL init in a sandbox, say) must not cost the rest of the run: per-test and
    # whole-tier time limits (pytest-timeout is a dev dependency and in the GPU image)
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/gpu", "-p", "no:cacheprovider",
           "--timeout=120", f"--junitxml={junit}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TESTS_LIMIT_S)
    except subprocess.TimeoutExpired as err:
        proc = subprocess.CompletedProcess(cmd, -9, _text(err.stdout), _text(err.stderr)
                                           + f"\ngpu_suite: the test tier ran past {TESTS_LIMIT_S} s and was stopped")
    seconds = time.perf_counter() - start
    (out / "tests_output.txt").write_text(proc.stdout[-20000:] + proc.stderr[-5000:])
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failures = []
    if junit.is_file():
        root = ElementTree.parse(junit).getroot()
        suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
        for suite in suites:
            for key in counts:
                counts[key] += int(suite.get(key, 0))
            for case in suite.iter("testcase"):
                if case.find("failure") is not None or case.find("error") is not None:
                    failures.append(f"{case.get('classname')}::{case.get('name')}")
    return {"command": " ".join(["python"] + cmd[1:-1]), "returncode": proc.returncode,
            "seconds": seconds, "passed": counts["tests"] - counts["failures"] - counts["errors"]
            - counts["skipped"], "failed": counts["failures"], "errors": counts["errors"],
            "skipped": counts["skipped"], "failures": failures,
            "summary": (proc.stdout.strip().splitlines() or [""])[-1]}


def run_steps(families: list[str], device: torch.device, smoke: bool, results: dict, out: Path,
              deadline: float) -> list[dict]:
    from benchmarks.step_bench import family_pair

    steps = results.setdefault("steps", [])
    for family in families:
        if time.perf_counter() > deadline:
            results.setdefault("skipped", {})[f"steps/{family}"] = "time budget spent"
            continue
        start = time.perf_counter()
        try:
            row = family_pair(family, "smoke" if smoke else "full", device,
                              batch=2 if smoke else None, steps=1 if smoke else 3,
                              warmup=1 if smoke else 2,
                              profile_dir=out if family in PROFILED else None)
        except Exception as err:        # one family's failure must not cost the others' figures
            row = {"family": family, "error": f"{type(err).__name__}: {str(err)[:300]}",
                   "traceback": traceback.format_exc()[-3000:]}
        row["stage_seconds"] = time.perf_counter() - start
        steps.append(row)
        print(f"[steps] {family}: {row.get('error') or _step_line(row)}", flush=True)
        suite_report.write(out, results)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return steps


def _step_line(row: dict) -> str:
    j, d = row["joint"], row["dimo_only"]
    mfu = "n/a" if j.get("mfu") is None else f"{j['mfu']:.1%}"
    ratio = row.get("time_ratio")
    return (f"joint {j.get('seconds_per_step', float('nan')):.4f} s/step at batch {j.get('batch')}, "
            f"MFU {mfu}; Di[M]O-only {d.get('seconds_per_step', float('nan')):.4f} s/step; "
            f"time ratio {ratio if ratio is None else round(ratio, 2)} vs FLOP ratio "
            f"{row.get('flop_ratio') and round(row['flop_ratio'], 2)}")


def run_fid(device: torch.device, smoke: bool) -> dict:
    from benchmarks.fid_throughput import measure

    if smoke:
        return measure(num=4, batch=8, cleanfid_batch=4, workers=0, size=64, device=device, dims=64)
    workers = min(8, os.cpu_count() or 1)
    try:
        return measure(num=5000, batch=250, cleanfid_batch=32, workers=workers, size=256, device=device)
    except RuntimeError as err:   # loader workers need /dev/shm, which a sandbox may lack
        out = measure(num=5000, batch=250, cleanfid_batch=32, workers=0, size=256, device=device)
        out["workers_fallback"] = f"{workers} loader workers failed ({str(err)[:200]}); ran with 0"
        return out


def run_sweep(smoke: bool, device: torch.device) -> dict:
    """gan_weight on one GPU, all four trials at once with a quarter GPU each (or --dry-run).

    A real run first builds (or finds) the full embedded world with ``orchestrator.prepare`` and
    reports that time apart from the sweep's.
    """
    overrides = ["sweep.scaling.use_gpu=true", "sweep.scaling.gpus_per_worker=0.25",
                 "sweep.scaling.cpus_per_worker=2", "sweep.max_concurrent_trials=4",
                 "sweep.evaluation.gpus_per_actor=0.1"]
    dry = smoke or device.type != "cuda"
    out: dict = {"dry_run": dry}
    if not dry:
        start = time.perf_counter()
        prep = subprocess.run([sys.executable, "-m", "orchestrator.prepare"], cwd=ROOT,
                              capture_output=True, text=True)
        out.update(world_build_seconds=round(time.perf_counter() - start, 1),
                   world_build_returncode=prep.returncode)
    cmd = [sys.executable, "-m", "orchestrator.sweep", "sweeps/gan_weight.yaml", *overrides]
    if dry:
        cmd.append("--dry-run")
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    trials = re.search(r"trials:\s+(\d+)", proc.stdout)
    out.update(command=" ".join(["python"] + cmd[1:]), returncode=proc.returncode,
               wall_seconds=round(time.perf_counter() - start, 1),
               trials=int(trials.group(1)) if trials else None,
               cpu_reference="LOG.md (issue 3/4 sections): the same sweep on the CPU",
               output_tail=(proc.stdout + proc.stderr)[-1500:])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="folder for results.json, report.md and the test logs")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: tests the suite itself")
    p.add_argument("--families", default=",".join(rt.FAMILIES), help="comma-separated")
    p.add_argument("--only", default="tests,steps,fid", help=f"comma-separated stages of {STAGES}")
    p.add_argument("--sweep", action="store_true", help="add the sweep stage (see above)")
    p.add_argument("--budget-s", type=float, default=None, help="default: 480 on CUDA, none on the CPU")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    stages = [s.strip() for s in args.only.split(",") if s.strip()] + (["sweep"] if args.sweep else [])
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    bad = [s for s in stages if s not in STAGES] + [f for f in families if f not in rt.FAMILIES]
    if bad:
        print(f"gpu_suite: unknown stage or family {bad[0]!r} (stages {', '.join(STAGES)}; families "
              f"{', '.join(rt.FAMILIES)})", file=sys.stderr)
        return 2
    missing = [m for m in NEEDS if importlib.util.find_spec(m) is None]
    if missing:           # the GPU image lacks these unless .whl/ was carried (gpu_wheels.sh)
        print(f"gpu_suite: missing Python packages {', '.join(missing)}: carry the wheels of "
              "benchmarks/gpu_wheels.sh (LOG.md, issue 13)", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.smoke:
        torch.set_num_threads(1)        # tiny networks; a shared CPU is faster with one thread
    budget = args.budget_s if args.budget_s is not None else (480.0 if device.type == "cuda" else float("inf"))
    deadline = t0 + budget
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"mode": "smoke" if args.smoke else "full", "command": " ".join(["python"] + sys.argv),
               "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "environment": environment(device), "stages": stages, "families": families,
               "weights_note": rt.NOTE, "budget_seconds": budget}
    if device.type != "cuda" and not args.smoke:
        results.setdefault("skipped", {})["full run"] = "no CUDA device: use --smoke on the CPU"
        suite_report.write(out, results)
        print("gpu_suite: no CUDA device; run with --smoke on the CPU", file=sys.stderr)
        return 2
    for stage in stages:
        if time.perf_counter() > deadline:
            results.setdefault("skipped", {})[stage] = f"time budget ({budget:.0f} s) spent"
            continue
        start = time.perf_counter()
        print(f"[{stage}] ...", flush=True)
        try:
            if stage == "tests":
                results["tests"] = run_tests(out, args.smoke)
            elif stage == "steps":
                run_steps(families, device, args.smoke, results, out, deadline)
            elif stage == "fid":
                results["fid"] = run_fid(device, args.smoke)
            elif stage == "sweep":
                results["sweep"] = run_sweep(args.smoke, device)
        except Exception as err:
            results[stage] = {"error": f"{type(err).__name__}: {str(err)[:300]}",
                              "traceback": traceback.format_exc()[-3000:]}
        results.setdefault("stage_seconds", {})[stage] = round(time.perf_counter() - start, 1)
        results["wall_seconds"] = time.perf_counter() - t0
        suite_report.write(out, results)
        print(f"[{stage}] done in {results['stage_seconds'][stage]:.0f} s", flush=True)
    results["wall_seconds"] = time.perf_counter() - t0
    js, md = suite_report.write(out, results)
    print(f"wrote {js} and {md} ({results['wall_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
