"""Training state: what is frozen (teacher φ, tokenizer, rewards, data) and what learns (θ, EMA, ψ, η).

``build_context`` loads the frozen world for a config; ``build_state`` creates the trainable networks
from the teacher (θ and ψ are copies of φ with the embedding layer frozen), their optimizers with
Table 5's betas (discriminator β1 = 0) and a warm-up-then-constant learning-rate schedule.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from softdimo.math.reward import RewardFn
from softdimo.teachers.protocol import Teacher
from trainers import distributed as dist
from trainers.config import WORLD_KINDS, Config, ConfigValueError
from trainers.discriminator import DiscriminatorHeads



@dataclass
class DataSource:
    """Real tokens with their conditions (the data set D_d, and D_c through its conditions)."""

    tokens: Any                     # [N, L] long tensor, or trainers.shards.TokenShards (memory-mapped,
    #                                 indexed the same way); None: conditions only (no GAN)
    labels: torch.Tensor            # [N] long (class ids; -1 for text-to-image)
    captions: list                  # N strings (class names for class-to-image)
    prompts: list | None = None     # D_c of the Di[M]O loss when apart from the captions (data.prompts)

    def sample(self, batch: int, generator: torch.Generator) -> tuple[torch.Tensor | None, torch.Tensor, list]:
        """-> (tokens [B, L] or None, labels [B], prompts) drawn uniformly with replacement."""
        idx = torch.randint(0, self.labels.shape[0], (batch,), generator=generator,
                            device=generator.device)
        idx_cpu = idx.cpu()
        prompts = [self.captions[i] for i in idx_cpu.tolist()]
        tokens = None if self.tokens is None else self.tokens[idx_cpu].to(idx.device)
        return tokens, self.labels[idx_cpu].to(idx.device), prompts

    def sample_prompts(self, batch: int, generator: torch.Generator) -> list:
        """``batch`` prompts of the Di[M]O set drawn uniformly with replacement."""
        idx = torch.randint(0, len(self.prompts), (batch,), generator=generator, device=generator.device)
        return [self.prompts[i] for i in idx.cpu().tolist()]


@dataclass
class TrainContext:
    """Everything frozen that one training run needs."""

    teacher: Teacher
    data: DataSource
    rewards: dict                   # name -> RewardFn (images [B,3,H,W] in [0,1], prompts) -> [B]
    device: torch.device
    world: Any = None               # the loaded embedded world (its scorers, reference data)
    cache: dict = field(default_factory=dict)   # conditions encoded once (dimo.negative_prompt)

    @property
    def world_root(self) -> str:
        return str(self.world.root) if self.world is not None else ""

    def condition(self, labels: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        if self.teacher.conditioning == "class":
            return self.teacher.encode_condition(labels=labels.to(self.device))
        return self.teacher.encode_condition(prompts=list(prompts)).to(self.device)


@dataclass
class TrainState:
    generator: nn.Module            # θ
    ema: nn.Module                  # EMA of θ
    auxiliary: nn.Module            # ψ
    heads: DiscriminatorHeads       # η
    optimizers: dict                # "generator" | "auxiliary" | "discriminator" -> Optimizer
    schedulers: dict
    rng: torch.Generator
    step: int = 0
    images_seen: int = 0

    def modules(self) -> dict:
        return {"generator": self.generator, "ema": self.ema, "auxiliary": self.auxiliary,
                "discriminator": self.heads}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is available")
    return torch.device(name)


def build_context(cfg: Config, progress: bool = True,
                  reward_factory: Callable[[str, torch.device], RewardFn] | None = None,
                  rewards: bool = True) -> TrainContext:
    """Load (building if missing) the embedded world and wrap its teacher, data and rewards.

    Rewards other than the world's own (clip, quality) come from ``reward_factory(name, device)``
    (the orchestrator passes evaluators.networks.scorers.make_scorer: this layer does not import it).
    """
    from softdimo.world.store import load_world

    device = resolve_device(cfg.train.device)
    if cfg.teacher.kind not in WORLD_KINDS:
        from softdimo.teachers import load_teacher

        teacher = load_teacher(cfg.teacher.kind, cfg.teacher.paths, cfg.teacher.options, device)
        reward_fns = {term.name: make_reward(term.name, None, device, reward_factory)
                      for term in (cfg.reward.terms if rewards else [])}
        return TrainContext(teacher=teacher, data=real_data(cfg, teacher, device),
                            rewards=reward_fns, device=device)
    track = "c2i" if cfg.teacher.kind == "world_c2i" else "t2i"
    world = load_world(cfg.world.spec, cfg.world.cache_dir, build_if_missing=True, device=device,
                       progress=progress, needs=(track,))
    teacher = world.teacher(track)
    if cfg.data.tokens:                          # the world's images tokenized by orchestrator.tokenize
        data = shard_data(cfg.data.tokens, teacher, cfg.teacher.kind, None, device)
    else:
        wd = world.data(track)
        data = DataSource(tokens=wd.tokens.to(device), labels=wd.labels.to(device),
                          captions=list(wd.captions))
    reward_fns = {term.name: make_reward(term.name, world, device, reward_factory)
                  for term in (cfg.reward.terms if rewards else [])}  # sampling needs none
    return TrainContext(teacher=teacher, data=data, rewards=reward_fns, device=device, world=world)


def real_data(cfg: Config, teacher: Teacher, device: torch.device) -> DataSource:
    """D_d and D_c of a real teacher from ``data.tokens`` / ``data.captions`` (see DataSection)."""
    from pathlib import Path

    tokens, labels, captions, prompts = None, None, None, None
    for key in ("captions", "prompts"):
        name = getattr(cfg.data, key)
        if name:
            lines = [s.strip() for s in Path(name).read_text().splitlines() if s.strip()]
            if not lines:
                raise ConfigValueError(f"data.{key}", f"{name}: no prompts in the file")
            captions, prompts = (lines, prompts) if key == "captions" else (captions, lines)
    if cfg.data.tokens and cfg.data.tokens.endswith(".json"):
        data = shard_data(cfg.data.tokens, teacher, cfg.teacher.kind, captions, device)
        data.prompts = prompts
        return data
    if cfg.data.tokens:
        from softdimo.checkpoints import read_tensors

        stored = read_tensors(cfg.data.tokens)
        tokens = stored["tokens"].long().reshape(stored["tokens"].shape[0], -1)
        if tokens.shape[1] != teacher.seq_len or int(tokens.min()) < 0 or int(tokens.max()) >= teacher.V:
            raise ConfigValueError("data.tokens", f"{cfg.data.tokens}: tokens must be [N, {teacher.seq_len}] "
                                   f"ids in [0, {teacher.V}), got {list(tokens.shape)} in "
                                   f"[{int(tokens.min())}, {int(tokens.max())}]")
        if teacher.conditioning == "class":
            if "labels" not in stored:
                raise ConfigValueError("data.tokens", f"{cfg.data.tokens}: a class teacher needs 'labels' [N]")
            labels = stored["labels"].long()
        elif captions is not None and len(captions) != tokens.shape[0]:
            raise ConfigValueError("data.captions", f"{len(captions)} prompts for {tokens.shape[0]} token rows")
    if teacher.conditioning == "class":
        if labels is None:                       # no data: classes drawn uniformly
            labels = torch.arange(teacher.num_classes)
        captions = [f"class {int(i)}" for i in labels]
    else:
        labels = torch.full((len(captions),), -1, dtype=torch.long)
    return DataSource(tokens=None if tokens is None else tokens.to(device), labels=labels.to(device),
                      captions=captions, prompts=prompts)


def shard_data(manifest: str, teacher: Teacher, kind: str, prompts: list | None,
               device: torch.device) -> DataSource:
    """D_d from ``orchestrator.tokenize`` shards, memory-mapped (rows are read when sampled).

    Labels come from the shards (class teachers); captions (text teachers) from the manifest's
    captions.txt, or from ``data.captions`` when given (then one prompt per token row, in row order).
    """
    from trainers.shards import ShardError, TokenShards

    def family(k: str) -> str:
        return "world" if k.startswith("world_") else k

    try:
        shards = TokenShards.open(manifest)
    except ShardError as err:
        raise ConfigValueError("data.tokens", str(err)) from None
    m = shards.manifest
    lo, hi = shards.id_range()
    if family(m["teacher"]) != family(kind):
        raise ConfigValueError("data.tokens", f"{manifest}: tokens of a {m['teacher']} tokenizer, "
                               f"not of {kind}")
    if len(shards) == 0 or m["seq_len"] != teacher.seq_len or lo < 0 or hi >= teacher.V:
        raise ConfigValueError("data.tokens", f"{manifest}: tokens must be [N, {teacher.seq_len}] ids in "
                               f"[0, {teacher.V}), got [{len(shards)}, {m['seq_len']}] in [{lo}, {hi}]")
    if teacher.conditioning == "class":
        labels = shards.labels
        if int(labels.min()) < 0 or int(labels.max()) >= teacher.num_classes:
            raise ConfigValueError("data.tokens", f"{manifest}: a class teacher needs labels in "
                                   f"[0, {teacher.num_classes}); the shards hold [{int(labels.min())}, "
                                   f"{int(labels.max())}] (tokenize a class-folder layout)")
        captions = [f"class {int(i)}" for i in labels]
        return DataSource(tokens=shards, labels=labels.to(device), captions=captions)
    captions = prompts or shards.captions
    if not captions:
        raise ConfigValueError("data.captions", f"{manifest} has no captions: give data.captions")
    if prompts is None and any(not c for c in captions):
        raise ConfigValueError("data.tokens", f"{manifest}: some images have no caption")
    if prompts is not None and len(prompts) != len(shards):
        raise ConfigValueError("data.captions", f"{len(prompts)} prompts for {len(shards)} token rows")
    return DataSource(tokens=shards, labels=torch.full((len(captions),), -1, dtype=torch.long).to(device),
                      captions=list(captions))


def make_reward(name: str, world: Any, device: torch.device,
                reward_factory: Callable[[str, torch.device], RewardFn] | None = None) -> RewardFn:
    """The reward called ``name`` (trainers.config.REWARD_NAMES) as images, prompts -> [B]."""
    if name == "clip" and world is not None:
        return world.clip_score
    if name == "quality" and world is not None:
        return lambda images, prompts, q=world.quality: q(images)
    if reward_factory is None:
        raise ConfigValueError("reward.terms", f"{name!r} needs a scorer factory "
                               "(run through orchestrator.train or a sweep)")
    return reward_factory(name, device)   # without a world, "clip" is the real CLIP score


def _warmup(warmup_steps: int) -> Callable[[int], float]:
    return lambda k: min(1.0, (k + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def _optimizer(params, lr: float, betas: tuple, cfg: Config) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    kind = torch.optim.AdamW if cfg.train.optimizer == "adamw" else torch.optim.Adam
    return kind(params, lr=lr, betas=betas, eps=cfg.train.adam_eps,
                weight_decay=cfg.train.weight_decay)


def freeze(net: nn.Module, prefixes: Sequence[str]) -> nn.Module:
    """Freeze the parameters whose names start with any of ``prefixes`` (besides the input
    embedding that make_student froze): the Di[M]O MaskGit code also fixes ``bias`` and ``pos_emb``."""
    names = [name for name, _ in net.named_parameters()]
    for i, prefix in enumerate(prefixes):
        hits = [n for n in names if n == prefix or n.startswith(prefix + ".")]
        if not hits:
            raise ConfigValueError(f"generator.freeze.{i}", f"{prefix!r} names no parameter of the "
                                   f"student (e.g. {', '.join(names[:4])})")
        for name, p in net.named_parameters():
            if name in hits:
                p.requires_grad_(False)
    return net


def build_state(cfg: Config, ctx: TrainContext) -> TrainState:
    """Fresh θ, EMA, ψ (copies of φ) and η, with optimizers, schedules and the run's RNG."""
    torch.manual_seed(cfg.seed)   # module initialisation (η) and any global-RNG op are seeded too
    teacher = ctx.teacher
    generator = freeze(teacher.make_student(), cfg.generator.freeze).to(ctx.device)
    auxiliary = freeze(teacher.make_student(), cfg.generator.freeze).to(ctx.device)
    ema = copy.deepcopy(generator).requires_grad_(False).eval()
    depth = teacher.depth
    if cfg.gan.weight > 0 and any(not -depth <= i < depth for i in cfg.gan.layers):
        raise ConfigValueError("gan.layers", f"{list(cfg.gan.layers)} out of range for a teacher of "
                               f"{depth} blocks (use indices in [{-depth}, {depth - 1}])")
    heads = DiscriminatorHeads(teacher.hidden_width, teacher.feature_len, cfg.gan.layers,
                               cfg.gan.head_channels, cfg.gan.head_depth).to(ctx.device)
    t = cfg.train
    optimizers = {
        "generator": _optimizer(generator.parameters(), t.lr_generator, (0.9, 0.999), cfg),
        "auxiliary": _optimizer(auxiliary.parameters(), t.lr_auxiliary, (0.9, 0.999), cfg),
        "discriminator": _optimizer(heads.parameters(), t.lr_discriminator, (0.0, 0.999), cfg),
    }
    schedulers = {name: torch.optim.lr_scheduler.LambdaLR(opt, _warmup(t.warmup_steps))
                  for name, opt in optimizers.items()}
    # each data-parallel rank draws its own data, masks and noise; rank 0 keeps cfg.seed
    rng = torch.Generator(device=ctx.device).manual_seed(dist.rank_seed(cfg.seed))
    return TrainState(generator=generator, ema=ema, auxiliary=auxiliary, heads=heads,
                      optimizers=optimizers, schedulers=schedulers, rng=rng)
