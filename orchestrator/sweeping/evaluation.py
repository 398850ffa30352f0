"""The sweep's side of evaluation: start the evaluator pool, record its results, finish the queue.

Results go to two places: the trial's MLflow run (``eval/*`` at the checkpoint's step, spooled while
MLflow is unreachable) and ``trials/<key>/eval.jsonl`` (one line per evaluated checkpoint), which
makes a resumed sweep skip checkpoints already evaluated and gives the final table its numbers.
"""
from __future__ import annotations

import json
import sys

from orchestrator import tracking
from orchestrator.sweeping.layout import SweepContext
from orchestrator.sweeping.pool import ACTIVE, EvalJob, EvaluatorPool


def evaluated(sweep_ctx: SweepContext, key: str) -> list[dict]:
    path = sweep_ctx.trial(key).eval_log
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def latest_eval(sweep_ctx: SweepContext, key: str) -> dict:
    """The metrics of the trial's most recent evaluated checkpoint ({} if none)."""
    records = evaluated(sweep_ctx, key)
    return max(records, key=lambda r: r["step"])["metrics"] if records else {}


def start_pool(sweep_ctx: SweepContext) -> EvaluatorPool | None:
    ev = sweep_ctx.evaluation
    if not ev.enabled:
        return None

    def record(job: EvalJob, metrics: dict) -> None:
        files = sweep_ctx.trial(job.trial)
        with files.eval_log.open("a") as f:
            f.write(json.dumps({"step": job.step, "checkpoint": job.checkpoint, "metrics": metrics}) + "\n")
        sweep_ctx.storage.push(files.eval_log)      # the driver is its only writer
        tracker = tracking.Tracker(sweep_ctx.tracking_uri, job.run_id, files.eval_spool)
        tracker.log_metrics(job.step, metrics)
        tracker.set_tags({"eval.last_step": str(job.step)})
        tracker.close()

    pool = EvaluatorPool(ev.settings, size=ev.actors, num_cpus=ev.cpus_per_actor,
                         num_gpus=ev.gpus_per_actor, on_result=record, storage=sweep_ctx.storage)
    for key in sweep_ctx.layout.trial_keys():     # a resumed sweep: what is done stays done
        pool.seen.update(r["checkpoint"] for r in evaluated(sweep_ctx, key))
    ACTIVE[sweep_ctx.name] = pool
    return pool


def finish_pool(pool: EvaluatorPool | None, sweep_ctx: SweepContext, progress: bool) -> list:
    """Queue every snapshot not yet evaluated (finished trials' last ones included), wait, stop.

    Returns the failures (job, error) so the caller can report them.
    """
    if pool is None:
        return []
    for key in sweep_ctx.layout.trial_keys():
        files = sweep_ctx.trial(key)
        if not files.result.is_file():
            continue
        run_id = json.loads(files.result.read_text())["mlflow_run_id"]
        for name, _ in sweep_ctx.storage.entries(files.snapshots):   # wherever the trial ran
            if name.startswith("step_"):
                pool.submit(EvalJob(trial=key, run_id=run_id, step=int(name.split("_")[1]),
                                    checkpoint=str(files.snapshot(name))))
    if pool.pending and progress:
        print(f"waiting for {pool.pending} evaluation(s)...", file=sys.stderr, flush=True)
    pool.drain()
    pool.shutdown()
    ACTIVE.pop(sweep_ctx.name, None)
    for job, error in pool.failures:
        print(f"{job.trial}: evaluation of step {job.step} failed: {error}", file=sys.stderr)
    return pool.failures
