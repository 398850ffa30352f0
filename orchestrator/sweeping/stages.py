"""One stage of a sweep as Ray Tune trials: the students of the two-stage recipe, or the search.

Each stage is a fresh ``Tuner`` over its trials with the same trainable (``trial.train_driver``),
scheduler, live table and callbacks; ``run_stage`` returns one row per trial for the final table.
Also the final table itself (``table``): every trial's final metrics and a line on evaluation noise.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from orchestrator.sweeping.resources import DRIVER_CPU
from orchestrator.sweeping.schema import SweepSpec
TABLE_METRICS = ("eval/world_fid", "eval/world_clip", "eval/geneval_world", "eval/fid5k", "eval/fid50k",
                 "eval/is", "eval/clip", "eval/hps_v21", "eval/imagereward", "eval/temperature",
                 "loss/dimo", "loss/gan_generator", "loss/reward", "ema/entropy", "ddp/max_param_spread")


def remove(path: Path) -> None:
    """Delete a file, link or folder without reading it (links are removed, not followed)."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


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


def run_stage(spec: SweepSpec, trials: list, sweep_ctx, concurrent: int, progress: bool, tune_dir: Path) -> list:
    """Run one stage's trials (students, or the search's trials) as Ray Tune trials of the same
    trainable; -> one row per trial (key, label, status, final metrics, first error line)."""
    from ray import tune

    from orchestrator.sweeping.pg_cleanup import OrphanGroupCleaner, remove_leftover_groups
    from orchestrator.sweeping.pool import EvalDispatch
    from orchestrator.sweeping.trial import StopMarker, train_driver

    layout = spec.layout
    trainable = tune.with_resources(tune.with_parameters(train_driver, sweep=sweep_ctx),
                                    {"CPU": DRIVER_CPU})
    storage = spec.storage
    run_config = tune.RunConfig(
        name=tune_dir.name, storage_path=storage.ray_path(layout.root),
        storage_filesystem=storage.filesystem(),
        failure_config=tune.FailureConfig(max_failures=spec.file.failure.max_failures),
        progress_reporter=_reporter(spec), verbose=1 if progress else 0,
        callbacks=[EvalDispatch(spec.file.name), OrphanGroupCleaner(), StopMarker(sweep_ctx)])
    # Never Tuner.restore: it unpickles tune/ (tuner.pkl, trial states), so a file planted in
    # the sweep folder would run. Tune's state is deleted unread and a new Tuner runs every
    # trial: train_driver reports a finished trial's result.json again, and an unfinished one
    # resumes from its own verified checkpoint (Train's JSON snapshot under train/<key>/).
    remove(tune_dir)
    storage.delete(tune_dir)
    tuner = tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search([t.spec().to_json() for t in trials])},
        tune_config=tune.TuneConfig(
            scheduler=_scheduler(spec),
            max_concurrent_trials=concurrent,
            trial_name_creator=lambda t: t.config["trial"]["key"],
            trial_dirname_creator=lambda t: t.config["trial"]["key"]),
        run_config=run_config)
    results = tuner.fit()
    remove_leftover_groups()
    pull_trials(sweep_ctx)
    rows = []
    for result in results:
        trial = result.config["trial"]
        done = layout.trial(trial["key"]).result
        metrics = json.loads(done.read_text()) if done.is_file() else (result.metrics or {})
        status = "ERROR" if result.error else ("DONE" if done.is_file() else "STOPPED")
        rows.append({"key": trial["key"], "label": trial["label"], "status": status,
                     "metrics": metrics, "error": str(result.error).splitlines()[0] if result.error else ""})
    return rows


def pull_trials(sweep_ctx) -> None:
    """Bring every student's and trial's own files (not its snapshots) into the driver's working
    folder from object storage; a local or shared folder needs nothing."""
    storage, layout = sweep_ctx.storage, sweep_ctx.layout
    if not storage.remote:
        return
    for folder in (layout.students, layout.trials):
        for key, is_dir in storage.entries(folder):
            if is_dir:
                storage.pull_files(layout.trial(key).root)


def table(rows: list[dict]) -> str:
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
    seeds = {m.group(1) for r in rows if (m := re.search(r"\bseed=(\S+)", r["label"]))}
    advice = ("Rows that differ only in their seed show the training-seed noise, which is not in it."
              if len(seeds) > 1 else
              "Training-seed noise is not in it: add `seed: {grid: [0, 1, 2]}` to the search to see it.")
    return ["", f"world-FID spread {gap:.3g} ({best[0]} best, {worst[0]} worst) is {verdict} twice "
            f"its evaluation noise ({noise:.2g}; ± is a bootstrap SE over the evaluated images). " + advice]
