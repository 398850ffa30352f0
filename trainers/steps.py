"""The three updates of one Soft-Di[M]O iteration, in Algorithm 1's order.

1. ``generator_step``: Di[M]O surrogate (+ GAN, + reward when their weights are on) on θ.
2. ``auxiliary_step``: masked cross-entropy of ψ on fresh, re-masked student samples.
3. ``discriminator_step``: Eq. 7 on real tokens and the generator step's detached soft embeddings,
   with the same augmentation mask for both.

Each returns a dict of float metrics. A loss whose weight is zero (or whose start step has not come)
runs no forward pass at all.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from softdimo.math import dimo, gan, masking, reward, soft_embedding
from softdimo.math.diagnostics import mean_entropy, mean_top1
from softdimo.math.ema import ema_decay, ema_update_
from trainers import distributed as dist
from trainers.config import Config
from trainers.discriminator import discriminate
from trainers.sampling import sample_from_logits
from trainers.state import TrainContext, TrainState


def autocast(ctx: TrainContext, cfg: Config):
    """bf16 autocast on GPU (weights stay fp32); plain fp32 on the CPU unless asked otherwise."""
    precision = cfg.train.precision
    if precision == "auto":
        precision = "bf16" if ctx.device.type == "cuda" else "fp32"
    if precision == "bf16":
        return torch.autocast(ctx.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def generator_logits(ctx: TrainContext, net: nn.Module, x_init: torch.Tensor, cond: torch.Tensor,
                     sigma: float, generator: torch.Generator) -> torch.Tensor:
    """z_θ = G_θ(x_init, c): frozen input embeddings, VP noise σ, then the backbone. [B, L, V]."""
    e = masking.embed_noise(ctx.teacher.embed_ids(x_init), sigma, generator)
    return ctx.teacher.forward_embeddings(net, e, cond)[0]


def draw_student(cfg: Config, ctx: TrainContext, net: nn.Module, cond: torch.Tensor,
                 generator: torch.Generator, r_init: float) -> torch.Tensor:
    """Sample x_init ~ p_init at mask ratio ``r_init`` and return the student's logits z_θ [B, L, V]."""
    t = ctx.teacher
    x_init = masking.sample_init(cond.shape[0], t.seq_len, t.V, t.mask_id, r_init, generator,
                                 device=ctx.device)
    z = generator_logits(ctx, net, x_init, cond, cfg.generator.embed_noise, generator)
    # Diverged weights show here first, and sampling tokens from them would fail with an obscure
    # error; decided on all ranks at once so that none is left waiting in a collective.
    if dist.any_rank(not bool(torch.isfinite(z.detach()).all()), z.device):
        raise FloatingPointError("non-finite generator logits: the weights diverged "
                                 "(the last good checkpoint is kept)")
    return z


def _teacher_with_cfg(cfg: Config, ctx: TrainContext, e_t: torch.Tensor, cond: torch.Tensor):
    """Teacher logits u + w·(c − u) on x̃_t; "u" is the null condition, or the encoded
    ``dimo.negative_prompt`` (Di[M]O's Meissonic run). φ runs in train mode (dropout on) when
    ``dimo.teacher_dropout`` is set, as the Di[M]O MaskGit code does."""
    t, w = ctx.teacher, cfg.dimo.teacher_cfg
    t.backbone.train(cfg.dimo.teacher_dropout)
    try:
        if w == 1.0:
            return t.forward_embeddings(t.backbone, e_t, cond)[0]
        b = cond.shape[0]
        if cfg.dimo.negative_prompt is not None:    # encoded once, [1, ...] expanded to the batch
            key = ("negative_prompt", cfg.dimo.negative_prompt)
            if key not in ctx.cache:
                ctx.cache[key] = t.encode_condition(prompts=[cfg.dimo.negative_prompt]).to(cond.device)
            null = ctx.cache[key].expand(b, *ctx.cache[key].shape[1:])
        else:
            null = t.null_condition(b)
        both = t.forward_embeddings(t.backbone, torch.cat([e_t, e_t]), torch.cat([cond, null]))[0]
        c, u = both.chunk(2)
        return dimo.cfg_combine(u, c, w)
    finally:
        t.backbone.eval()


def _dimo_inputs(cfg: Config, ctx: TrainContext, z: torch.Tensor, g: torch.Generator):
    """The re-masked intermediate state x̃_t as input embeddings, and its mask [B, L]."""
    t, d = ctx.teacher, cfg.dimo
    clamp = tuple(d.mask_clamp) if d.mask_clamp else None
    if d.soft_input:
        # App. I.15: masked soft embeddings instead of sampled tokens; no gradient through them.
        ratio = masking.sample_mask_ratio(z.shape[0], d.mask_schedule, g, clamp, device=z.device)
        mask = masking.exact_count_mask(ratio, t.seq_len, g)
        e = t.embed_probs(soft_embedding.soft_probs(z.detach().float(), 1.0))
        return gan.mask_embeddings(e, mask, t.mask_embedding()), mask
    x_theta = sample_from_logits(z.detach(), g, cfg.generator.temperature)
    x_t, mask = masking.forward_mask(x_theta, d.mask_schedule, t.mask_id, g, clamp)
    return t.embed_ids(x_t), mask


