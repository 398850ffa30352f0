"""Run an ablation sweep: one Ray Tune trial per configuration, each a Ray Train job, tracked in MLflow.

    python -m orchestrator.sweep sweeps/gan_mask.yaml
    python -m orchestrator.sweep sweeps/gan_mask.yaml train.steps=100 --dry-run
    python -m orchestrator.sweep sweeps/gan_weight.yaml sweep.scaling.num_workers=2 --num-cpus 4
    python -m orchestrator.sweep sweeps/gan_mask.yaml --resume

The sweep file is validated (with any overrides) before Ray starts: ``key=value`` sets a training
config key in every trial, ``sweep.key=value`` a key of the sweep file itself. The embedded world is
built first if missing. Unless the sweep file names a tracking URI, a local MLflow server (SQLite and
artifacts under <output_dir>/mlflow) runs for the length of the sweep; the parent run holds the
sweep, one child run per trial holds its params, curves, sample grids and checkpoint locations.
At the end a table of every trial's final metrics is printed with the address to compare them in.

Everything goes to <output_dir>/<name>/ (trials/, train/ checkpoints, tune/ state). ``--resume``
continues an interrupted sweep: finished trials are not rerun and no MLflow run is duplicated.
Nothing in the sweep folder is unpickled: resuming deletes Tune's own state (tune/) unread and starts
a new Tuner over the same trials; a finished trial is recognised by its result.json, an unfinished
one continues from its newest checkpoint that verifies. ASHA's rungs are not kept across a resume.
One driver per sweep: a second one on the same folder stops with one line (<output_dir>/.<name>.lock).
``output_dir: s3://bucket/prefix`` keeps all of it in object storage (orchestrator.sweeping.storage):
Tune and Train write there through pyarrow, each node works in a scratch folder and pushes its
files; the lock then guards the driver's machine only (S3 has no lock to hold).
Inside ``ray job submit`` (or with --address) the sweep attaches to that cluster.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Sequence

from orchestrator.config import UserError, run_cli
from orchestrator.sweeping.layout import SweepLayout
from orchestrator.sweeping.resources import DRIVER_CPU, plan_resources
from orchestrator.sweeping.spec import SweepSpec, check_eval_weights, format_dry_run, load_sweep
from orchestrator.sweeping.schema import eval_settings

TABLE_METRICS = ("eval/world_fid", "eval/world_clip", "eval/geneval_world", "eval/fid5k", "eval/fid50k",
                 "eval/is", "eval/clip", "eval/hps_v21", "eval/imagereward", "eval/temperature",
                 "loss/dimo", "loss/gan_generator", "loss/reward", "ema/entropy", "ddp/max_param_spread")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m orchestrator.sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", help="a sweep file, e.g. sweeps/gan_mask.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="training overrides for every trial (train.steps=100) or sweep-file "
                        "overrides prefixed with sweep. (sweep.max_concurrent_trials=1)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the expanded trials (resolved configs) and exit; Ray is not started")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted sweep of the same name and config")
    p.add_argument("--overwrite", action="store_true",
                   help="delete an earlier sweep folder of the same name and start afresh")
    p.add_argument("--address", default=None,
                   help="Ray cluster to attach to (default: $RAY_ADDRESS, else a local one)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray instance")
    p.add_argument("--num-gpus", type=int, default=None, help="GPUs of the local Ray instance")
    p.add_argument("--quiet", action="store_true", help="no progress bars or trial tables")
    return p


def pin_worlds(spec: SweepSpec) -> dict[tuple[str, str], set[str]]:
    """Pin each embedded world's cache folder in the trial configs (cheap: nothing is built); returns
    the components each (world spec, cache) needs."""
    from softdimo.world.layout import default_cache_dir

    needs: dict[tuple[str, str], set[str]] = {}
    for trial in spec.trials:
        world, kind = trial.config["world"], trial.config["teacher"]["kind"]
        cache = str(Path(world["cache_dir"] or default_cache_dir()).resolve())
        world["cache_dir"] = cache
        if kind in ("world_c2i", "world_t2i"):
            # each trial's track, and the world scorers its rewards name (built here, not in a trial)
            terms = {t["name"] for t in trial.config["reward"]["terms"]
                     if trial.config["reward"]["weight"] > 0}
            needs.setdefault((world["spec"], cache), set()).update(
                {kind[len("world_"):]} | terms & {"clip", "quality"})
    return needs


def build_worlds(needs: dict[tuple[str, str], set[str]], progress: bool) -> None:
    """Build what the trials need of each world here, once, not inside a trial."""
    from softdimo.world.store import load_world

    for (name, cache), components in needs.items():
        load_world(name, cache, build_if_missing=True, progress=progress, needs=sorted(components))


def _lock(spec: SweepSpec) -> Path:
    """Hold <output_dir>/.<name>.lock while this driver runs (orchestrator.locks)."""
    from orchestrator import locks

    # an s3:// output_dir: the driver's working folder (two drivers on one machine still collide)
    root = locks.writable_dir(spec.storage.local, f"{spec.source}: output_dir")
    lock = SweepLayout.lock_file(root, spec.file.name)
    locks.acquire(lock, f"{spec.source}: sweep {spec.file.name}")
    return lock


def _remove(path: Path) -> None:
    """Delete a file, link or folder without reading it (links are removed, not followed)."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def _check_folder(spec: SweepSpec, args) -> None:
    layout, storage = spec.layout, spec.storage
    state = layout.state
    if storage.remote and not args.resume:
        _remove(spec.sweep_dir)           # scratch left by an earlier run on this machine
    if args.resume:
        if not storage.pull(state) or not state.is_file():
            raise UserError(f"{spec.source}: --resume: no earlier sweep in "
                            f"{storage.location(spec.sweep_dir)}")
        try:
            before = json.loads(state.read_text())["trials"]
            before = [t["config"] for t in before]
        except (OSError, ValueError, KeyError, TypeError):
            raise UserError(f"{spec.source}: --resume: {state} is not a readable sweep state; "
                            "use --overwrite to start again") from None
        now = spec.to_json()["trials"]
        if before != [t["config"] for t in now]:
            raise UserError(f"{spec.source}: --resume: the trials differ from those of the sweep in "
                            f"{spec.sweep_dir}; resume with the same file and overrides, or --overwrite")
    elif storage.exists(spec.sweep_dir):
        where = storage.location(spec.sweep_dir)
        if not args.overwrite:
            raise UserError(f"{spec.source}: name: {where} already exists; use --resume "
                            "to continue it, --overwrite to start again, or another name")
        made_by_a_sweep = storage.exists(layout.marker) if storage.remote else layout.marker.is_file()
        if spec.sweep_dir.is_symlink() or not made_by_a_sweep:
            raise UserError(f"{spec.source}: --overwrite: {where} was not made by a sweep "
                            f"(no {layout.MARKER} file in it) and is left alone; use another name")
        storage.delete(spec.sweep_dir)
        _remove(spec.sweep_dir)


