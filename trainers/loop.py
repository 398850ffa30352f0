"""The training loop: a plain function of a config, so that Ray Train can run it unchanged.

``train(cfg)`` builds (or resumes) the state, runs Algorithm 1 for ``train.steps`` iterations with a
progress bar, checkpoints atomically every ``train.checkpoint_every`` steps and at the end, writes
sample grids from the EMA weights, and reports through ``hooks`` (metrics, checkpoints) so that
trackers stay outside the maths.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from softdimo.math.diagnostics import decode_mse, mean_entropy, mean_top1
from trainers import checkpoint as ckpt
from trainers import distributed as dist
from trainers.config import Config, ConfigValueError, config_hash, eval_temperature
from trainers.sampling import grid_conditions, one_step_logits, sample_from_logits
from trainers.state import TrainContext, TrainState, build_context, build_state
from trainers.steps import train_step

# Keys that may change between a run and its resumption without changing what is computed.
RESUME_FREE_KEYS = ("output_dir", "train.steps", "train.checkpoint_every", "train.keep_checkpoints",
                    "train.log_every", "train.sample_every", "train.grid_size")


class ResumeError(ValueError):
    """The checkpoint in output_dir was written by a run with another config."""


@dataclass
class Hooks:
    """Callbacks out of the loop (a tracker or Ray Train plugs in here), and the steps the caller
    wants checkpointed besides ``train.checkpoint_every``'s; all optional.

    ``on_metrics``, ``on_checkpoint`` and ``on_grid`` run on rank 0 only. ``report`` runs on every
    rank at the same steps (each log step and each checkpoint step) with the rank-averaged metrics
    and, on rank 0 at checkpoint steps, the checkpoint just written, so it may hold a collective
    (``ray.train.report`` is one).
    """

    on_metrics: Optional[Callable[[int, dict], None]] = None
    on_checkpoint: Optional[Callable[[Path, dict], None]] = None
    on_grid: Optional[Callable[[Path, int], None]] = None
    report: Optional[Callable[[int, dict, Optional[Path]], None]] = None
    checkpoint_at: frozenset = frozenset()   # steps checkpointed besides checkpoint_every's (evaluations)


@dataclass
class TrainResult:
    output_dir: Path
    checkpoint: Path
    grid: Optional[Path]
    step: int
    metrics: dict = field(default_factory=dict)


def resume_hash(resolved: dict) -> str:
    pruned = json.loads(json.dumps(resolved))
    for dotted in RESUME_FREE_KEYS:
        node = pruned
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.get(p, {})
        node.pop(leaf, None)
    return config_hash(pruned)


def class_names(ctx: TrainContext) -> list:
    """Caption of each class id (class-to-image), in id order."""
    names = {}
    for label, caption in zip(ctx.data.labels.tolist(), ctx.data.captions):
        names.setdefault(label, caption)
    return [names[i] for i in sorted(k for k in names if k >= 0)]


def save_grid(cfg: Config, ctx: TrainContext, st: TrainState, output_dir: Path) -> tuple[Path, dict]:
    """A grid of one-step EMA samples with fixed conditions and a fixed seed (own RNG).

    Also returns diagnostics of those samples: entropy, top-1 probability and the mean squared error
    between images decoded from soft embeddings and from the sampled tokens (App. I.2).
    """
    from torchvision.utils import save_image

    g = torch.Generator(device=ctx.device).manual_seed(cfg.seed + 12345)
    names = class_names(ctx)
    captions = names if ctx.teacher.conditioning == "class" else ctx.data.captions
    cond, _ = grid_conditions(ctx.teacher, cfg.train.grid_size, max(len(names), 1), captions, ctx.device)
    z = one_step_logits(ctx.teacher, st.ema, cond, g, cfg.generator.init_mask_ratio,
                        cfg.generator.embed_noise)
    tokens = sample_from_logits(z, g, eval_temperature(cfg.generator))   # generation, not training
    with torch.no_grad():
        images = ctx.teacher.decode_ids(tokens, cond).float()
        soft = ctx.teacher.decode_probs(torch.softmax(z, dim=-1), cond).float()
        diagnostics = {"ema/entropy": float(mean_entropy(z)), "ema/top1": float(mean_top1(z)),
                       "ema/soft_hard_decode_mse": float(decode_mse(soft, images))}
        images = images.cpu()
    path = output_dir / "samples" / f"grid_step_{st.step:08d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(images, str(path), nrow=int(math.sqrt(cfg.train.grid_size)) or 8, padding=1)
    return path, diagnostics


def _check_finite(metrics: dict, step: int, device: torch.device) -> None:
    """Raise on every rank at once when any rank saw a non-finite loss (no rank is left waiting)."""
    bad = [k for k, v in metrics.items() if k.startswith("loss/") and not math.isfinite(v)]
    if dist.any_rank(bool(bad), device):
        where = ", ".join(bad) if bad else "on another rank"
        raise FloatingPointError(f"non-finite loss at step {step}: {where} "
                                 "(the last good checkpoint is kept)")


def _restore(st: TrainState, path: Path, rhash: str) -> None:
    meta = ckpt.read_meta(path)
    if meta.get("resume_hash") != rhash:
        raise ResumeError(f"{path} was written with a different config; "
                          "use another output_dir or the same config to resume")
    ckpt.load_checkpoint(st, path)


def train(cfg: Config, resolved: dict, resume: bool = False, hooks: Hooks | None = None,
          ctx: TrainContext | None = None, progress: bool = True,
          resume_from: Path | None = None) -> TrainResult:
    """Run Soft-Di[M]O for ``cfg.train.steps`` iterations; ``resolved`` is cfg as a plain dict.

    ``resume`` continues from the newest checkpoint in output_dir, ``resume_from`` from a given
    checkpoint directory (Ray Train hands one over after a restart). Under ``torch.distributed``
    every rank calls this; rank 0 alone writes files and calls the rank-0 hooks.
    """
    hooks = hooks or Hooks()
    main = dist.is_main()
    output_dir = Path(cfg.output_dir).resolve()
    ctx = ctx or build_context(cfg, progress=progress and main)
    st = build_state(cfg, ctx)
    rhash = resume_hash(resolved)
    latest = Path(resume_from) if resume_from else (ckpt.latest_good_checkpoint(output_dir) if resume else None)
    if resume and latest is None and ckpt.list_checkpoints(output_dir):
        raise ResumeError(f"no checkpoint in {output_dir / 'checkpoints'} verifies; "
                          "use another output_dir or start afresh without --resume")
    init = None
    if latest is not None:
        _restore(st, latest, rhash)
        init = ckpt.read_meta(latest).get("init_from")
    elif cfg.init.checkpoint:      # a resumed run continues from its own checkpoint instead
        try:
            init = ckpt.init_from(st, Path(cfg.init.checkpoint).expanduser(), cfg.teacher.kind,
                                  cfg.world.spec)
        except (FileNotFoundError, ValueError) as err:
            raise ConfigValueError("init.checkpoint", str(err).removeprefix("init.checkpoint: ")) from None
    for module in st.modules().values():
        dist.broadcast_module(module)
    if main:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.json").write_text(json.dumps(resolved, indent=2, sort_keys=True))
    meta = {"config": resolved, "config_hash": config_hash(resolved), "resume_hash": rhash,
            "world_root": ctx.world_root, "teacher": cfg.teacher.kind,
            "world_size": dist.world_size(), **({"init_from": init} if init else {})}
    t = cfg.train
    last_ckpt, grid, metrics, diagnostics = latest, None, {}, {}
    wrote_any = latest is not None     # the same on every rank (only rank 0 gets paths back)
    bar = tqdm(total=t.steps, initial=st.step, desc="soft-dimo", unit="step",
               disable=not (progress and main), dynamic_ncols=True)
    while st.step < t.steps:
        try:
            metrics = train_step(cfg, ctx, st)
        except FloatingPointError as err:
            raise FloatingPointError(f"step {st.step + 1}: {err}") from None
        metrics["images_seen"] = st.images_seen
        _check_finite(metrics, st.step, ctx.device)
        save_now = (st.step % t.checkpoint_every == 0 or st.step == t.steps
                    or st.step in hooks.checkpoint_at)
        log_now = st.step % t.log_every == 0 or st.step == t.steps
        if log_now or save_now:
            metrics = dist.mean_metrics(metrics, ctx.device)
        if main and hooks.on_metrics and log_now:
            hooks.on_metrics(st.step, metrics)
        bar.update(1)
        bar.set_postfix({k.split("/")[-1]: f"{v:.3g}" for k, v in metrics.items()
                         if k in ("loss/dimo", "loss/auxiliary", "loss/gan_generator", "loss/reward")})
        saved = None
        if save_now:
            saved = ckpt.save_checkpoint(st, output_dir, meta, keep=t.keep_checkpoints,
                                         rng_states=ckpt.rank_rng_states(st))
            last_ckpt = saved or last_ckpt
            wrote_any = True
            if saved is not None and hooks.on_checkpoint:
                hooks.on_checkpoint(saved, {"step": st.step, "images_seen": st.images_seen})
        if main and ((t.sample_every and st.step % t.sample_every == 0) or st.step == t.steps):
            grid, diagnostics = save_grid(cfg, ctx, st, output_dir)
            if hooks.on_metrics:
                hooks.on_metrics(st.step, diagnostics)
            if hooks.on_grid:
                hooks.on_grid(grid, st.step)
        if hooks.report and (log_now or save_now):
            hooks.report(st.step, metrics, saved)
    bar.close()
    if not wrote_any:   # resumed at or past the final step: nothing left to do
        last_ckpt = ckpt.save_checkpoint(st, output_dir, meta, keep=t.keep_checkpoints,
                                         rng_states=ckpt.rank_rng_states(st))
    final = {**metrics, **diagnostics}
    if dist.active():
        final["ddp/world_size"] = float(dist.world_size())
        final["ddp/max_param_spread"] = dist.max_parameter_spread(
            [st.generator, st.ema, st.auxiliary, st.heads], ctx.device)
    return TrainResult(output_dir=output_dir, checkpoint=last_ckpt, grid=grid, step=st.step,
                       metrics=final)
