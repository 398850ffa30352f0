"""How many trials a sweep runs at once, and each worker's CPU share, from the cluster's resources.

Tune cannot see the Train workers' needs (a trial started without room waits forever for its
worker group), so the sweep driver plans concurrency here from ``ray.cluster_resources()``.
Pure arithmetic on the sweep spec and a resource dict: unit-tested with fake clusters.
"""
from __future__ import annotations

import sys

from orchestrator.config import UserError
from orchestrator.sweeping.schema import SweepSpec

DRIVER_CPU = 0.01     # a trial's Tune driver only launches its TorchTrainer
UNIT = 10_000         # Ray counts resources in 1/10,000ths: 1.0 GPU holds exactly 4 x 0.25 or 10 x 0.1


def _units(amount: float) -> int:
    return round(amount * UNIT)


def _fits(have: float, need: float) -> int:
    """How many ``need`` fit in ``have``, counted as Ray counts (1.0 // 0.1 is 9 in floats)."""
    return _units(have) // _units(need) if _units(need) > 0 else sys.maxsize


def plan_resources(spec: SweepSpec, total: dict) -> tuple[int, float, int]:
    """(concurrent trials, logical CPUs per worker, torch threads per worker) for the cluster.

    Tune cannot see the Train workers' needs, and a trial started without room waits forever for
    its worker group (on CPU and GPU alike), so concurrency is computed here from the cluster's
    CPUs and GPUs (``total``: ``ray.cluster_resources()``). With ``scaling.cpus_per_worker`` unset,
    the cores are shared out: as many one-thread trials side by side as there are cores (two on a
    2-core laptop), more threads per trial when the trials are fewer than the cores. GPU trials
    take ``num_workers x gpus_per_worker`` each, so fractions put several trials on one GPU (four
    at 0.25). The evaluator pool's share (``actors x *_per_actor``) is set aside first; its logical
    CPUs are taken from the trials' share, not from their threads: it works in short bursts
    between trials' checkpoints.
    """
    sc, ev = spec.file.scaling, spec.file.evaluation
    pool = ev.actors if ev.metrics and ev.num_images else 0
    cpus = total.get("CPU", 0.0)
    left = {"CPU": cpus - pool * ev.cpus_per_actor, "GPU": total.get("GPU", 0.0) - pool * ev.gpus_per_actor}
    trial_gpus = sc.num_workers * sc.gpus_per_worker if sc.use_gpu else 0.0
    wanted = spec.file.max_concurrent_trials
    if sc.cpus_per_worker is None:
        k = max(1, min(len(spec.trials), wanted or len(spec.trials), int(cpus // sc.num_workers)))
        if trial_gpus:
            k = max(1, min(k, _fits(left["GPU"], trial_gpus)))
        per_worker = round((left["CPU"] - k * DRIVER_CPU) / (k * sc.num_workers) - 0.005, 2)
        threads = max(1, int(cpus // (k * sc.num_workers)))
    else:
        per_worker = sc.cpus_per_worker
        threads = max(1, int(per_worker))
    need = {"CPU": sc.num_workers * per_worker + DRIVER_CPU, "GPU": trial_gpus}
    fits = min(_fits(left[r], need[r]) for r in need) if per_worker > 0 else 0
    if fits < 1 or _units(left["GPU"]) < 0:     # the pool alone may want GPUs the cluster lacks
        raise UserError(
            f"{spec.source}: scaling: one trial needs {need} and the evaluator pool "
            f"{pool} x (CPU {ev.cpus_per_actor}, GPU {ev.gpus_per_actor}), but the cluster has "
            f"{ {r: total.get(r, 0.0) for r in ('CPU', 'GPU')} }; lower scaling.* or evaluation.*_per_actor")
    if wanted and wanted > fits:
        print(f"max_concurrent_trials {wanted} lowered to {fits}: no more trials fit beside the "
              "evaluator pool", file=sys.stderr)
    return (min(wanted, fits) if wanted else fits), per_worker, threads