def _table(rows: list[dict]) -> str:
    metrics = [m for m in TABLE_METRICS if any(m in r["metrics"] for r in rows)]
    header = ["trial", "status", "step"] + metrics + ["configuration"]
    body = []
    for r in rows:
        m = r["metrics"]
        body.append([r["key"], r["status"], str(int(m.get("step", 0)))]
                    + [_cell(m, k) for k in metrics] + [r["label"]])
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(b, widths)) for b in body]
    return "\n".join(lines + _noise_verdict(rows))


def _cell(m: dict, key: str) -> str:
    if key not in m:
        return "-"
    se = m.get(f"{key}_se")
    return f"{m[key]:.4g}" + (f" ± {se:.2g}" if se is not None else "")


def _noise_verdict(rows: list[dict]) -> list[str]:
    """One line saying whether the trials' world-FIDs differ by more than the evaluation's noise."""
    pairs = [(r["key"], r["metrics"]["eval/world_fid"], r["metrics"]["eval/world_fid_se"])
             for r in rows if "eval/world_fid_se" in r["metrics"]]
    if len(pairs) < 2:
        return []
    best, worst = min(pairs, key=lambda p: p[1]), max(pairs, key=lambda p: p[1])
    gap, noise = worst[1] - best[1], 2 * (best[2] ** 2 + worst[2] ** 2) ** 0.5
    verdict = ("larger than" if gap > noise else "NOT larger than")
    return ["", f"world-FID spread {gap:.3g} ({best[0]} best, {worst[0]} worst) is {verdict} twice "
            f"its evaluation noise ({noise:.2g}; ± is a bootstrap SE over the evaluated images). "
            "Training-seed noise is not in it: add `seed: {grid: [0, 1, 2]}` to the search to see it."]


