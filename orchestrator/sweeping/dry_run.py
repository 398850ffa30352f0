"""A sweep's dry run: what it would run (header, then every trial's key, label and resolved config)."""
from __future__ import annotations

import yaml

from orchestrator.sweeping.layout import TrialScaling
from orchestrator.sweeping.schema import SweepSpec


def format_dry_run(spec: SweepSpec) -> str:
    """What a sweep would run: a header, then every trial's key, label and resolved config."""
    f = spec.file
    batches = sorted({t.config["train"]["batch_size"] for t in spec.trials})
    workers = f.scaling.num_workers
    batch = " or ".join(str(b * workers) for b in batches)
    device = "gpu" if f.scaling.use_gpu else "cpu"
    per_worker = ("CPU from the cluster's cores" if f.scaling.cpus_per_worker is None
                  else f"{f.scaling.cpus_per_worker:g} CPU") + (
        f" + {f.scaling.gpus_per_worker:g} GPU" if f.scaling.use_gpu else "") + "".join(
        f" + {v:g} {k}" for k, v in sorted(f.scaling.resources_per_worker.items()))
    backend = TrialScaling(workers, f.scaling.use_gpu, 0.0, f.scaling.gpus_per_worker, 1).backend
    sched = f.scheduler
    scheduler = sched.type if sched.type == "fifo" else (
        f"asha (grace_period={sched.grace_period}, max_t={sched.max_t} images, "
        f"reduction_factor={sched.reduction_factor:g})")
    evaluation = "off" if not f.evaluation.metrics or not f.evaluation.num_images else (
        f"{', '.join(f.evaluation.metrics)} on {f.evaluation.num_images} images "
        + (f"at {f.evaluation.late_checkpoints} checkpoints over the second half"
           if f.evaluation.late_checkpoints > 1 else "at the end")
        + (f" and every {f.evaluation.every_images} images" if f.evaluation.every_images else ""))
    tt = f.evaluation.test_time
    if tt is not None and evaluation != "off":
        evaluation += (f"; again with Best-of-{tt.bon}" + (f" + {tt.iters} TTEO iterations (lr {tt.lr:g})"
                       if tt.iters > 1 else "") + " as eval/tts/*")
    lines = [
        f"sweep {f.name}" + (f": {f.description}" if f.description else ""),
        f"  file:        {spec.source}",
        f"  preset:      {spec.preset}",
        f"  trials:      {len(spec.trials)} (num_samples {f.num_samples}, search_seed {f.search_seed})",
        f"  metric:      {f.metric} ({f.mode})",
        f"  scheduler:   {scheduler}",
        f"  concurrency: {f.max_concurrent_trials or 'from cluster resources'}",
        f"  scaling:     {workers} worker(s) on {device} ({backend}), {per_worker} per worker, "
        f"max_failures {f.failure.max_failures}",
        f"  global batch: {batch} (train.batch_size x {workers} worker(s))",
        f"  evaluation:  {evaluation}",
        f"  tracking:    {f.tracking.uri or 'local MLflow server'}, experiment {f.tracking.experiment}",
        f"  output:      {spec.storage.location(spec.sweep_dir)}"
        + (f" (working folder {spec.sweep_dir})" if spec.storage.remote else ""),
    ]
    if f.arms:
        lines.insert(4, f"  arms:        {', '.join(f.arms)} (each crossed with the search)")
    if spec.students:
        lines.insert(4, f"  students:    {len(spec.students)} (one per training seed; every trial "
                        "starts from its seed's student's final checkpoint)")
    for trial in spec.students + spec.trials:
        body = yaml.dump(trial.config, Dumper=_ConfigDumper, sort_keys=False)
        lines += ["", f"{trial.key}  {trial.label}"] + ["    " + line for line in body.splitlines()]
    return "\n".join(lines) + "\n"


class _ConfigDumper(yaml.SafeDumper):
    """Block-style YAML with short lists of scalars on one line ("mask_range: [0.0, 0.5]")."""


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    flow = all(not isinstance(v, (list, dict)) for v in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_ConfigDumper.add_representer(list, _represent_list)
