"""Range and consistency checks of a sweep file that its types cannot express, and of the evaluator
pool's weight files (``orchestrator.sweeping.spec`` runs them before any trial resolves).
Each problem is a ``UserError`` "<sweep file>: <key>: <problem>".
"""
from __future__ import annotations

import re
from typing import Sequence

from evaluators.suite import METRICS, TEST_TIME_METRICS
from orchestrator.config import UserError
from orchestrator.sweeping.schema import SweepFile, SweepSpec
from trainers.config import ConfigValueError, check_test_time

# a folder under output_dir: no "..", no hidden names (the sweep's lock file is .<name>.lock)
NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
SCHEDULERS = ("fifo", "asha")
MODES = ("min", "max")
EVAL_METRICS = METRICS                   # evaluators.suite: what the evaluator pool computes
# eval/* names a metric produces besides its own
EVAL_OUTPUTS = {"prdc": ("precision", "recall", "density", "coverage"), "geneval_world": (), "geneval": ()}


def _produced(name: str, metrics: Sequence[str], test_time: bool = False) -> bool:
    """Does the pool, computing ``metrics`` (and test-time-scaled ones if asked), report eval/<name>?"""
    if name.startswith("tts/"):
        name = name[len("tts/"):]
        metrics = [m for m in metrics if m in TEST_TIME_METRICS] if test_time else []
        if name == "seconds_per_prompt":
            return bool(metrics)
    head = name.split("/")[0]
    return head in metrics or any(name in EVAL_OUTPUTS.get(m, ()) for m in metrics)


_QUANTITY = "Ray takes a fraction of one GPU (0.25) or a whole number of GPUs (2), not both"


def _ray_quantity(amount: float) -> bool:
    """Ray refuses 1.5 GPUs: a fraction shares one device, more than one must be whole devices."""
    return amount <= 1 or float(amount).is_integer()