def _start_tracking(spec: SweepSpec):
    """-> (uri for trials, uri to read the store later, experiment id, parent id, server or None)."""
    from orchestrator import tracking

    t, storage = spec.file.tracking, spec.storage
    server = None
    artifact_location = None
    if t.uri:
        uri = read_uri = t.uri
    else:
        store = tracking.default_store(storage.local).resolve()
        if storage.remote:
            # runs in the driver's SQLite (fetched from the bucket when this machine has none, so a
            # resume elsewhere adds no duplicate runs); artifacts through the server to the bucket
            storage.pull(store / "mlflow.db")
            server = tracking.LocalServer.start(store, artifacts=storage.location(store / "artifacts"),
                                                env=storage.env())
        else:
            server = tracking.LocalServer.start(store)
            artifact_location = str(store / "artifacts")
        uri = server.uri
        read_uri = tracking.sqlite_uri(store)
    experiment_id = tracking.ensure_experiment(uri, t.experiment, artifact_location)
    parent_id = tracking.get_or_create_parent(
        uri, experiment_id, spec.file.name,
        tags={"softdimo.preset": spec.preset, "softdimo.sweep_file": str(Path(spec.source).resolve()),
              "softdimo.trials": str(len(spec.trials))})
    return uri, read_uri, experiment_id, parent_id, server


def _scheduler(spec: SweepSpec):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    s = spec.file.scheduler
    if s.type == "asha":
        # time is measured in images seen, so runs with different batch sizes compare fairly
        return ASHAScheduler(time_attr="images_seen", metric=spec.file.metric, mode=spec.file.mode,
                             grace_period=s.grace_period, max_t=s.max_t,
                             reduction_factor=s.reduction_factor,
                             # a trial that reaches max_t finishes itself (final checkpoint,
                             # result, MLflow status) instead of being cut at its last report
                             stop_last_trials=False)
    return FIFOScheduler()


def _reporter(spec: SweepSpec):
    """Tune's live table: trial, status, configuration, progress and the headline metrics."""
    from ray.tune import CLIReporter

    columns = {"step": "step", "images_seen": "images", "loss/dimo": "dimo"}
    if spec.file.metric not in columns:
        columns[spec.file.metric] = spec.file.metric.split("/")[-1]
    return CLIReporter(metric_columns=columns, parameter_columns={"trial/label": "configuration"},
                       max_column_length=40, max_report_frequency=30)


def sweep_context(spec: SweepSpec, uri: str, experiment_id: str, parent_id: str,
                  cpus_per_worker: float, threads_per_worker: int):
    """The frozen context every trial and the evaluator pool get (CPU share from plan_resources)."""
    from orchestrator.sweeping.layout import EvalPlan, SweepContext, TrialScaling

    sc, ev = spec.file.scaling, spec.file.evaluation
    return SweepContext(
        name=spec.file.name, layout=spec.layout, tracking_uri=uri, experiment_id=experiment_id,
        parent_id=parent_id, max_failures=spec.file.failure.max_failures,
        scaling=TrialScaling(num_workers=sc.num_workers, use_gpu=sc.use_gpu,
                             cpus_per_worker=cpus_per_worker, gpus_per_worker=sc.gpus_per_worker,
                             threads_per_worker=threads_per_worker),
        evaluation=EvalPlan(settings=eval_settings(ev), every_images=ev.every_images, actors=ev.actors,
                            cpus_per_actor=ev.cpus_per_actor, gpus_per_actor=ev.gpus_per_actor),
        storage=spec.storage)


