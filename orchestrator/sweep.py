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

With a ``student`` section (the paper's two-stage recipe) a first stage trains one Di[M]O student
per training seed, side by side, and every trial then starts from its seed's student's final
checkpoint (``init.checkpoint``); the search's trials start when every student finished.

Everything goes to <output_dir>/<name>/ (trials/, students/, train/ checkpoints, tune*/ state). ``--resume``
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

from orchestrator import source
from orchestrator.config import UserError, run_cli
from orchestrator.sweeping.layout import SweepLayout
from orchestrator.sweeping.resources import plan_resources
from orchestrator.sweeping.dry_run import format_dry_run
from orchestrator.sweeping.spec import SweepSpec, check_eval_weights, load_sweep
from orchestrator.sweeping.schema import eval_settings
from orchestrator.sweeping.stages import pull_trials, remove, run_stage, table as results_table


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


def _lock(spec: SweepSpec) -> Path:
    """Hold <output_dir>/.<name>.lock while this driver runs (orchestrator.locks)."""
    from orchestrator import locks

    # an s3:// output_dir: the driver's working folder (two drivers on one machine still collide)
    root = locks.writable_dir(spec.storage.local, f"{spec.source}: output_dir")
    lock = SweepLayout.lock_file(root, spec.file.name)
    locks.acquire(lock, f"{spec.source}: sweep {spec.file.name}")
    return lock


def _check_folder(spec: SweepSpec, args) -> None:
    layout, storage = spec.layout, spec.storage
    state = layout.state
    if storage.remote and not args.resume:
        remove(spec.sweep_dir)           # scratch left by an earlier run on this machine
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
        try:   # sweeps from before the student section have no "students"
            before += [t["config"] for t in json.loads(state.read_text()).get("students", [])]
        except (AttributeError, KeyError, TypeError):
            raise UserError(f"{spec.source}: --resume: {state} is not a readable sweep state; "
                            "use --overwrite to start again") from None
        now = spec.to_json()
        if before != [t["config"] for t in now["trials"] + now["students"]]:
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
        remove(spec.sweep_dir)


def _start_tracking(spec: SweepSpec, address: str | None, commit: str):
    """-> (uri for trials, uri to read the store later, experiment id, parent id, server or None).

    Ray is up: on a cluster the server listens on this node's address (orchestrator.sweeping.cluster)."""
    from orchestrator import tracking
    from orchestrator.sweeping import cluster

    t, storage = spec.file.tracking, spec.storage
    server = None
    artifact_location = None
    if t.uri:
        cluster.check_tracking_uri(spec.source, t.uri, address)
        uri = read_uri = t.uri
    else:
        host = cluster.tracking_host(spec.source, address)
        store = tracking.default_store(storage.local).resolve()
        if storage.remote:
            # runs in the driver's SQLite (fetched from the bucket when this machine has none, so a
            # resume elsewhere adds no duplicate runs); artifacts through the server to the bucket
            storage.pull(store / "mlflow.db")
            server = tracking.LocalServer.start(store, host=host, env=storage.env(),
                                                artifacts=storage.location(store / "artifacts"))
        else:
            server = tracking.LocalServer.start(store, host=host)
            artifact_location = str(store / "artifacts")
        uri = server.uri
        read_uri = tracking.sqlite_uri(store)
    experiment_id = tracking.ensure_experiment(uri, t.experiment, artifact_location)
    parent_id = tracking.get_or_create_parent(
        uri, experiment_id, spec.file.name,
        tags={"softdimo.preset": spec.preset, "softdimo.sweep_file": str(Path(spec.source).resolve()),
              "softdimo.trials": str(len(spec.trials)), source.TAG_COMMIT: commit})
    return uri, read_uri, experiment_id, parent_id, server


def sweep_context(spec: SweepSpec, uri: str, experiment_id: str, parent_id: str,
                  cpus_per_worker: float, threads_per_worker: int, commit: str = "unknown"):
    """The frozen context every trial and the evaluator pool get (CPU share from plan_resources)."""
    from orchestrator.sweeping.layout import EvalPlan, SweepContext, TrialScaling

    sc, ev = spec.file.scaling, spec.file.evaluation
    return SweepContext(
        name=spec.file.name, layout=spec.layout, tracking_uri=uri, experiment_id=experiment_id,
        parent_id=parent_id, max_failures=spec.file.failure.max_failures,
        scaling=TrialScaling(num_workers=sc.num_workers, use_gpu=sc.use_gpu,
                             cpus_per_worker=cpus_per_worker, gpus_per_worker=sc.gpus_per_worker,
                             threads_per_worker=threads_per_worker,
                             resources_per_worker=dict(sc.resources_per_worker)),
        evaluation=EvalPlan(settings=eval_settings(ev), every_images=ev.every_images,
                            late_checkpoints=ev.late_checkpoints, actors=ev.actors,
                            cpus_per_actor=ev.cpus_per_actor, gpus_per_actor=ev.gpus_per_actor),
        storage=spec.storage, commit=commit)


def run_sweep(spec: SweepSpec, args) -> int:
    import ray

    from orchestrator import tracking
    from orchestrator.sweeping.evaluation import finish_pool, latest_eval, start_pool

    progress = not args.quiet
    layout, storage = spec.layout, spec.storage
    layout.root.mkdir(parents=True, exist_ok=True)
    layout.marker.touch()
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
    # after Ray: the server's address depends on whether other nodes run trials
    storage.push(layout.marker)
    commit = source.commit()
    # a resumed sweep keeps the commits its trials ran on before (the resume check read the state)
    earlier = json.loads(layout.state.read_text()).get("commits", [source.UNRECORDED]) if args.resume else []
    uri, read_uri, experiment_id, parent_id, server = _start_tracking(spec, address, commit)
    if server is not None:
        layout.server.write_text(json.dumps(
            {"uri": server.uri, "store": str(server.store), "watchdog_pid": server.process.pid,
             "driver_pid": os.getpid()}, indent=2))
    try:
        state = spec.to_json()
        state["tracking_uri"] = read_uri
        state["commits"] = source.history(earlier, commit)
        layout.state.write_text(json.dumps(state, indent=2))
        storage.push(layout.state)
        parent = tracking.Tracker(uri, parent_id, layout.parent_spool)
        parent.log_text(json.dumps(state, indent=2), layout.STATE)
        pool, rows, blocked = None, [], False
        for trials in spec.stages():
            concurrent, per_worker, threads = plan_resources(spec, ray.cluster_resources(), len(trials))
            sweep_ctx = sweep_context(spec, uri, experiment_id, parent_id, per_worker, threads, commit)
            students = trials is spec.students
            if progress:
                print(f"{spec.file.name}: {len(trials)} {'student' if students else 'trial'}(s), up to "
                      f"{concurrent} at once, each worker {per_worker:g} CPU and {threads} thread(s)",
                      flush=True)
            pull_trials(sweep_ctx)       # a resumed sweep's trial files, from wherever they ran
            pool = pool or start_pool(sweep_ctx)
            stage_rows = run_stage(spec, trials, sweep_ctx, concurrent, progress,
                              layout.tune_students if students else layout.tune)
            rows += stage_rows
            unfinished = [r["key"] for r in stage_rows if r["status"] != "DONE"]
            if students and unfinished:
                # a trial starts from its seed's student: without it there is nothing to fine-tune
                print(f"student(s) {', '.join(unfinished)} did not finish: the search's trials are "
                      "not started (fix the cause, then --resume)", file=sys.stderr)
                blocked = True
                break
        eval_failures = finish_pool(pool, sweep_ctx, progress)
        for r in rows:
            r["metrics"] = {**r["metrics"], **latest_eval(sweep_ctx, r["key"])}
        rows.sort(key=lambda r: r["key"])
        table = results_table(rows)
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
        failed = blocked or bool(missing) or any(r["status"] == "ERROR" for r in rows)
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


def _replay_spools(spec: SweepSpec, uri: str, parent_id: str, sweep_ctx) -> None:
    """Send what trials spooled while MLflow was unreachable and could not replay themselves."""
    from orchestrator import tracking

    runs = None
    for trial in spec.students + spec.trials:
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
        # the stopped trial ends its run KILLED itself (stopped.json) unless it died first
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
        from orchestrator.sweeping import cluster
        from orchestrator.sweeping.worlds import build_worlds, pin_worlds

        # on a cluster the world goes where every node reads it, not into this node's cache
        shared = cluster.shared_world_cache(spec.file.output_dir) if cluster.attaching(args.address) else None
        needs = pin_worlds(spec, shared)   # the pinned cache folders are part of what --resume compares
        _check_folder(spec, args)     # refuse a foreign folder before minutes of world building
        build_worlds(needs, progress=not args.quiet, shared=shared)
        return run_sweep(spec, args)
    finally:
        locks.release(lock)


if __name__ == "__main__":
    run_cli(main)
