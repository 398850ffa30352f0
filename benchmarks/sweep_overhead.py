"""Orchestration overhead: the same training run called directly and as a one-trial Ray sweep.

    python benchmarks/sweep_overhead.py                 # full world, ~2 minutes per run on 2 cores
    python benchmarks/sweep_overhead.py --steps 20 --world test

Runs, side by side in one process: (1) ``trainers.loop.train`` in this process; (2) the same config
as a one-trial ``orchestrator.sweep`` (Ray Tune trial -> Ray Train TorchTrainer, one worker, MLflow
tracking). Ray's start-up and the MLflow server's start-up are timed and reported separately and
excluded from the ratio; the trial's worker start, world loading and tracking are included, as a
user pays for them. Target: sweep / direct <= 1.2.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=150, help="training steps of each run")
    p.add_argument("--world", default="full", choices=("full", "test"))
    p.add_argument("--preset", default=str(ROOT / "sweeps/presets/tiny_c2i.yaml"))
    p.add_argument("--threads", type=int, default=1, help="torch threads of each run")
    args = p.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import ray
    import torch

    from orchestrator import sweep, tracking
    from orchestrator.config import load_config, to_dict
    from softdimo.world.store import load_world
    from trainers.loop import train

    torch.set_num_threads(args.threads)
    load_world(args.world, build_if_missing=True)          # built once, outside both timings
    out = Path(tempfile.mkdtemp(prefix="sweep_overhead_"))
    overrides = [f"world.spec={args.world}", f"train.steps={args.steps}", "train.checkpoint_every=50",
                 "train.log_every=10"]

    cfg = load_config(args.preset, overrides + [f"output_dir={out / 'direct'}"])
    t0 = time.perf_counter()
    train(cfg, to_dict(cfg), progress=False)
    direct = time.perf_counter() - t0

    t0 = time.perf_counter()
    with tracking.LocalServer.start(out / "mlflow_probe"):
        pass
    server_start = time.perf_counter() - t0
    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=max(1, os.cpu_count() or 1), include_dashboard=True,
             log_to_driver=False, runtime_env={"env_vars": {"OMP_NUM_THREADS": str(args.threads)}})
    ray_start = time.perf_counter() - t0
    sweep_file = out / "one.yaml"
    sweep_file.write_text(yaml.safe_dump({
        "name": "one", "preset": args.preset, "search": {"seed": {"grid": [0]}},
        "evaluation": {"metrics": [], "num_images": 0}, "metric": "loss/dimo",
        "scaling": {"num_workers": 1, "cpus_per_worker": float(args.threads)}}))
    t0 = time.perf_counter()
    code = sweep.main([str(sweep_file), *overrides, f"sweep.output_dir={out}",
                       f"sweep.tracking.uri=sqlite:///{out}/mlflow.db", "--quiet"])
    swept = time.perf_counter() - t0
    ray.shutdown()
    if code != 0:
        raise SystemExit(f"the sweep failed (exit {code})")
    print(f"\nsteps {args.steps} on the {args.world} world, {args.threads} thread(s)")
    print(f"direct train():              {direct:8.1f} s")
    print(f"one-trial sweep (Tune+Train): {swept:8.1f} s")
    print(f"ratio sweep / direct:        {swept / direct:8.2f}   (target <= 1.2)")
    print(f"excluded: ray.init {ray_start:.1f} s, MLflow server start {server_start:.1f} s")


if __name__ == "__main__":
    main()