def run_sweep(spec: SweepSpec, args) -> int:
    import ray
    from ray import tune

    from orchestrator import tracking
    from orchestrator.sweeping.pg_cleanup import OrphanGroupCleaner
    from orchestrator.sweeping.pool import EvalDispatch
    from orchestrator.sweeping.evaluation import finish_pool, latest_eval, start_pool
    from orchestrator.sweeping.trial import train_driver

    progress = not args.quiet
    layout, storage = spec.layout, spec.storage
    layout.root.mkdir(parents=True, exist_ok=True)
    layout.marker.touch()
    storage.push(layout.marker)
    uri, read_uri, experiment_id, parent_id, server = _start_tracking(spec)
    if server is not None:
        layout.server.write_text(json.dumps(
            {"uri": server.uri, "store": str(server.store), "watchdog_pid": server.process.pid,
             "driver_pid": os.getpid()}, indent=2))
    try:
        state = spec.to_json()
        state["tracking_uri"] = read_uri
        layout.state.write_text(json.dumps(state, indent=2))
        storage.push(layout.state)
        parent = tracking.Tracker(uri, parent_id, layout.parent_spool)
        parent.log_text(json.dumps(state, indent=2), layout.STATE)
        address = args.address or os.environ.get("RAY_ADDRESS")
        # eval/* metrics arrive only at evaluation steps; Tune must not fail the other reports
        os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")   # honour the reporter's columns
        if ray.is_initialized():       # a caller (a test, a notebook) owns the Ray session
            pass
        elif address:
            ray.init(address=address)
        else:
            ray.init(address="local", num_cpus=args.num_cpus, num_gpus=args.num_gpus,
                     include_dashboard=True)   # Train's placement-group cleaner needs the State API
        concurrent, per_worker, threads = plan_resources(spec, ray.cluster_resources())
        sweep_ctx = sweep_context(spec, uri, experiment_id, parent_id, per_worker, threads)
        if progress:
            print(f"{spec.file.name}: up to {concurrent} trial(s) at once, each worker "
                  f"{per_worker:g} CPU and {threads} thread(s)", flush=True)
        _pull_trials(sweep_ctx)          # a resumed sweep's trial files, from wherever they ran
        pool = start_pool(sweep_ctx)
        trainable = tune.with_resources(tune.with_parameters(train_driver, sweep=sweep_ctx),
                                        {"CPU": DRIVER_CPU})
        tune_dir = layout.tune
        run_config = tune.RunConfig(
            name=layout.TUNE, storage_path=storage.ray_path(layout.root),
            storage_filesystem=storage.filesystem(),
            failure_config=tune.FailureConfig(max_failures=spec.file.failure.max_failures),
            progress_reporter=_reporter(spec), verbose=1 if progress else 0,
            callbacks=[EvalDispatch(spec.file.name), OrphanGroupCleaner()])
        # Never Tuner.restore: it unpickles tune/ (tuner.pkl, trial states), so a file planted in
        # the sweep folder would run. Tune's state is deleted unread and a new Tuner runs every
        # trial: train_driver reports a finished trial's result.json again, and an unfinished one
        # resumes from its own verified checkpoint (Train's JSON snapshot under train/<key>/).
        _remove(tune_dir)
        storage.delete(tune_dir)
        tuner = tune.Tuner(
            trainable,
            param_space={"trial": tune.grid_search([t.spec().to_json() for t in spec.trials])},
            tune_config=tune.TuneConfig(
                scheduler=_scheduler(spec),
                max_concurrent_trials=concurrent,
                trial_name_creator=lambda t: t.config["trial"]["key"],
                trial_dirname_creator=lambda t: t.config["trial"]["key"]),
            run_config=run_config)
        grid = tuner.fit()
        _pull_trials(sweep_ctx)
        eval_failures = finish_pool(pool, sweep_ctx, progress)
        rows = []
        for result in grid:
            trial = result.config["trial"]
            done = layout.trial(trial["key"]).result
            metrics = json.loads(done.read_text()) if done.is_file() else (result.metrics or {})
            metrics = {**metrics, **latest_eval(sweep_ctx, trial["key"])}
            status = "ERROR" if result.error else ("DONE" if done.is_file() else "STOPPED")
            rows.append({"key": trial["key"], "label": trial["label"], "status": status,
                         "metrics": metrics, "error": str(result.error).splitlines()[0] if result.error else ""})
        rows.sort(key=lambda r: r["key"])
        table = _table(rows)
        print("\n" + table)
        for r in rows:
            if r["error"]:
                print(f"{r['key']}: {r['error']}", file=sys.stderr)
        _replay_spools(spec, uri, parent_id, sweep_ctx)
        _close_stopped(rows, uri, parent_id)
        layout.results.write_text(table + "\n")
        storage.push(layout.results)
        parent.log_text(table + "\n", layout.RESULTS)
        # a trial that finished without the sweep's metric (its evaluation failed) fails the sweep
        missing = [r["key"] for r in rows if r["status"] == "DONE" and spec.file.metric not in r["metrics"]]
        for key in missing:
            print(f"{key}: the sweep's metric {spec.file.metric} was not computed"
                  + ("; see the evaluation failures above" if eval_failures else ""), file=sys.stderr)
        failed = bool(missing) or any(r["status"] == "ERROR" for r in rows)
        parent.close("FAILED" if failed else "FINISHED")
    finally:
        if server is not None:
            server.stop()
            layout.server.unlink(missing_ok=True)
            storage.push(server.store / "mlflow.db")     # the runs beside their artifacts
    if server is not None:
        print(f"\nMLflow store: {read_uri}\nto compare the runs: {tracking.ui_command(server.store)}"
              "\n  then open http://127.0.0.1:5000")
    else:
        print(f"\nMLflow: {uri} (experiment {spec.file.tracking.experiment!r}, run sweep:{spec.file.name})")
    print(f"sweep folder: {storage.location(spec.sweep_dir)}")
    return 1 if failed else 0


