"""The sweep's typed contract: where a sweep keeps its files, and what crosses Ray to its trials.

``SweepLayout`` is the one place that names the files of a sweep folder (``sweep.py`` writes them,
``trial.py`` and ``sweep_eval.py`` write a trial's, ``evaluate.py`` and ``report.py`` read them):

    <output_dir>/.<name>.lock              one driver per sweep (orchestrator.locks)
    <output_dir>/<name>/                    SweepLayout.root
        .softdimo-sweep                     marker: --overwrite deletes only folders holding it
        sweep.json                          the expanded trials, the tracking URI to read them back
        teacher.json                        the teacher's references at 1 and 16 steps (claims page)
        results.txt                         the final table, as printed
        mlflow_server.json                  the sweep's own MLflow server while it runs
        parent_spool.jsonl                  the parent run's records while MLflow is away
        tune/  tune_students/               Tune's state of each stage (deleted unread on --resume)
        train/<key>/step_XXXXXXXX/          Ray Train's checkpoints (students' and trials')
        students/student-seed<N>/           the two-stage recipe's Di[M]O students (a TrialLayout)
        trials/<key>/                       TrialLayout.root (the trial's training output_dir)
            result.json  final.json  failure.json  stopped.json  attempts.jsonl
            spool.jsonl  eval_spool.jsonl   eval.jsonl  eval/step_XXXXXXXX/

With an ``s3://`` output_dir these paths are each node's working folder and the same names are
the object keys under ``s3://bucket/prefix/<name>/`` (``orchestrator.sweeping.storage``); the lock
and mlflow_server.json stay on the driver's disk.

``SweepContext`` (with ``TrialScaling`` and ``EvalPlan``) is what the driver hands every trial and
the evaluator pool; frozen, so no trial can change what the others see. ``TrialSpec`` is one trial.
Tune's ``param_space`` keeps the trial as its JSON dict (the live table reads ``trial/label`` from
it); ``TrialSpec.from_json`` turns it back at the trainable's door.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator.sweeping.storage import Storage

if TYPE_CHECKING:    # report and evaluate read layouts without loading torch
    from evaluators.suite import EvalSettings


@dataclass(frozen=True)
class TrialLayout:
    """The files of one trial, ``<sweep>/trials/<key>/``."""
    root: Path

    RESULT = "result.json"        # a finished trial's final metrics (its presence means: do not rerun)
    FAILURE = "failure.json"      # written by rank 0 when the loss became non-finite
    STOPPED = "stopped.json"      # written by the driver when the scheduler stops the trial
    FINAL = "final.json"          # rank 0's final metrics, read back by the driver
    ATTEMPTS = "attempts.jsonl"   # one line per (re)start of the worker group: pid, start step
    SPOOL = "spool.jsonl"         # the trial's MLflow records while MLflow is unreachable
    EVAL_SPOOL = "eval_spool.jsonl"   # the evaluator pool's records for the trial's run, likewise
    EVAL_LOG = "eval.jsonl"       # one line per evaluated checkpoint: step, checkpoint, metrics
    SNAPSHOTS = "eval"            # EMA weights + meta of each checkpoint due for evaluation

    @property
    def key(self) -> str:
        return self.root.name

    @property
    def result(self) -> Path:
        return self.root / self.RESULT

    @property
    def failure(self) -> Path:
        return self.root / self.FAILURE

    @property
    def stopped(self) -> Path:
        return self.root / self.STOPPED

    @property
    def final(self) -> Path:
        return self.root / self.FINAL

    @property
    def attempts(self) -> Path:
        return self.root / self.ATTEMPTS

    @property
    def spool(self) -> Path:
        return self.root / self.SPOOL

    @property
    def eval_spool(self) -> Path:
        return self.root / self.EVAL_SPOOL

    @property
    def eval_log(self) -> Path:
        return self.root / self.EVAL_LOG

    @property
    def snapshots(self) -> Path:
        return self.root / self.SNAPSHOTS

    def snapshot(self, checkpoint_name: str) -> Path:
        return self.snapshots / checkpoint_name


@dataclass(frozen=True)
class SweepLayout:
    """The files of one sweep, ``<output_dir>/<name>/``."""
    root: Path

    MARKER = ".softdimo-sweep"          # --overwrite deletes only folders holding it
    STATE = "sweep.json"                # the expanded trials and the tracking URI
    SERVER = "mlflow_server.json"       # the running sweep's MLflow server (address, watchdog pid)
    PARENT_SPOOL = "parent_spool.jsonl"
    RESULTS = "results.txt"             # the final table (also the parent run's artifact)
    TRIALS, TRAIN, TUNE = "trials", "train", "tune"
    STUDENTS, TUNE_STUDENTS = "students", "tune_students"
    TEACHER = "teacher.json"            # the teacher's references for the claims page (orchestrator.claims)
    STUDENT_PREFIX = "student-seed"     # a student's key: one per training seed (search keys: t000...)

    @classmethod
    def of(cls, output_dir: str | Path, name: str) -> "SweepLayout":
        return cls(Path(output_dir) / name)

    @staticmethod
    def lock_file(output_dir: str | Path, name: str) -> Path:
        """Beside the sweep folder, not in it: --overwrite deletes the folder while holding it."""
        return Path(output_dir) / f".{name}.lock"

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def marker(self) -> Path:
        return self.root / self.MARKER

    @property
    def state(self) -> Path:
        return self.root / self.STATE

    @property
    def server(self) -> Path:
        return self.root / self.SERVER

    @property
    def results(self) -> Path:
        return self.root / self.RESULTS

    @property
    def parent_spool(self) -> Path:
        return self.root / self.PARENT_SPOOL

    @property
    def trials(self) -> Path:
        return self.root / self.TRIALS

    @property
    def train(self) -> Path:
        return self.root / self.TRAIN

    @property
    def tune(self) -> Path:
        return self.root / self.TUNE

    @property
    def teacher_refs(self) -> Path:
        return self.root / self.TEACHER

    @property
    def students(self) -> Path:
        return self.root / self.STUDENTS

    @property
    def tune_students(self) -> Path:
        return self.root / self.TUNE_STUDENTS

    @classmethod
    def student_key(cls, seed: int) -> str:
        return f"{cls.STUDENT_PREFIX}{seed}"

    @classmethod
    def is_student(cls, key: str) -> bool:
        return key.startswith(cls.STUDENT_PREFIX)

    def trial(self, key: str) -> TrialLayout:
        """A search trial's files, or a student's (the same machinery trains both)."""
        return TrialLayout((self.students if self.is_student(key) else self.trials) / key)

    def final_checkpoint(self, key: str, step: int) -> Path:
        """Where Ray Train keeps the checkpoint of ``step`` of a trial or student (train/<key>/)."""
        from trainers.checkpoint import checkpoint_dir_name   # lazy: readers of layouts skip torch

        return self.train / key / checkpoint_dir_name(step)

    def trial_keys(self) -> list[str]:
        """The keys of the students and trials that have a folder (started at least once): the
        students first, each group sorted."""
        return [p.name for folder in (self.students, self.trials) if folder.is_dir()
                for p in sorted(folder.iterdir())]


@dataclass(frozen=True)
class TrialScaling:
    """A trial's Ray Train workers; the CPU share and threads are planned after Ray starts."""
    num_workers: int
    use_gpu: bool
    cpus_per_worker: float
    gpus_per_worker: float
    threads_per_worker: int
    resources_per_worker: dict = field(default_factory=dict)   # custom Ray resources, e.g. {node_b: 1}

    @property
    def backend(self) -> str:
        """The ranks' torch.distributed backend: NCCL when every rank has a GPU of its own, gloo on
        the CPU and when ranks may share a GPU (a fraction each), which NCCL refuses."""
        if self.use_gpu and (self.num_workers == 1 or self.gpus_per_worker >= 1):
            return "nccl"
        return "gloo"


