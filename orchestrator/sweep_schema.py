"""The sweep file's typed schema (OmegaConf structured dataclasses: unknown keys are refused).

``orchestrator.sweep_config`` loads, validates and expands files of this shape into trials.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import MISSING

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
    cpus_per_worker: Optional[float] = None   # None: share the cluster's cores out (sweep.plan_resources)
    gpus_per_worker: float = 1.0


@dataclass
class FailureSection:
    max_failures: int = 2                # Ray Train worker-group restarts per trial


@dataclass
class TrackingSection:
    uri: Optional[str] = None            # None: start a local MLflow server under output_dir/mlflow
    experiment: str = "softdimo"


@dataclass
class EvaluationSection:
    """The evaluator pool: which metrics, on which checkpoints, with how many resident actors."""
    metrics: List[str] = field(default_factory=lambda: ["world_fid"])
    num_images: int = 500
    every_images: int = 0                # 0: the final checkpoint only; else also every N images
    temperatures: List[float] = field(default_factory=lambda: [1.0])   # the best one is reported
    seed: int = 0
    actors: int = 1
    cpus_per_actor: float = 0.5          # logical CPUs; leaves a 2-core machine room for a trial
    gpus_per_actor: float = 0.0
    reference: Optional[str] = None      # FID reference npz (mu, sigma[, arr_0]); default the ADM batch
    geneval_prompts_per_task: int = 8    # GenEval-world: prompts per task (six tasks)
    images_per_prompt: int = 4           # GenEval and GenEval-world: images per prompt
    weights: Dict[str, str] = field(default_factory=dict)   # weights key -> explicit local path
    # Best-of-N / TTEO: prompt-based metrics are also reported as eval/tts/<metric> (text-to-image)
    test_time: Optional[TestTime] = None


@dataclass
class SweepFile:
    name: str = MISSING
    preset: str = MISSING                # relative to the sweep file's folder, or absolute
    description: str = ""
    base: Dict[str, Any] = field(default_factory=dict)    # dotted key -> value, every trial
    search: Dict[str, Any] = field(default_factory=dict)  # dotted key -> {sampler: values}
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
    output_dir: str = "runs/sweeps"


@dataclass
class Trial:
    key: str                             # "t000", "t001", ... in expansion order
    overrides: dict                      # search key -> the value this trial uses
    label: str                           # "gan.mask_range=[0.0, 0.5] seed=1", or "base"
    config: dict                         # the full resolved, validated training config


@dataclass
class SweepSpec:
    source: str                          # the sweep file path as given
    file: SweepFile                      # after sweep.* overrides; output_dir absolute
    preset: str                          # absolute path of the preset
    trials: List[Trial]

    @property
    def sweep_dir(self) -> Path:
        return Path(self.file.output_dir) / self.file.name

    def to_json(self) -> dict:
        return {"source": self.source, "name": self.file.name, "sweep_dir": str(self.sweep_dir),
                "preset": self.preset, "file": asdict(self.file),
                "trials": [asdict(trial) for trial in self.trials]}