def _pull_trials(sweep_ctx) -> None:
    """Bring every trial's own files (not its snapshots) into the driver's working folder."""
    storage, layout = sweep_ctx.storage, sweep_ctx.layout
    for key, is_dir in storage.entries(layout.trials) if storage.remote else []:
        if is_dir:
            storage.pull_files(layout.trial(key).root)


def _replay_spools(spec: SweepSpec, uri: str, parent_id: str, sweep_ctx) -> None:
    """Send what trials spooled while MLflow was unreachable and could not replay themselves."""
    from orchestrator import tracking

    runs = None
    for trial in spec.trials:
        files = sweep_ctx.trial(trial.key)
        spools = [files.spool, files.eval_spool]
        spools = [p for p in spools if p.is_file()]
        if not spools:
            continue
        if runs is None:
            runs = {r.data.tags.get(tracking.TAG_TRIAL): r.info.run_id
                    for r in tracking.children(uri, parent_id)}
        for spool in spools if trial.key in runs else []:
            sent = tracking.replay_spool(uri, runs[trial.key], spool)
            print(f"{trial.key}: replayed {sent} tracking records spooled during an outage")


def _close_stopped(rows: list[dict], uri: str, parent_id: str) -> None:
    """Trials the scheduler stopped early (ASHA) end as KILLED in MLflow, not as running forever."""
    from orchestrator import tracking

    stopped = {r["key"] for r in rows if r["status"] == "STOPPED"}
    if not stopped:
        return
    for run in tracking.children(uri, parent_id):
        # a stop interrupts the trial's Train run, which may already have marked it FAILED
        if run.data.tags.get(tracking.TAG_TRIAL) in stopped and run.info.status != "KILLED":
            tracking.finish_run(uri, run.info.run_id, "KILLED")


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_intermixed_args(argv)
    if args.resume and args.overwrite:
        raise UserError("--resume and --overwrite exclude each other")
    spec = load_sweep(args.sweep, args.overrides)
    check_eval_weights(spec)
    if args.dry_run:
        print(format_dry_run(spec))
        return 0
    from orchestrator import locks

    lock = _lock(spec)            # before any work: a second driver stops here, in one line
    try:
        needs = pin_worlds(spec)      # the pinned cache folders are part of what --resume compares
        _check_folder(spec, args)     # refuse a foreign folder before minutes of world building
        build_worlds(needs, progress=not args.quiet)
        return run_sweep(spec, args)
    finally:
        locks.release(lock)


if __name__ == "__main__":
    run_cli(main)
