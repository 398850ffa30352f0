"""The sweep's side of evaluation: start the evaluator pool, record its results, finish the queue.

Results go to two places: the trial's MLflow run (``eval/*`` at the checkpoint's step, spooled while
MLflow is unreachable) and ``trials/<key>/eval.jsonl`` (one line per evaluated checkpoint), which
makes a resumed sweep skip checkpoints already evaluated and gives the final table its numbers.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from orchestrator import tracking
from orchestrator.pool import ACTIVE, EvalJob, EvaluatorPool
from orchestrator.trial import RESULT, trial_dir

EVAL_LOG = "eval.jsonl"


def eval_settings(evaluation: dict) -> dict:
    """The evaluators.suite.EvalSettings fields of a sweep's evaluation section."""
    return {"metrics": list(evaluation["metrics"]), "num_images": evaluation["num_images"],
            "temperatures": list(evaluation["temperatures"]), "seed": evaluation["seed"],
            "reference": evaluation["reference"], "paths": dict(evaluation["weights"]),
            "test_time": evaluation.get("test_time"),
            "geneval_prompts_per_task": evaluation.get("geneval_prompts_per_task", 8),
            "images_per_prompt": evaluation.get("images_per_prompt", 4)}


def evaluated(sweep_ctx: dict, key: str) -> list[dict]:
    path = trial_dir(sweep_ctx, key) / EVAL_LOG
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def latest_eval(sweep_ctx: dict, key: str) -> dict:
    """The metrics of the trial's most recent evaluated checkpoint ({} if none)."""
    records = evaluated(sweep_ctx, key)
    return max(records, key=lambda r: r["step"])["metrics"] if records else {}


def start_pool(sweep_ctx: dict) -> EvaluatorPool | None:
    ev = sweep_ctx["evaluation"]
    if not ev["metrics"] or not ev["num_images"]:
        return None

    def record(job: EvalJob, metrics: dict) -> None:
        tdir = trial_dir(sweep_ctx, job.trial)
        with (tdir / EVAL_LOG).open("a") as f:
            f.write(json.dumps({"step": job.step, "checkpoint": job.checkpoint, "metrics": metrics}) + "\n")
        tracker = tracking.Tracker(sweep_ctx["tracking_uri"], job.run_id, tdir / "eval_spool.jsonl")
        tracker.log_metrics(job.step, metrics)
        tracker.set_tags({"eval.last_step": str(job.step)})
        tracker.close()

    pool = EvaluatorPool(eval_settings(ev), size=ev["actors"], num_cpus=ev["cpus_per_actor"],
                         num_gpus=ev["gpus_per_actor"], on_result=record)
    for key in _trial_keys(sweep_ctx):            # a resumed sweep: what is done stays done
        pool.seen.update(r["checkpoint"] for r in evaluated(sweep_ctx, key))
    ACTIVE[sweep_ctx["name"]] = pool
    return pool


def _trial_keys(sweep_ctx: dict) -> list[str]:
    root = Path(sweep_ctx["sweep_dir"]) / "trials"
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


def finish_pool(pool: EvaluatorPool | None, sweep_ctx: dict, progress: bool) -> list:
    """Queue every snapshot not yet evaluated (finished trials' last ones included), wait, stop.

    Returns the failures (job, error) so the caller can report them.
    """
    if pool is None:
        return []
    for key in _trial_keys(sweep_ctx):
        tdir = trial_dir(sweep_ctx, key)
        result = tdir / RESULT
        if not result.is_file():
            continue
        run_id = json.loads(result.read_text())["mlflow_run_id"]
        for snap in sorted((tdir / "eval").glob("step_*")):
            pool.submit(EvalJob(trial=key, run_id=run_id, step=int(snap.name.split("_")[1]),
                                checkpoint=str(snap)))
    if pool.pending and progress:
        print(f"waiting for {pool.pending} evaluation(s)...", file=sys.stderr, flush=True)
    pool.drain()
    pool.shutdown()
    ACTIVE.pop(sweep_ctx["name"], None)
    for job, error in pool.failures:
        print(f"{job.trial}: evaluation of step {job.step} failed: {error}", file=sys.stderr)
    return pool.failures