@dataclass(frozen=True)
class EvalPlan:
    """The evaluator pool: what each actor computes (``settings``), how many, when."""
    settings: EvalSettings
    every_images: int
    late_checkpoints: int
    actors: int
    cpus_per_actor: float
    gpus_per_actor: float

    @property
    def enabled(self) -> bool:
        return bool(self.settings.metrics and self.settings.num_images)


def late_steps(steps: int, count: int) -> list[int]:
    """The steps of ``count`` checkpoints evenly spaced over the second half of a ``steps``-step
    run, its midpoint and last step included (one: the last alone). 300, 4 -> [150, 200, 250, 300]."""
    if count <= 1 or steps < 2:
        return [steps]
    span = steps // 2
    return sorted({steps - round(i * span / (count - 1)) for i in range(count)})


def second_half(records: list[dict]) -> list[dict]:
    """The evaluation records (``{"step", "metrics"}``) of a run's second half, judged from its last
    evaluated step; the records ``late_steps`` plans are exactly these."""
    if not records:
        return []
    last = max(r["step"] for r in records)
    return [r for r in records if r["step"] >= last - last // 2]


@dataclass(frozen=True)
class SweepContext:
    """What the sweep driver hands every trial and the evaluator pool (pickled across Ray)."""
    name: str
    layout: SweepLayout
    tracking_uri: str
    experiment_id: str
    parent_id: str
    scaling: TrialScaling
    max_failures: int
    evaluation: EvalPlan
    storage: Storage
    commit: str = "unknown"      # the driver's checkout (orchestrator.source), tagged on every run

    def trial(self, key: str) -> TrialLayout:
        return self.layout.trial(key)


@dataclass(frozen=True)
class TrialSpec:
    """One trial of the expanded sweep (orchestrator.sweeping.schema.Trial, as sent to Ray)."""
    key: str
    label: str
    overrides: dict
    config: dict

    def to_json(self) -> dict:
        return {"key": self.key, "label": self.label, "overrides": self.overrides, "config": self.config}

    @classmethod
    def from_json(cls, data: dict) -> "TrialSpec":
        return cls(key=data["key"], label=data["label"], overrides=data["overrides"], config=data["config"])