def check_file(f: SweepFile, source: str) -> None:
    """Range and consistency checks the type system cannot express; the first one found is raised."""
    sched, evaluation = f.scheduler, f.evaluation
    eval_metric = f.metric[len("eval/"):] if f.metric.startswith("eval/") else None
    tts = evaluation.test_time is not None
    checks = [
        ("name", NAME_PATTERN.fullmatch(f.name), f"{f.name!r} may only use letters, digits, _ . - and cannot start with ."),
        ("preset", f.preset.strip(), "must name a preset file"),
        ("num_samples", f.num_samples >= 1, f"must be >= 1, got {f.num_samples}"),
        ("search_seed", f.search_seed >= 0, f"must be >= 0, got {f.search_seed}"),
        ("mode", f.mode in MODES, f"{f.mode!r} is not one of {', '.join(MODES)}"),
        ("metric", f.metric.strip(), "must name a metric, e.g. eval/world_fid"),
        ("scheduler.type", sched.type in SCHEDULERS,
         f"{sched.type!r} is not one of {', '.join(SCHEDULERS)}"),
        ("max_concurrent_trials", f.max_concurrent_trials is None or f.max_concurrent_trials >= 1,
         f"must be >= 1 or null, got {f.max_concurrent_trials}"),
        ("scaling.num_workers", f.scaling.num_workers >= 1, f"must be >= 1, got {f.scaling.num_workers}"),
        ("scaling.cpus_per_worker", f.scaling.cpus_per_worker is None or f.scaling.cpus_per_worker > 0,
         f"must be > 0, got {f.scaling.cpus_per_worker}"),
        ("scaling.gpus_per_worker", not f.scaling.use_gpu or f.scaling.gpus_per_worker > 0,
         f"must be > 0 with use_gpu, got {f.scaling.gpus_per_worker}"),
        ("scaling.gpus_per_worker", _ray_quantity(f.scaling.gpus_per_worker), _QUANTITY),
        ("evaluation.gpus_per_actor", _ray_quantity(f.evaluation.gpus_per_actor), _QUANTITY),
        ("scaling.resources_per_worker",
         not {"CPU", "GPU", "memory"} & set(f.scaling.resources_per_worker)
         and all(v > 0 for v in f.scaling.resources_per_worker.values()),
         f"takes custom resources > 0 (CPU and GPU come from cpus_per_worker and gpus_per_worker), "
         f"got {dict(f.scaling.resources_per_worker)}"),
        ("failure.max_failures", f.failure.max_failures >= 0,
         f"must be >= 0, got {f.failure.max_failures}"),
        ("tracking.experiment", f.tracking.experiment.strip(), "must name an MLflow experiment"),
        ("evaluation.metrics", set(evaluation.metrics) <= set(EVAL_METRICS),
         f"{evaluation.metrics} has unknown metrics; known: {', '.join(EVAL_METRICS)}"),
        ("evaluation.num_images", evaluation.num_images >= 0,
         f"must be >= 0, got {evaluation.num_images}"),
        ("evaluation.every_images", evaluation.every_images >= 0,
         f"must be >= 0, got {evaluation.every_images}"),
        ("evaluation.late_checkpoints", evaluation.late_checkpoints >= 1,
         f"must be >= 1 (1: the final checkpoint alone), got {evaluation.late_checkpoints}"),
        ("evaluation.temperatures", evaluation.temperatures and min(evaluation.temperatures) > 0,
         f"needs positive temperatures, got {evaluation.temperatures}"),
        ("evaluation.actors", evaluation.actors >= 1, f"must be >= 1, got {evaluation.actors}"),
        ("evaluation.geneval_prompts_per_task", evaluation.geneval_prompts_per_task >= 1,
         f"must be >= 1, got {evaluation.geneval_prompts_per_task}"),
        ("evaluation.images_per_prompt", evaluation.images_per_prompt >= 1,
         f"must be >= 1, got {evaluation.images_per_prompt}"),
        ("evaluation.cpus_per_actor", evaluation.cpus_per_actor > 0,
         f"must be > 0, got {evaluation.cpus_per_actor}"),
        ("evaluation.gpus_per_actor", evaluation.gpus_per_actor >= 0,
         f"must be >= 0, got {evaluation.gpus_per_actor}"),
        ("metric", eval_metric is None or (_produced(eval_metric, evaluation.metrics, tts)
                                           and evaluation.num_images),
         f"{f.metric} is never computed: needs {eval_metric.split('/')[0] if eval_metric else ''} in "
         "evaluation.metrics and evaluation.num_images > 0"),
    ]
    if sched.type == "asha":
        checks += [
            ("scheduler.grace_period", sched.grace_period is not None and sched.grace_period > 0,
             f"asha needs grace_period > 0 (images seen), got {sched.grace_period}"),
            ("scheduler.max_t", sched.max_t is not None and sched.max_t > 0,
             f"asha needs max_t > 0 (images seen), got {sched.max_t}"),
            ("scheduler.max_t", sched.max_t is None or sched.grace_period is None
             or sched.max_t >= sched.grace_period,
             f"must be >= grace_period ({sched.grace_period}), got {sched.max_t}"),
            ("scheduler.reduction_factor", sched.reduction_factor > 1,
             f"must be > 1, got {sched.reduction_factor}"),
            # ASHA reads the trials' own reports; eval/* arrive later, from the evaluator pool.
            ("scheduler.type", eval_metric is None,
             f"asha needs a metric the trials report while training, not {f.metric} (evaluator "
             "results arrive asynchronously); watch e.g. loss/dimo or diag/entropy"),
        ]
    for key, ok, problem in checks:
        if not ok:
            raise UserError(f"{source}: {key}: {problem}")
    if tts:
        try:
            check_test_time(evaluation.test_time, prefix="evaluation.test_time.")
        except ConfigValueError as err:
            raise UserError(f"{source}: {err}") from None


def check_eval_weights(spec: SweepSpec) -> None:
    """The evaluator pool's weight files exist and read as tensors: checked by the dry run and
    before Ray starts (otherwise every trial trains and the pool's actors die one after another)."""
    ev, source = spec.file.evaluation, spec.source
    if not ev.metrics or not ev.num_images:
        return
    from dataclasses import asdict

    from evaluators.suite import EvalSettings, Evaluator
    from evaluators.networks.weights import WeightsMissing
    from softdimo.checkpoints import WeightsFileError, check_weight_paths

    try:
        Evaluator(EvalSettings(metrics=list(ev.metrics), reference=ev.reference, paths=dict(ev.weights),
                               test_time=asdict(ev.test_time) if ev.test_time else None))
        check_weight_paths(ev.weights)
    except (WeightsMissing, WeightsFileError) as err:
        raise UserError(f"{source}: evaluation.weights: {err}") from None