def relaxed(cfg: Config, z: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return soft_embedding.relaxed_probs(z.float(), cfg.embedding.kind, cfg.embedding.temperature, g)


def _update(st: TrainState, name: str, module: nn.Module, loss: torch.Tensor, clip: float) -> float:
    """Backward, clip the gradient norm (clip 0: measured, not clipped), optimizer and LR-schedule
    step; returns the norm."""
    opt = st.optimizers[name]
    opt.zero_grad(set_to_none=True)
    loss.backward()
    dist.average_gradients(module)   # data parallelism: the mean gradient over ranks, as DDP
    grad_norm = nn.utils.clip_grad_norm_(module.parameters(), clip if clip > 0 else float("inf"))
    opt.step()
    st.schedulers[name].step()
    return float(grad_norm)


def _gan_active(cfg: Config, step: int) -> tuple[bool, bool]:
    """(the generator's GAN term is on, η trains) at ``step``: Fig. 9/12 train η for 1000 steps
    before its loss reaches θ (gan.discriminator_start_step 0, gan.start_step 1000)."""
    on, g = cfg.gan.weight > 0, cfg.gan
    disc = g.start_step if g.discriminator_start_step is None else g.discriminator_start_step
    return on and step >= g.start_step, on and step >= disc


def _dimo_loss(cfg: Config, ctx: TrainContext, st: TrainState, z: torch.Tensor, cond: torch.Tensor):
    """L_Di[M]O's surrogate on z [B, L, V] and its metrics (no forward pass at dimo.weight 0)."""
    if cfg.dimo.weight == 0:
        return z.sum() * 0.0, {}    # keeps a graph: the GAN term may not have started yet
    g, t = st.rng, ctx.teacher
    with torch.no_grad():
        e_t, mask = _dimo_inputs(cfg, ctx, z, g)
        l_phi = _teacher_with_cfg(cfg, ctx, e_t, cond)
        st.auxiliary.train(cfg.dimo.aux_dropout)
        l_psi = t.forward_embeddings(st.auxiliary, e_t, cond)[0]
        grad = dimo.divergence_grad(l_phi.float(), l_psi.float(), cfg.dimo.divergence, cfg.dimo.beta)
        kl = dimo.masked_kl(l_phi.float(), l_psi.float(), mask)
    loss = dimo.dimo_surrogate(z, grad, mask)
    return loss, {"loss/dimo": loss.item(), "diag/mask_ratio": float(mask.float().mean()),
                  "diag/teacher_aux_kl": float(kl)}


def generator_step(cfg: Config, ctx: TrainContext, st: TrainState, cond: torch.Tensor,
                   prompts: list, r_init: float, gan_cond: torch.Tensor | None = None
                   ) -> tuple[dict, torch.Tensor]:
    """One θ update (Algorithm 1, lines 3-18). Returns metrics and the detached relaxed probs
    that η's step takes as fakes (None when η does not train).

    ``gan_cond``: the real batch's conditions when the Di[M]O prompts (``cond``) come from another
    set (data.prompts); the GAN's fakes are then drawn for them in a second pass, so that real and
    fake share their prompts (H.3).
    """
    g, t = st.rng, ctx.teacher
    use_gan, train_disc = _gan_active(cfg, st.step)
    use_reward = cfg.reward.weight > 0
    st.generator.train()
    with autocast(ctx, cfg):
        z = draw_student(cfg, ctx, st.generator, cond, g, r_init).float()
        loss_dimo, metrics = _dimo_loss(cfg, ctx, st, z, cond)
        separate = gan_cond is not None and (use_gan or train_disc)
        probs = relaxed(cfg, z, g) if (use_reward or ((use_gan or train_disc) and not separate)) else None
        gan_probs = probs
        if separate:        # no graph while only η needs these fakes
            with torch.set_grad_enabled(use_gan):
                z_gan = draw_student(cfg, ctx, st.generator, gan_cond, g, r_init).float()
                gan_probs = relaxed(cfg, z_gan, g)
        loss_gan = loss_reward = None
        scores = {}
        if use_gan:
            gmask, r = gan.gan_mask(z.shape[0], t.seq_len, cfg.gan.mask_range, g, device=z.device)
            e_fake = gan.mask_embeddings(t.embed_probs(gan_probs), gmask, t.mask_embedding())
            d_fake = discriminate(t, st.heads, e_fake, gan_cond if separate else cond, r,
                                  cfg.gan.feature_noise, g)
            loss_gan = gan.generator_gan_loss(d_fake.float())
        if use_reward:
            images = t.decode_probs(probs, cond)
            scores = {term.name: ctx.rewards[term.name](images, prompts).float()
                      for term in cfg.reward.terms}
            weights = {term.name: term.weight for term in cfg.reward.terms}
            loss_reward = reward.reward_loss(scores, weights)
        scaled = loss_dimo if cfg.dimo.weight == 1 else cfg.dimo.weight * loss_dimo
        loss = dimo.total_loss(scaled, loss_gan, loss_reward, cfg.gan.weight, cfg.reward.weight)
    grad_norm = _update(st, "generator", st.generator, loss, cfg.train.grad_clip)
    ema_update_(st.ema, st.generator, ema_decay(st.step, cfg.train.ema_decay))
    with torch.no_grad():
        metrics.update({"loss/total": loss.item(), "grad_norm/generator": float(grad_norm),
                        "diag/entropy": float(mean_entropy(z)), "diag/top1": float(mean_top1(z))})
        if loss_gan is not None:
            metrics["loss/gan_generator"] = loss_gan.item()
        if loss_reward is not None:
            metrics["loss/reward"] = loss_reward.item()
            metrics.update({f"reward/{k}": float(v.mean()) for k, v in scores.items()})
    return metrics, (gan_probs.detach() if train_disc else None)


def auxiliary_step(cfg: Config, ctx: TrainContext, st: TrainState, cond: torch.Tensor,
                   r_init: float) -> dict:
    """One ψ update (lines 19-21): CE on masked positions of fresh student samples."""
    g, t = st.rng, ctx.teacher
    clamp = tuple(cfg.dimo.mask_clamp) if cfg.dimo.mask_clamp else None
    with autocast(ctx, cfg):
        with torch.no_grad():
            z = draw_student(cfg, ctx, st.generator, cond, g, r_init)
            x_theta = sample_from_logits(z.detach(), g, cfg.generator.temperature)
            x_t, mask = masking.forward_mask(x_theta, cfg.dimo.aux_mask_schedule, t.mask_id, g, clamp)
        st.auxiliary.train()
        logits = t.forward_embeddings(st.auxiliary, t.embed_ids(x_t), cond)[0]
        loss = dimo.aux_loss(logits.float(), x_theta, mask, cfg.dimo.label_smoothing)
    grad_norm = _update(st, "auxiliary", st.auxiliary, loss, cfg.train.aux_grad_clip)
    return {"loss/auxiliary": loss.item(), "grad_norm/auxiliary": float(grad_norm)}


def discriminator_step(cfg: Config, ctx: TrainContext, st: TrainState, real_tokens: torch.Tensor,
                       cond: torch.Tensor, fake_probs: torch.Tensor) -> dict:
    """One η update (lines 22-25): real tokens vs detached fakes, one shared augmentation mask."""
    g, t = st.rng, ctx.teacher
    mask, r = gan.gan_mask(real_tokens.shape[0], t.seq_len, cfg.gan.mask_range, g,
                           device=real_tokens.device)
    m = t.mask_embedding()
    with autocast(ctx, cfg):
        e_real = gan.mask_embeddings(t.embed_ids(real_tokens), mask, m)
        e_fake = gan.mask_embeddings(t.embed_probs(fake_probs), mask, m)
        logits = discriminate(t, st.heads, torch.cat([e_real, e_fake]), torch.cat([cond, cond]),
                              torch.cat([r, r]), cfg.gan.feature_noise, g)
        d_real, d_fake = logits.float().chunk(2)
        loss = gan.discriminator_loss(d_real, d_fake)
    grad_norm = _update(st, "discriminator", st.heads, loss, cfg.train.grad_clip)
    return {"loss/discriminator": loss.item(), "grad_norm/discriminator": float(grad_norm),
            "disc/real_logit": d_real.mean().item(), "disc/fake_logit": d_fake.mean().item()}


def train_step(cfg: Config, ctx: TrainContext, st: TrainState) -> dict:
    """One full iteration; real data and its conditions are shared by the θ and η updates (H.3).

    r_init is drawn once per iteration for θ's and ψ's student samples (Di[M]O draws it once per
    training step). With ``data.prompts`` the Di[M]O loss and ψ take their prompts from that set.
    """
    real_tokens, labels, captions = ctx.data.sample(cfg.train.batch_size, st.rng)
    real_cond = ctx.condition(labels, captions)
    r_init = masking.draw_init_ratio(cfg.generator.init_mask_ratio, st.rng)
    cond, prompts, gan_cond = real_cond, captions, None
    if ctx.data.prompts is not None:
        prompts = ctx.data.sample_prompts(cfg.train.batch_size, st.rng)
        cond, gan_cond = ctx.condition(labels, prompts), real_cond
    metrics, fake_probs = generator_step(cfg, ctx, st, cond, prompts, r_init, gan_cond)
    if cfg.dimo.weight > 0:      # ψ only serves the Di[M]O loss
        if ctx.data.prompts is not None:
            aux_prompts = ctx.data.sample_prompts(cfg.train.batch_size, st.rng)
            aux_cond = ctx.condition(labels, aux_prompts)
        else:
            _, aux_labels, aux_prompts = ctx.data.sample(cfg.train.batch_size, st.rng)
            aux_cond = ctx.condition(aux_labels, aux_prompts)
        metrics.update(auxiliary_step(cfg, ctx, st, aux_cond, r_init))
    if fake_probs is not None:
        metrics.update(discriminator_step(cfg, ctx, st, real_tokens, real_cond, fake_probs))
    st.step += 1
    st.images_seen += cfg.train.batch_size * dist.world_size()   # global batch
    return metrics
