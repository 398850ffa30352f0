"""How many trials a sweep runs at once, and each worker's CPU share, from the cluster's resources.

Tune cannot see the Train workers' needs (a trial started without room waits forever for its
worker group), so the sweep driver plans concurrency here from ``ray.cluster_resources()``.
Pure arithmetic on the sweep spec and a resource dict: unit-tested with fake clusters.
"""
from __future__ import annotations

import math
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


def _concurrency(trials: int, slots: int) -> int:
    """How many one-thread trials to run at once on ``slots`` cores.

    Trials of one sweep take about the same time, so waves of ``slots`` leave cores idle in the
    last wave (3 trials on 2 cores: the third runs alone, 2 waves of one trial's time). Up to twice
    ``slots`` trials may share the cores when that shortens the whole: the makespan is
    ceil(trials / k) waves of k / slots trial-times; ties go to fewer trials at once (less memory,
    earlier results for ASHA).
    """
    slots = max(1, slots)
    if trials <= slots:
        return max(1, trials)
    return min(range(slots, 2 * slots + 1), key=lambda k: (math.ceil(trials / k) * k, k))


def plan_resources(spec: SweepSpec, total: dict, count: int | None = None) -> tuple[int, float, int]:
    """(concurrent trials, logical CPUs per worker, torch threads per worker) for the cluster, for
    ``count`` trials (default: the search's; the students' stage passes its own count).

    Tune cannot see the Train workers' needs, and a trial started without room waits forever for
    its worker group (on CPU and GPU alike), so concurrency is computed here from the cluster's
    CPUs and GPUs (``total``: ``ray.cluster_resources()``). With ``scaling.cpus_per_worker`` unset,
    the cores are shared out: as many one-thread trials side by side as there are cores, more
    threads per trial when the trials are fewer than the cores, and up to twice as many as cores
    when that avoids a last wave that leaves cores idle (three trials on a 2-core laptop all run at
    once). Custom resources (``scaling.resources_per_worker``, e.g. {node_b: 1}) cap the trials at
    what the nodes that hold them offer. GPU trials
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
    custom = {r: sc.num_workers * v for r, v in sc.resources_per_worker.items()}
    left.update({r: total.get(r, 0.0) for r in custom})
    if sc.cpus_per_worker is None:
        count = len(spec.trials) if count is None else count
        k = _concurrency(min(count, wanted or count), int(cpus // sc.num_workers))
        if trial_gpus:
            k = max(1, min(k, _fits(left["GPU"], trial_gpus)))
        for r, n in custom.items():
            k = max(1, min(k, _fits(left[r], n)))
        per_worker = round((left["CPU"] - k * DRIVER_CPU) / (k * sc.num_workers) - 0.005, 2)
        threads = max(1, int(cpus // (k * sc.num_workers)))
    else:
        per_worker = sc.cpus_per_worker
        threads = max(1, int(per_worker))
    need = {"CPU": sc.num_workers * per_worker + DRIVER_CPU, "GPU": trial_gpus, **custom}
    fits = min(_fits(left[r], need[r]) for r in need) if per_worker > 0 else 0
    if fits < 1 or _units(left["GPU"]) < 0:     # the pool alone may want GPUs the cluster lacks
        raise UserError(
            f"{spec.source}: scaling: one trial needs {need} and the evaluator pool "
            f"{pool} x (CPU {ev.cpus_per_actor}, GPU {ev.gpus_per_actor}), but the cluster has "
            f"{ {r: total.get(r, 0.0) for r in ('CPU', 'GPU', *custom)} }; lower scaling.* or "
            "evaluation.*_per_actor")
    if wanted and wanted > fits:
        print(f"max_concurrent_trials {wanted} lowered to {fits}: no more trials fit beside the "
              "evaluator pool", file=sys.stderr)
    return (min(wanted, fits) if wanted else fits), per_worker, threads
