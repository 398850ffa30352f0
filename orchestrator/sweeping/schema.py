"""The sweep file's typed schema (OmegaConf structured dataclasses: unknown keys are refused).

``orchestrator.sweeping.spec`` loads, validates and expands files of this shape into trials.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import MISSING

from evaluators.suite import EvalSettings
from orchestrator.sweeping.layout import SweepLayout, TrialSpec
from orchestrator.sweeping.storage import Storage
from trainers.config import TestTime


@dataclass
class SchedulerSection:
    type: str = "fifo"                   # fifo: run every trial to the end; asha: stop bad ones early
    grace_period: Optional[int] = None   # images seen before ASHA may stop a trial
    max_t: Optional[int] = None          # images seen at ASHA's last rung
    reduction_factor: float = 2.0


@dataclass
class ScalingSection:
    num_workers: int = 1                 # DDP ranks per trial; train.batch_size is per worker
    use_gpu: bool = False
    cpus_per_worker: Optional[float] = None   # None: share the cluster's cores out (orchestrator.sweeping.resources)
    gpus_per_worker: float = 1.0
    # custom Ray resources each worker needs, e.g. {node_b: 1} to pin a trial to the nodes that
    # advertise them (`ray start --resources='{"node_b": 1}'`); CPU and GPU come from the keys above
    resources_per_worker: Dict[str, float] = field(default_factory=dict)


@dataclass
class FailureSection:
    max_failures: int = 2                # Ray Train worker-group restarts per trial


@dataclass
class TrackingSection:
    uri: Optional[str] = None            # None: start a local MLflow server under output_dir/mlflow
    experiment: str = "softdimo"


@dataclass
class StorageSection:
    """For an ``s3://bucket/prefix`` output_dir (orchestrator.sweeping.storage). Credentials are
    not keys here: they come from each node's environment (the file is copied into sweep.json)."""
    endpoint_url: Optional[str] = None   # None: $AWS_ENDPOINT_URL_S3, $AWS_ENDPOINT_URL, else AWS
    region: Optional[str] = None         # None: $AWS_DEFAULT_REGION, $AWS_REGION
    scratch_dir: Optional[str] = None    # each node's working folder; None: <tmp>/softdimo-scratch


_EVAL = EvalSettings()      # the evaluation defaults live in evaluators.suite.EvalSettings alone


@dataclass
class EvaluationSection:
    """The evaluator pool: which metrics, on which checkpoints, with how many resident actors.

    The fields shared with ``evaluators.suite.EvalSettings`` take its defaults (``eval_settings``
    maps a section onto it); only the pool's own fields have their defaults here.
    """
    metrics: List[str] = field(default_factory=lambda: list(_EVAL.metrics))
    num_images: int = _EVAL.num_images
    every_images: int = 0                # 0: the final checkpoint only; else also every N images
    # K > 1: also K - 1 checkpoints evenly spaced over the second half of each run (late_steps);
    # one checkpoint of a short run is a noisy draw, the claims page judges on the late mean
    late_checkpoints: int = 1
    temperatures: List[float] = field(default_factory=lambda: list(_EVAL.temperatures))   # the best one is reported
    seed: int = _EVAL.seed
    actors: int = 1
    cpus_per_actor: float = 0.5          # logical CPUs; leaves a 2-core machine room for a trial
    gpus_per_actor: float = 0.0
    reference: Optional[str] = _EVAL.reference   # FID reference npz (mu, sigma[, arr_0]); default the ADM batch
    geneval_prompts_per_task: int = _EVAL.geneval_prompts_per_task   # GenEval-world: prompts per task (six tasks)
    images_per_prompt: int = _EVAL.images_per_prompt   # GenEval and GenEval-world: images per prompt
    weights: Dict[str, str] = field(default_factory=dict)   # weights key -> explicit local path
    # Best-of-N / TTEO: prompt-based metrics are also reported as eval/tts/<metric> (text-to-image)
    test_time: Optional[TestTime] = None


# EvaluationSection field -> EvalSettings field where the names differ (the sweep file says weights)
_RENAMED = {"weights": "paths"}
_POOL_ONLY = ("every_images", "late_checkpoints", "actors", "cpus_per_actor", "gpus_per_actor")


