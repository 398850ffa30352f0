"""One sweep trial under Ray: a thin Tune driver that launches a Ray Train ``TorchTrainer``.

``train_driver`` is the Tune function trainable (Train V2 cannot be handed to a Tuner directly). It
finds or creates the trial's MLflow child run, runs ``train_worker`` on ``scaling.num_workers`` ranks
(``TrialScaling.backend``: NCCL when each rank has a GPU of its own, else gloo), and turns the
outcome into one final Tune result. It is idempotent: a trial whose ``result.json`` exists is
reported again and not rerun, and the Train run has a deterministic name under the sweep folder, so
a restarted trial resumes from its last checkpoint.

``train_worker`` runs ``trainers.loop.train`` unchanged on every rank. Rank 0 alone logs to MLflow
(through ``orchestrator.tracking.Tracker``, which spools while MLflow is unreachable) and uploads
checkpoints; every rank calls ``ray.train.report`` at the same steps, as Train V2 requires.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import ray.train
import ray.tune
from ray.train.torch import TorchConfig, TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback

from orchestrator import tracking
from orchestrator.source import TAG_COMMIT
from orchestrator.sweeping.layout import SweepContext, TrialLayout, TrialSpec, late_steps
from orchestrator.sweeping.storage import Storage
from softdimo.world.layout import resolve_spec as resolve_world


class TrialError(RuntimeError):
    """A trial that cannot succeed as configured (non-finite loss, exhausted restarts)."""


def _append_json(storage: Storage, path: Path, record: dict) -> None:
    """Append one line to a trial file in storage (this trial's rank 0 is its only writer)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    storage.pull(path)
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
    storage.push(path)


def _write_json(storage: Storage, path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, sort_keys=True))
    storage.push(path)


def _read_json(storage: Storage, path: Path) -> dict | None:
    """A trial file written on any node (None when it is nowhere)."""
    return json.loads(path.read_text()) if storage.pull(path) and path.is_file() else None


