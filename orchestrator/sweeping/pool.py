"""The evaluator pool: resident Ray actors that score checkpoints as the trials report them.

Each actor builds an ``evaluators.suite.Evaluator`` once (its scorer networks stay loaded) and then
evaluates one checkpoint at a time. The sweep driver feeds the pool from a Tune callback when a
trial's report names a fresh evaluation snapshot (no folder is ever polled), polls finished work on
every Tune step, and writes each result into the trial's MLflow run at the checkpoint's step. An
actor that dies is replaced and its checkpoint goes back to the front of the queue, so no metric
goes missing; a checkpoint whose evaluation itself raises is reported once and not retried.
"""
from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional

import ray
from ray import tune

log = logging.getLogger(__name__)


@ray.remote
class EvaluatorActor:
    """One resident evaluator (scorer networks loaded once)."""

    def __init__(self, settings, threads: int, use_gpu: bool, storage=None):
        import torch

        from evaluators.suite import Evaluator
        from evaluators.networks.weights import set_offline_env

        set_offline_env()
        torch.set_num_threads(max(1, threads))
        # the GPU Ray assigned (a fraction: several actors share it); none asked, none touched,
        # so an actor without a GPU share never crowds the trials' devices
        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.evaluator = Evaluator(settings, device=device)
        self.storage = storage      # orchestrator.sweeping.storage.Storage; None: a local folder

    def evaluate(self, checkpoint: str) -> dict:
        from pathlib import Path

        from trainers.checkpoint import verify_checkpoint

        if self.storage is not None:     # snapshots written on another node come from storage
            self.storage.pull(Path(checkpoint))

        verify_checkpoint(checkpoint, ("ema.safetensors",))   # a damaged snapshot fails its job
        return self.evaluator.evaluate(checkpoint)


@dataclass
class EvalJob:
    trial: str                  # trial key
    run_id: str                 # its MLflow run
    step: int                   # training step of the checkpoint
    checkpoint: str             # a checkpoint directory with ema.safetensors + meta.json
    attempts: int = 0


@dataclass
class EvaluatorPool:
    """N actors, a FIFO of jobs, re-queue on actor death. Driver-side; not thread-safe."""

    settings: object                  # evaluators.suite.EvalSettings (each actor's Evaluator)
    size: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    on_result: Optional[Callable[[EvalJob, dict], None]] = None
    storage: object = None            # orchestrator.sweeping.storage.Storage of the snapshots
    max_attempts: int = 3
    results: list = field(default_factory=list)       # (job, metrics)
    failures: list = field(default_factory=list)      # (job, error text)

    def __post_init__(self):
        self.actors = [self._new_actor() for _ in range(self.size)]
        self.idle = list(self.actors)
        self.queue: deque = deque()
        self.running: dict = {}                       # future -> (actor, job)
        self.seen: set = set()                        # checkpoints ever submitted

    def _new_actor(self):
        return EvaluatorActor.options(num_cpus=self.num_cpus, num_gpus=self.num_gpus,
                                      scheduling_strategy="DEFAULT").remote(
            self.settings, max(1, int(self.num_cpus)), self.num_gpus > 0, self.storage)

    def submit(self, job: EvalJob) -> None:
        """Queue a checkpoint; one already queued, running or done is not evaluated again."""
        if job.checkpoint in self.seen:
            return
        self.seen.add(job.checkpoint)
        self.queue.append(job)
        self._dispatch()

    def _dispatch(self) -> None:
        while self.idle and self.queue:
            actor, job = self.idle.pop(), self.queue.popleft()
            self.running[actor.evaluate.remote(job.checkpoint)] = (actor, job)

    @property
    def pending(self) -> int:
        return len(self.queue) + len(self.running)

    def poll(self, timeout: float = 0.0) -> None:
        """Collect finished evaluations (waiting at most ``timeout`` s), then hand out queued jobs."""
        if self.running:
            ready, _ = ray.wait(list(self.running), num_returns=len(self.running), timeout=timeout)
            for future in ready:
                self._collect(future)
        self._dispatch()

    def _collect(self, future) -> None:
        actor, job = self.running.pop(future)
        try:
            metrics = ray.get(future)
        except ray.exceptions.RayActorError as err:
            # the actor process died (killed, OOM, node lost): replace it and retry the job first
            self.actors.remove(actor)
            replacement = self._new_actor()
            self.actors.append(replacement)
            self.idle.append(replacement)
            job.attempts += 1
            if job.attempts < self.max_attempts:
                log.warning("evaluator died on %s step %d; re-queued (%s)", job.trial, job.step,
                            type(err).__name__)
                self.queue.appendleft(job)
            else:
                self.failures.append((job, f"evaluator died {job.attempts} times: {err}"))
            return
        except ray.exceptions.RayTaskError as err:    # evaluate() raised: retrying will not help
            self.idle.append(actor)
            self.failures.append((job, str(err.cause if err.cause else err).splitlines()[0]))
            log.warning("evaluation of %s step %d failed: %s", job.trial, job.step, self.failures[-1][1])
            return
        self.idle.append(actor)
        self.results.append((job, metrics))
        if self.on_result:
            self.on_result(job, metrics)

    def drain(self, timeout: float | None = None) -> bool:
        """Wait for every queued and running job; False if ``timeout`` s passed first."""
        import time

        deadline = None if timeout is None else time.time() + timeout
        while self.pending:
            if deadline is not None and time.time() > deadline:
                return False
            self.poll(timeout=1.0)
        return True

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors, self.idle = [], []


# The pool of each running sweep, by sweep name. The Tune callback looks it up at call time rather
# than holding it: Tune pickles callbacks with the experiment, and a restored sweep (a new process)
# registers its new pool under the same name.
ACTIVE: dict = {}


class EvalDispatch(tune.Callback):
    """Submits a trial's evaluation snapshots as its reports name them; polls the pool each step."""

    def __init__(self, sweep_name: str):
        self.sweep_name = sweep_name

    def on_trial_result(self, iteration, trials, trial, result, **info):
        pool, path = ACTIVE.get(self.sweep_name), result.get("eval_checkpoint")
        if pool is not None and path:
            pool.submit(EvalJob(trial=trial.config["trial"]["key"], run_id=result["mlflow_run_id"],
                                step=int(result["step"]), checkpoint=path))

    def on_step_end(self, iteration, trials, **info):
        pool = ACTIVE.get(self.sweep_name)
        if pool is not None:
            pool.poll()
