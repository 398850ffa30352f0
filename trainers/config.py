"""The typed training configuration (OmegaConf structured dataclasses) and its value checks.

One schema for every teacher and every ablation: the sweeps vary these keys and nothing else. Type
and unknown-key errors come from OmegaConf; ``check_values`` adds the range checks. Both are turned
into one-line messages naming the file and the key by ``orchestrator.config``.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from softdimo.math import DIVERGENCES, EMBEDDING_KINDS, MASK_SCHEDULES   # names only; no torch
from softdimo.teachers import FAMILIES, TEACHER_KINDS, WORLD_KINDS   # the registry; imports no torch

WORLD_SPECS = ("full", "test")
# clip, quality: the embedded world's own scorers; the rest are the real networks of
# evaluators.networks.scorers, loaded from staged weights ($SOFTDIMO_WEIGHTS)
WORLD_REWARDS = ("clip", "quality")
REWARD_NAMES = WORLD_REWARDS + ("hps", "hps_v21", "pickscore", "imagereward")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")
OPTIMIZERS = ("adam", "adamw")


@dataclass
class WorldSection:
    spec: str = "full"                  # which embedded world: "full" (the real one) or "test" (tiny)
    cache_dir: Optional[str] = None     # default: $SOFTDIMO_CACHE or ~/.cache/softdimo


@dataclass
class TeacherSection:
    kind: str = "world_c2i"             # world_c2i | world_t2i | a real family (softdimo.teachers)
    paths: Dict[str, str] = field(default_factory=dict)    # real teachers: their local weight files
    options: Dict[str, Any] = field(default_factory=dict)  # real teachers: family options (sizes)


@dataclass
class DataSection:
    """The data sets of Algorithm 1 for real teachers (the embedded world brings its own)."""
    tokens: Optional[str] = None        # D_d: safetensors, "tokens" [N, L] ids (+ "labels" [N]), or the
    #                                     manifest.json of orchestrator.tokenize's shards (memory-mapped;
    #                                     also for the world kinds); the GAN's real side
    captions: Optional[str] = None      # prompts, one per line (text teachers; row i goes with tokens[i])
    # D_c for the Di[M]O loss when it differs from the GAN's captions (Sec. 4.1: LAION-Aesthetics-6+
    # prompts for Di[M]O, DALLE3-1M images and captions for the GAN); None: data.captions
    prompts: Optional[str] = None


@dataclass
class InitSection:
    """The paper's two-stage recipe (Sec. 3, App. H): Soft-Di[M]O fine-tunes a converged Di[M]O
    student. θ and its EMA both start from the other run's EMA weights (the paper fine-tunes
    Di[M]O's released one-step generator, its EMA model) and ψ from its ψ; η, the optimizers, the
    schedule and the step count start fresh, and so does the EMA's decay warm-up (ema.py), which
    starts at θ. (``init.checkpoint`` and not ``init.from``: ``from`` is a Python keyword.)"""
    checkpoint: Optional[str] = None    # a run folder (its newest checkpoint) or a step_* folder


@dataclass
class TrainSection:
    steps: int = 300
    batch_size: int = 32
    lr_generator: float = 1e-4
    lr_auxiliary: float = 1e-4
    lr_discriminator: float = 1e-4
    warmup_steps: int = 20
    optimizer: str = "adam"
    weight_decay: float = 0.0
    adam_eps: float = 1e-8
    grad_clip: float = 1.0              # θ and η (H.1: norm 1)
    aux_grad_clip: float = 1.0          # ψ; 0: no clipping (the Di[M]O code clips θ only)
    ema_decay: float = 0.9999
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 10
    sample_every: int = 0               # 0: a sample grid at the end only
    grid_size: int = 64
    device: str = "auto"
    precision: str = "auto"             # auto: bf16 autocast on GPU, fp32 on CPU


@dataclass
class EmbeddingSection:
    kind: str = "soft"                  # soft: E^T softmax(z/τ) (Eq. 3); gumbel_st: App. H.4
    temperature: float = 1.0            # τ


@dataclass
class DimoSection:
    weight: float = 1.0                 # of L_Di[M]O in Eq. 10; 0: no teacher, no ψ (Table 10)
    divergence: str = "fkl"
    beta: float = 0.0                   # Jeffreys mix (1-β)·FKL + β·RKL; may be negative
    teacher_cfg: float = 2.0            # u + w·(c - u), every family (docs/recipes.md, CFG)
    negative_prompt: Optional[str] = None   # text teachers: the teacher's "u" branch (Di[M]O Meissonic)
    teacher_dropout: bool = False       # φ in train mode (dropout on) for the Di[M]O targets
    aux_dropout: bool = False           # ψ in train mode when it scores x̃_t for θ's loss
    mask_schedule: str = "arccos"       # forward kernel for the generator loss
    aux_mask_schedule: str = "arccos"   # forward kernel for the auxiliary loss
    mask_clamp: Optional[List[float]] = None
    label_smoothing: float = 0.1
    soft_input: bool = False            # App. I.15: Di[M]O loss on masked soft embeddings


@dataclass
class GeneratorSection:
    init_mask_ratio: List[float] = field(default_factory=lambda: [0.6])  # [r] fixed or [a, b] = U[a, b]
    embed_noise: float = 0.1            # σ of the variance-preserving input-embedding noise
    temperature: float = 1.0            # sampling temperature of x_θ during training (H.1: 1)
    eval_temperature: Optional[float] = None    # generation/evaluation; None: temperature
    # the evaluation sweep (H.5); []: eval_temperature alone
    eval_temperatures: List[float] = field(default_factory=list)
    # parameter-name prefixes frozen in θ and ψ besides the input embedding (Di[M]O: bias, pos_emb)
    freeze: List[str] = field(default_factory=list)


@dataclass
class GanSection:
    weight: float = 0.0
    mask_range: List[float] = field(default_factory=lambda: [0.0, 0.5])
    start_step: int = 0                 # first step of the generator's GAN term (Fig. 9: 1000)
    discriminator_start_step: Optional[int] = None  # first step of η's updates; None: start_step
    layers: List[int] = field(default_factory=lambda: [1, -1])  # teacher blocks feeding the heads (-1: last)
    head_channels: int = 64             # width of each convolutional head (and of the final MLP)
    head_depth: int = 1                 # C→C convolutions per head after the input one
    feature_noise: float = 0.0          # Gaussian noise on teacher features (H.3, MaskGit runs)


@dataclass
class RewardTerm:
    name: str = "clip"
    weight: float = 1.0


@dataclass
class RewardSection:
    weight: float = 0.0
    terms: List[RewardTerm] = field(default_factory=list)


@dataclass
class Config:
    seed: int = 0
    output_dir: str = "runs/default"
    world: WorldSection = field(default_factory=WorldSection)
    teacher: TeacherSection = field(default_factory=TeacherSection)
    data: DataSection = field(default_factory=DataSection)
    init: InitSection = field(default_factory=InitSection)
    train: TrainSection = field(default_factory=TrainSection)
    embedding: EmbeddingSection = field(default_factory=EmbeddingSection)
    dimo: DimoSection = field(default_factory=DimoSection)
    generator: GeneratorSection = field(default_factory=GeneratorSection)
    gan: GanSection = field(default_factory=GanSection)
    reward: RewardSection = field(default_factory=RewardSection)


class ConfigValueError(ValueError):
    """A value outside its allowed range; ``key`` is the dotted path."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