def snapshot(checkpoint: Path, dest: Path) -> Path:
    """Copy what evaluation needs (EMA weights + meta.json) out of a checkpoint, atomically."""
    import shutil

    tmp = dest.with_name(f".tmp_{dest.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in ("ema.safetensors", "meta.json"):
        shutil.copy2(checkpoint / name, tmp / name)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return dest


def _setup_device(use_gpu: bool, threads: int):
    import torch

    torch.set_num_threads(threads)
    if use_gpu:
        device = ray.train.torch.get_device()
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def train_worker(loop_config: dict) -> None:
    """Every rank: build the run, resume from Ray's checkpoint if any, train, report."""
    from orchestrator.config import from_dict
    from trainers.checkpoint import read_meta
    from trainers.loop import Hooks, train
    from trainers.state import build_context

    rank = ray.train.get_context().get_world_rank()
    # open_clip logs one INFO line per loaded file, Train one per report with every metric: the
    # trial table and MLflow show those already
    for name in ("", "ray.train"):
        logging.getLogger(name).setLevel(logging.WARNING)
    sweep: SweepContext = loop_config["sweep"]
    key = loop_config["key"]
    files = sweep.trial(key)
    storage = sweep.storage
    _setup_device(sweep.scaling.use_gpu, sweep.scaling.threads_per_worker)
    cfg = from_dict(loop_config["config"], f"trial {key}")
    resolved = loop_config["config"]
    from evaluators.suite import reward_factory

    evaluation = sweep.evaluation
    tracker = None
    if rank == 0:
        tracker = tracking.Tracker(sweep.tracking_uri, loop_config["run_id"], files.spool)
    _announce_world_build(cfg, key, rank, tracker)
    ctx = build_context(cfg, progress=False, reward_factory=reward_factory)
    last_eval = {"images": 0}
    late = set(late_steps(cfg.train.steps, evaluation.late_checkpoints))   # the last step among them

    def report(step: int, metrics: dict, saved: Path | None) -> None:
        metrics = {**metrics, "step": step}
        if saved is not None and evaluation.enabled:
            every = evaluation.every_images
            due = step in late or (every and metrics["images_seen"] - last_eval["images"] >= every)
            if due:
                # the EMA weights and meta of this step, kept for the evaluator pool (Ray moves
                # and prunes the full checkpoint); the sweep's Tune callback submits it
                kept = snapshot(saved, files.snapshot(saved.name))
                storage.push(kept)           # the evaluator actor may run on another node
                metrics["eval_checkpoint"] = str(kept)
                metrics["mlflow_run_id"] = loop_config["run_id"]
                last_eval["images"] = metrics["images_seen"]
        checkpoint = None
        if saved is not None:
            checkpoint = ray.train.Checkpoint.from_directory(str(saved))
            tracker.set_tags({"checkpoint.last": storage.location(sweep.layout.train / key / saved.name)})
        ray.train.report(metrics, checkpoint=checkpoint,
                         checkpoint_dir_name=saved.name if saved is not None else None,
                         delete_local_checkpoint_after_upload=True if saved is not None else None)

    hooks = Hooks(report=report, checkpoint_at=frozenset(late) if evaluation.enabled else frozenset())
    if tracker is not None:
        hooks.on_metrics = tracker.log_metrics
        hooks.on_grid = lambda path, step: tracker.log_image(path, "samples", step)

    restored = ray.train.get_checkpoint()
    if restored is not None:
        restored = _verified(restored, storage, files.root / "restore")
    try:
        if restored is None:
            start = 0
            if rank == 0:
                _append_json(storage, files.attempts, {"pid": os.getpid(), "node": _node(),
                                                       "start_step": 0, "time": time.time()})
            result = train(cfg, resolved, hooks=hooks, ctx=ctx, progress=False)
        else:
            start = int(read_meta(restored)["step"])
            if rank == 0:
                _append_json(storage, files.attempts, {"pid": os.getpid(), "node": _node(),
                                                       "start_step": start, "time": time.time()})
            result = train(cfg, resolved, hooks=hooks, ctx=ctx, progress=False, resume_from=restored)
    except FloatingPointError as err:
        # Retrying a deterministic run would only reproduce the NaN: record it, end cleanly, and
        # let the driver fail the trial. No checkpoint was written for the bad step.
        if rank == 0:
            _write_json(storage, files.failure, {"error": str(err)})
            tracker.set_tags({"error": str(err)})
            tracker.close()
        return
    if rank == 0:
        final = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
        final.update(step=result.step, resumed_from_step=start)
        staging = Path(cfg.output_dir) / "checkpoints"   # Ray moved every checkpoint to train/
        if staging.is_dir() and not any(staging.iterdir()):
            staging.rmdir()
        for made in ("config.json", "samples"):      # the trainer's own files, beside the trial's
            if (files.root / made).exists():
                storage.push(files.root / made)
        if "ddp/max_param_spread" in final:
            tracker.log_metrics(result.step, {"ddp/max_param_spread": final["ddp/max_param_spread"]})
        _write_json(storage, files.final, final)
        tracker.close()


def _node() -> str:
    """This worker's node as Ray addresses it (attempts.jsonl and tags say which node ran what)."""
    return ray.util.get_node_ip_address()


def _announce_world_build(cfg, key: str, rank: int, tracker) -> None:
    """A worker about to build part of the embedded world says so, on stderr and in MLflow (tag
    ``softdimo.world_build``), instead of silently spending minutes on it (the full world: ~15)."""
    from softdimo.world.layout import TRACK_NEEDS, built_components, with_dependencies, world_dir

    if cfg.teacher.kind not in ("world_c2i", "world_t2i"):
        return
    root = world_dir(resolve_world(cfg.world.spec), cfg.world.cache_dir)
    missing = sorted(with_dependencies(TRACK_NEEDS[cfg.teacher.kind[len("world_"):]])
                     - built_components(root))
    if not missing:
        return
    message = (f"trial {key} rank {rank} on node {_node()}: the embedded world lacks "
               f"{', '.join(missing)} at {root}; building it here, under the world's lock")
    logging.getLogger(__name__).warning(message)
    if tracker is not None:
        tracker.set_tags({"softdimo.world_build": message})


def _verified(restored: "ray.train.Checkpoint", storage: Storage, scratch: Path) -> Path | None:
    """The newest of the trial's checkpoints, up to the one Train hands back, that verifies against
    its checksums (a damaged one is skipped with one warning line); None: start afresh. From object
    storage the candidates (``keep_checkpoints`` of them) are downloaded into ``scratch`` first."""
    import posixpath
    import shutil

    from trainers.checkpoint import META, newest_good

    if not storage.remote:                   # a local or shared folder: read in place
        latest = Path(restored.path)
        found = sorted(p for p in latest.parent.glob("step_*")
                       if p.name <= latest.name and (p / META).is_file())
        return newest_good(found)
    from pyarrow import fs as pafs

    fs, parent = restored.filesystem, posixpath.dirname(restored.path.rstrip("/"))
    latest = posixpath.basename(restored.path.rstrip("/"))
    names = sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(parent))
                   if i.type == pafs.FileType.Directory and i.base_name.startswith("step_")
                   and i.base_name <= latest)
    shutil.rmtree(scratch, ignore_errors=True)
    for name in names:
        (scratch / name).mkdir(parents=True)
        pafs.copy_files(f"{parent}/{name}", str(scratch / name), source_filesystem=fs,
                        destination_filesystem=pafs.LocalFileSystem())
    return newest_good(p for p in (scratch / n for n in names) if (p / META).is_file())


def _run_name(trial: TrialSpec) -> str:
    return f"{trial.key} {trial.label}"


def _params(trial: TrialSpec, sweep: SweepContext) -> dict:
    params = tracking.flatten_params(trial.config)
    # the searched keys as written in the sweep file, so that e.g. reward.terms.1.weight is a column
    params.update({key: str(value) for key, value in trial.overrides.items()})
    params["scaling.num_workers"] = str(sweep.scaling.num_workers)
    params["train.global_batch_size"] = str(trial.config["train"]["batch_size"] * sweep.scaling.num_workers)
    if trial.config["init"]["checkpoint"]:   # the two-stage recipe's start, under the name meta.json uses
        params["init_from"] = trial.config["init"]["checkpoint"]
    return params


