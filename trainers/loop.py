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

from trainers import checkpoint as ckpt
from trainers.config import Config, config_hash
from trainers.diagnostics import decode_mse, mean_entropy, mean_top1
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
    """Callbacks out of the loop (a tracker plugs in here); all optional."""

    on_metrics: Optional[Callable[[int, dict], None]] = None
    on_checkpoint: Optional[Callable[[Path, dict], None]] = None
    on_grid: Optional[Callable[[Path, int], None]] = None


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
    tokens = sample_from_logits(z, g, cfg.generator.temperature)
    with torch.no_grad():
        images = ctx.teacher.decode_ids(tokens).float()
        soft = ctx.teacher.decode_probs(torch.softmax(z, dim=-1)).float()
        diagnostics = {"ema/entropy": float(mean_entropy(z)), "ema/top1": float(mean_top1(z)),
                       "ema/soft_hard_decode_mse": float(decode_mse(soft, images))}
        images = images.cpu()
    path = output_dir / "samples" / f"grid_step_{st.step:08d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(images, str(path), nrow=int(math.sqrt(cfg.train.grid_size)) or 8, padding=1)
    return path, diagnostics


def _check_finite(metrics: dict, step: int) -> None:
    bad = [k for k, v in metrics.items() if k.startswith("loss/") and not math.isfinite(v)]
    if bad:
        raise FloatingPointError(f"non-finite loss at step {step}: {', '.join(bad)} "
                                 "(the last good checkpoint is kept)")


def train(cfg: Config, resolved: dict, resume: bool = False, hooks: Hooks | None = None,
          ctx: TrainContext | None = None, progress: bool = True) -> TrainResult:
    """Run Soft-Di[M]O for ``cfg.train.steps`` iterations; ``resolved`` is cfg as a plain dict."""
    hooks = hooks or Hooks()
    output_dir = Path(cfg.output_dir).resolve()
    ctx = ctx or build_context(cfg, progress=progress)
    st = build_state(cfg, ctx)
    rhash = resume_hash(resolved)
    latest = ckpt.latest_checkpoint(output_dir) if resume else None
    if latest is not None:
        meta = ckpt.read_meta(latest)
        if meta.get("resume_hash") != rhash:
            raise ResumeError(f"{latest} was written with a different config; "
                             "use another output_dir or the same config to resume")
        ckpt.load_checkpoint(st, latest)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.json").write_text(json.dumps(resolved, indent=2, sort_keys=True))
    meta = {"config": resolved, "config_hash": config_hash(resolved), "resume_hash": rhash,
            "world_root": ctx.world_root, "teacher": cfg.teacher.kind}
    t = cfg.train
    last_ckpt, grid, metrics, diagnostics = latest, None, {}, {}
    bar = tqdm(total=t.steps, initial=st.step, desc="soft-dimo", unit="step", disable=not progress,
               dynamic_ncols=True)
    while st.step < t.steps:
        metrics = train_step(cfg, ctx, st)
        metrics["images_seen"] = st.images_seen
        _check_finite(metrics, st.step)
        if hooks.on_metrics and (st.step % t.log_every == 0 or st.step == t.steps):
            hooks.on_metrics(st.step, metrics)
        bar.update(1)
        bar.set_postfix({k.split("/")[-1]: f"{v:.3g}" for k, v in metrics.items()
                         if k in ("loss/dimo", "loss/auxiliary", "loss/gan_generator", "loss/reward")})
        if st.step % t.checkpoint_every == 0 or st.step == t.steps:
            last_ckpt = ckpt.save_checkpoint(st, output_dir, meta, keep=t.keep_checkpoints)
            if hooks.on_checkpoint:
                hooks.on_checkpoint(last_ckpt, {"step": st.step, "images_seen": st.images_seen})
        if (t.sample_every and st.step % t.sample_every == 0) or st.step == t.steps:
            grid, diagnostics = save_grid(cfg, ctx, st, output_dir)
            if hooks.on_metrics:
                hooks.on_metrics(st.step, diagnostics)
            if hooks.on_grid:
                hooks.on_grid(grid, st.step)
    bar.close()
    if last_ckpt is None:   # resumed at or past the final step: nothing left to do
        last_ckpt = ckpt.save_checkpoint(st, output_dir, meta, keep=t.keep_checkpoints)
    return TrainResult(output_dir=output_dir, checkpoint=last_ckpt, grid=grid, step=st.step,
                       metrics={**metrics, **diagnostics})