def _choice(key: str, value: str, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigValueError(key, f"{value!r} is not one of {', '.join(allowed)}")


def _positive(key: str, value: float) -> None:
    if not value > 0:
        raise ConfigValueError(key, f"must be > 0, got {value}")


def _non_negative(key: str, value: float) -> None:
    if value < 0:
        raise ConfigValueError(key, f"must be >= 0, got {value}")


def _unit_range(key: str, values: List[float], lengths: tuple = (2,)) -> None:
    if len(values) not in lengths:
        raise ConfigValueError(key, f"needs {' or '.join(map(str, lengths))} values, got {len(values)}")
    if any(not 0.0 <= v <= 1.0 for v in values):
        raise ConfigValueError(key, f"values must lie in [0, 1], got {list(values)}")
    if len(values) == 2 and values[0] > values[1]:
        raise ConfigValueError(key, f"needs a <= b, got [{values[0]}, {values[1]}]")


def _check_teacher_and_data(cfg: Config) -> None:
    """What the world needs nothing of, and what a real teacher cannot run without."""
    kind, data = cfg.teacher.kind, cfg.data
    if kind in WORLD_KINDS:
        if kind == "world_c2i" and cfg.dimo.negative_prompt is not None:
            raise ConfigValueError("dimo.negative_prompt",
                                   "is for text-to-image teachers; world_c2i takes class labels")
        # data.tokens: a manifest of orchestrator.tokenize may replace the world's own tokens
        for key in ("teacher.paths", "teacher.options", "data.captions", "data.prompts"):
            section, name = key.split(".")
            if getattr(getattr(cfg, section), name):
                raise ConfigValueError(key, f"is for real teachers; {kind} brings its own")
        return
    family = FAMILIES[kind]
    if cfg.gan.weight > 0 and not data.tokens:
        raise ConfigValueError("data.tokens", f"the GAN (gan.weight {cfg.gan.weight:g}) needs real "
                               "tokens: a safetensors file with 'tokens' [N, L]")
    if family.conditioning == "text" and not data.captions and not str(data.tokens or "").endswith(".json"):
        raise ConfigValueError("data.captions", "a text-to-image teacher needs prompts (one per line, "
                               "or the captions of a token manifest in data.tokens)")
    if family.conditioning == "class":
        for key, value in (("data.prompts", data.prompts),
                           ("dimo.negative_prompt", cfg.dimo.negative_prompt)):
            if value is not None:
                raise ConfigValueError(key, f"is for text-to-image teachers; {kind} takes class labels")
    for i, term in enumerate(cfg.reward.terms):
        if term.name == "quality":
            raise ConfigValueError(f"reward.terms.{i}.name", "'quality' is the embedded world's "
                                   "reward; real teachers use imagereward, hps, hps_v21, pickscore, clip")


def eval_temperatures(g: GeneratorSection) -> List[float]:
    """The generation temperatures a run is evaluated at (H.5: a sweep for ImageNet checkpoints)."""
    if g.eval_temperatures:
        return list(g.eval_temperatures)
    return [g.eval_temperature if g.eval_temperature is not None else g.temperature]


def eval_temperature(g: GeneratorSection) -> float:
    """The one generation temperature of a run (sample grids, orchestrator.generate)."""
    return g.eval_temperature if g.eval_temperature is not None else g.temperature


def check_values(cfg: Config) -> None:
    """Range checks that the type system cannot express; raises ConfigValueError(key, message)."""
    _choice("world.spec", cfg.world.spec, WORLD_SPECS)
    _choice("teacher.kind", cfg.teacher.kind, TEACHER_KINDS)
    _check_teacher_and_data(cfg)
    t = cfg.train
    for key in ("steps", "batch_size", "checkpoint_every", "keep_checkpoints", "log_every", "grid_size"):
        _positive(f"train.{key}", getattr(t, key))
    for key in ("lr_generator", "lr_auxiliary", "lr_discriminator", "adam_eps", "grad_clip"):
        _positive(f"train.{key}", getattr(t, key))
    _non_negative("train.aux_grad_clip", t.aux_grad_clip)
    for key in ("warmup_steps", "weight_decay", "sample_every"):
        _non_negative(f"train.{key}", getattr(t, key))
    if not 0.0 <= t.ema_decay < 1.0:
        raise ConfigValueError("train.ema_decay", f"must lie in [0, 1), got {t.ema_decay}")
    _choice("train.optimizer", t.optimizer, OPTIMIZERS)
    _choice("train.device", t.device, DEVICES)
    _choice("train.precision", t.precision, PRECISIONS)
    _choice("embedding.kind", cfg.embedding.kind, EMBEDDING_KINDS)
    _positive("embedding.temperature", cfg.embedding.temperature)
    d = cfg.dimo
    _choice("dimo.divergence", d.divergence, DIVERGENCES)
    _choice("dimo.mask_schedule", d.mask_schedule, MASK_SCHEDULES)
    _choice("dimo.aux_mask_schedule", d.aux_mask_schedule, MASK_SCHEDULES)
    _non_negative("dimo.teacher_cfg", d.teacher_cfg)
    _non_negative("dimo.weight", d.weight)
    if d.mask_clamp is not None:
        _unit_range("dimo.mask_clamp", d.mask_clamp)
    if not 0.0 <= d.label_smoothing < 1.0:
        raise ConfigValueError("dimo.label_smoothing", f"must lie in [0, 1), got {d.label_smoothing}")
    g = cfg.generator
    _unit_range("generator.init_mask_ratio", g.init_mask_ratio, lengths=(1, 2))
    if not 0.0 <= g.embed_noise < 1.0:
        raise ConfigValueError("generator.embed_noise", f"must lie in [0, 1), got {g.embed_noise}")
    _positive("generator.temperature", g.temperature)
    if g.eval_temperature is not None:
        _positive("generator.eval_temperature", g.eval_temperature)
    for i, value in enumerate(g.eval_temperatures):
        _positive(f"generator.eval_temperatures.{i}", value)
    _non_negative("gan.weight", cfg.gan.weight)
    _unit_range("gan.mask_range", cfg.gan.mask_range)
    _non_negative("gan.start_step", cfg.gan.start_step)
    if cfg.gan.discriminator_start_step is not None:
        _non_negative("gan.discriminator_start_step", cfg.gan.discriminator_start_step)
    _positive("gan.head_depth", cfg.gan.head_depth)
    _non_negative("gan.feature_noise", cfg.gan.feature_noise)
    _positive("gan.head_channels", cfg.gan.head_channels)
    if not 1 <= len(cfg.gan.layers) <= 8:    # Table 5: 4 heads (MaskGit, MaskBit), 6 (MaskGen)
        raise ConfigValueError("gan.layers", f"needs 1 to 8 teacher layers, got {len(cfg.gan.layers)}")
    _non_negative("reward.weight", cfg.reward.weight)
    if d.weight == 0 and cfg.gan.weight == 0 and cfg.reward.weight == 0:
        raise ConfigValueError("dimo.weight", "0 with no GAN and no reward leaves nothing to train")
    for i, term in enumerate(cfg.reward.terms):
        _choice(f"reward.terms.{i}.name", term.name, REWARD_NAMES)
        _non_negative(f"reward.terms.{i}.weight", term.weight)
    if cfg.reward.weight > 0 and not cfg.reward.terms:
        raise ConfigValueError("reward.terms", "reward.weight > 0 needs at least one term")


@dataclass
class TestTime:
    """Test-time scaling settings (the generate CLI, the evaluator pool and sweep files share them)."""
    __test__ = False                     # not a pytest class, whatever its name

    bon: int = 4                         # N: starts per prompt (Best-of-N)
    iters: int = 0                       # K: TTEO iterations (K − 1 SGD steps); 0 or 1 = Best-of-N
    lr: float = 0.2                      # SGD learning rate (paper: 0.2, no gradient clipping)
    rewards: Dict[str, float] = field(default_factory=dict)  # optimised; {}: the run's reward.terms
    select: Dict[str, float] = field(default_factory=dict)   # selection; {}: the four (world: 2)
    batch: int = 64                      # images per batch: prompts × N (at least one prompt)


def check_test_time(tt: TestTime, prefix: str = "") -> None:
    """ConfigValueError naming the offending field (``prefix`` + field) for the CLIs and sweeps."""
    if tt.bon < 1:
        raise ConfigValueError(prefix + "bon", f"must be >= 1, got {tt.bon}")
    if tt.iters < 0:
        raise ConfigValueError(prefix + "iters", f"must be >= 0, got {tt.iters}")
    if not tt.lr > 0:
        raise ConfigValueError(prefix + "lr", f"must be > 0, got {tt.lr}")
    if tt.batch < 1:
        raise ConfigValueError(prefix + "batch", f"must be >= 1, got {tt.batch}")
    for key in ("rewards", "select"):
        for name, weight in getattr(tt, key).items():
            if name not in REWARD_NAMES:
                raise ConfigValueError(prefix + key, f"unknown reward {name!r}; known: "
                                       f"{', '.join(REWARD_NAMES)}")
            if weight < 0:
                raise ConfigValueError(prefix + key, f"weight of {name!r} must be >= 0, got {weight}")
        if getattr(tt, key) and not any(w > 0 for w in getattr(tt, key).values()):
            raise ConfigValueError(prefix + key, "needs at least one reward with a positive weight")


def config_hash(resolved: dict) -> str:
    """A short content hash of a resolved config (plain dict), recorded in every checkpoint."""
    text = json.dumps(resolved, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