def _trainer(trial: TrialSpec, sweep: SweepContext, run_id: str) -> TorchTrainer:
    scaling = sweep.scaling
    resources = {"CPU": scaling.cpus_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = scaling.gpus_per_worker
    resources.update(scaling.resources_per_worker)
    return TorchTrainer(
        train_worker,
        train_loop_config={"sweep": sweep, "key": trial.key, "config": trial.config,
                           "run_id": run_id},
        torch_config=TorchConfig(backend=scaling.backend),
        scaling_config=ray.train.ScalingConfig(num_workers=scaling.num_workers,
                                               use_gpu=scaling.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=trial.key,                                     # deterministic: restarts resume
            storage_path=sweep.storage.ray_path(sweep.layout.train),
            storage_filesystem=sweep.storage.filesystem(),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=trial.config["train"]["keep_checkpoints"]),
            failure_config=ray.train.FailureConfig(max_failures=sweep.max_failures),
            callbacks=[TuneReportCallback()],
            worker_runtime_env={"env_vars": {"OMP_NUM_THREADS": str(scaling.threads_per_worker)}},
        ),
    )


def train_driver(config: dict, sweep: SweepContext) -> None:
    """The Tune trainable of one trial (``config["trial"]`` is one entry of the expanded sweep)."""
    trial = TrialSpec.from_json(config["trial"])
    key = trial.key
    files = sweep.trial(key)
    storage = sweep.storage
    uri = sweep.tracking_uri
    done = _read_json(storage, files.result)
    if done is not None:              # finished before an interruption: report, do not rerun
        ray.tune.report(done)
        return
    failure = _read_json(storage, files.failure)
    if failure is not None:
        raise TrialError(f"trial {key}: {failure['error']}")
    files.stopped.unlink(missing_ok=True)      # a stop of an earlier sweep run, now rerun
    storage.delete(files.stopped)
    run_id = tracking.get_or_create_child(
        uri, sweep.experiment_id, sweep.parent_id, sweep.name, key, _run_name(trial),
        _params(trial, sweep), tags={tracking.TAG_RAY_TRIAL: ray.tune.get_context().get_trial_id(),
                                     tracking.TAG_STAGE: "student" if sweep.layout.is_student(key) else "search",
                                     TAG_COMMIT: sweep.commit})
    files.root.mkdir(parents=True, exist_ok=True)
    import yaml

    tracking.Tracker(uri, run_id, files.spool).log_text(
        yaml.safe_dump(trial.config, sort_keys=False), "config.yaml")
    try:
        result = _trainer(trial, sweep, run_id).fit()
    except Exception as err:   # TrainingFailedError and friends: restarts exhausted
        _finish(uri, run_id, files.spool, failed_status(storage, files))
        raise TrialError(f"trial {key}: training failed after {sweep.max_failures} restart(s): "
                         f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    failure = _read_json(storage, files.failure)     # written by rank 0, maybe on another node
    if failure is not None:
        _finish(uri, run_id, files.spool, "FAILED")
        raise TrialError(f"trial {key}: {failure['error']}")
    final = _read_json(storage, files.final)
    tracker = tracking.Tracker(uri, run_id, files.spool)   # replays a leftover spool
    if result.checkpoint is not None:
        final["checkpoint"] = storage.location(
            sweep.layout.train / key / Path(result.checkpoint.path).name)
        tracker.set_tags({"checkpoint.final": final["checkpoint"]})
    final["mlflow_run_id"] = run_id
    _write_json(storage, files.result, final)
    tracker.close("FINISHED")
    ray.tune.report(final)


def failed_status(storage: Storage, files: TrialLayout) -> str:
    """The MLflow status of a trial whose fit() raised: the scheduler's stop (ASHA) reaches fit()
    as an error too, and a stopped trial's run was KILLED, not FAILED."""
    return "KILLED" if _read_json(storage, files.stopped) is not None else "FAILED"


def _finish(uri: str, run_id: str, spool: Path, status: str) -> None:
    """End the MLflow run; while MLflow is away the status is spooled like everything else."""
    tracking.Tracker(uri, run_id, spool).close(status)


class StopMarker(ray.tune.Callback):
    """Writes a trial's ``stopped.json`` when Tune ends it without a result (an ASHA stop).

    Tune calls ``on_trial_complete`` before it tells the trial's actor to stop, so the marker is in
    storage before the trial's ``fit()`` fails on the stop; the driver then ends the MLflow run as
    KILLED. Without it, that late FAILED could land after the sweep had marked the run KILLED.
    """

    def __init__(self, sweep: SweepContext):
        self.sweep = sweep

    def on_trial_complete(self, iteration, trials, trial, **info):
        files = self.sweep.trial(trial.config["trial"]["key"])
        if not self.sweep.storage.exists(files.result):
            _write_json(self.sweep.storage, files.stopped, {"time": time.time()})