def eval_settings(section: EvaluationSection) -> EvalSettings:
    """The evaluators.suite.EvalSettings a sweep's evaluation section asks each evaluator for."""
    values = {}
    for f in fields(EvaluationSection):
        if f.name in _POOL_ONLY:
            continue
        value = getattr(section, f.name)
        if isinstance(value, (list, tuple)):
            value = list(value)
        elif isinstance(value, dict):
            value = dict(value)
        elif f.name == "test_time" and value is not None:
            value = asdict(value)
        values[_RENAMED.get(f.name, f.name)] = value
    return EvalSettings(**values)


@dataclass
class StudentSection:
    """The paper's two-stage recipe (Sec. 3, App. H): before the search, one Di[M]O student per
    distinct training seed of the trials (preset, base and command-line overrides, then these
    overrides, then that seed), trained by the same machinery; every search trial then starts
    from its seed's student (``init.checkpoint`` = the student's final checkpoint)."""
    overrides: Dict[str, Any] = field(default_factory=dict)   # dotted key -> value, e.g. gan.weight: 0


@dataclass
class SweepFile:
    name: str = MISSING
    preset: str = MISSING                # relative to the sweep file's folder, or absolute
    description: str = ""
    base: Dict[str, Any] = field(default_factory=dict)    # dotted key -> value, every trial
    search: Dict[str, Any] = field(default_factory=dict)  # dotted key -> {sampler: values}
    # named override sets ("arms" of a comparison), each crossed with the search: arm name ->
    # {dotted key: value}; empty: no arms
    arms: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    student: Optional[StudentSection] = None              # None: one stage, trials start afresh
    num_samples: int = 1
    search_seed: int = 0
    metric: str = "eval/world_fid"
    mode: str = "min"
    scheduler: SchedulerSection = field(default_factory=SchedulerSection)
    max_concurrent_trials: Optional[int] = None
    scaling: ScalingSection = field(default_factory=ScalingSection)
    failure: FailureSection = field(default_factory=FailureSection)
    tracking: TrackingSection = field(default_factory=TrackingSection)
    evaluation: EvaluationSection = field(default_factory=EvaluationSection)
    output_dir: str = "runs/sweeps"      # a folder (local or shared), or s3://bucket/prefix
    storage: StorageSection = field(default_factory=StorageSection)


def storage_of(file: SweepFile) -> Storage:
    s = file.storage
    return Storage.of(file.output_dir, s.endpoint_url, s.region, s.scratch_dir)


@dataclass
class Trial:
    key: str                             # "t000", "t001", ... in expansion order
    overrides: dict                      # search key -> the value this trial uses
    label: str                           # "gan.mask_range=[0.0, 0.5] seed=1", or "base"
    config: dict                         # the full resolved, validated training config

    def spec(self) -> TrialSpec:
        """What is sent to Ray for this trial (frozen)."""
        return TrialSpec(key=self.key, label=self.label, overrides=self.overrides, config=self.config)


@dataclass
class SweepSpec:
    source: str                          # the sweep file path as given
    file: SweepFile                      # after sweep.* overrides; output_dir absolute
    preset: str                          # absolute path of the preset
    trials: List[Trial]
    students: List[Trial] = field(default_factory=list)   # the first stage (student: section)

    def stages(self) -> List[List[Trial]]:
        """What runs, in order: the students (if any), then the search's trials."""
        return [self.students, self.trials] if self.students else [self.trials]

    @property
    def storage(self) -> Storage:
        return storage_of(self.file)

    @property
    def layout(self) -> SweepLayout:
        return SweepLayout.of(self.storage.local, self.file.name)

    @property
    def sweep_dir(self) -> Path:
        return self.layout.root

    def to_json(self) -> dict:
        return {"source": self.source, "name": self.file.name, "sweep_dir": str(self.sweep_dir),
                "preset": self.preset, "file": asdict(self.file),
                "trials": [asdict(trial) for trial in self.trials],
                "students": [asdict(trial) for trial in self.students]}
