"""Test-time scaling of a one-step generator: Best-of-N and TTEO (paper §3.2.3, App. I.8, Eq. 11).

TTEO optimises the generator's *input embeddings* e_in, not a discrete x_init:

    e⋆ = argmax_e  R(Dec(Emb_Dec(z_θ(e))), c)

e starts at the (σ-noised) embeddings of x_init ~ p_init, as in one-step sampling, and takes plain
SGD steps (the paper: learning rate 0.2, no clipping) on −Σ_i w_i R_i, differentiated through the
frozen generator, the soft decoder path ``decode_probs(softmax(z/τ))`` and the rewards. The image of
every iterate is exactly what the objective scores, so an iterate's reward values cost nothing
extra, and ReNO's rule (keep the best iterate, not the last) is free.

Iterations are counted as ReNO (Eyring et al.) and the paper's Table 6 count them: each of the K
iterations scores the current embeddings, and every one but the last then takes an SGD step, so K
iterations cost K forward passes and K − 1 backward passes (K = 0 and K = 1 are plain Best-of-N).
Table 6's timings fit this count (a backward ≈ 1.0-1.4 forward in all four TTEO columns) and do not
fit K forward-and-backward steps plus a final forward.

Multi-start (App. I.8): the N starts of each prompt run together in one batch (several prompts share
a batch). Every start and every iterate of a prompt is a candidate; the prompt's image is the
candidate with the best *combined selection score*: the weighted sum, over the selection rewards, of
each reward standardised over that prompt's candidates (rewards live on different scales: a CLIP
cosine moves by 0.01 where ImageReward moves by 1).

Shapes: P prompts, N starts, B = P·N, L tokens, V codes, D embedding width, K = iters.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
from torch import nn

from softdimo.math import masking
from softdimo.math.reward import RewardFn
from softdimo.teachers.protocol import Teacher
from trainers.config import WORLD_REWARDS, ConfigValueError, TestTime

# The paper selects with CLIP score, ImageReward, HPS (v2.1 is what it reports) and PickScore
# (Eyring et al.); on the embedded world its tiny CLIP and the learned quality score stand in.
REAL_SELECTION = {"clip": 1.0, "imagereward": 1.0, "hps_v21": 1.0, "pickscore": 1.0}
WORLD_SELECTION = {name: 1.0 for name in WORLD_REWARDS}


def resolve(tt: TestTime, run_terms: Mapping[str, float], on_world: bool) -> tuple[dict, dict]:
    """(optimised reward weights, selection weights) with the defaults filled in."""
    rewards = dict(tt.rewards) or dict(run_terms)
    if tt.iters > 1 and not any(w > 0 for w in rewards.values()):
        raise ConfigValueError("rewards", "the checkpoint was trained without rewards; name the "
                               "rewards to optimise (e.g. quality=1,clip=0.2)")
    select = dict(tt.select) or dict(WORLD_SELECTION if on_world else REAL_SELECTION)
    return rewards, select


def combined_score(scores: Mapping[str, torch.Tensor], weights: Mapping[str, float]) -> torch.Tensor:
    """Σ_i w_i · standardise(s_i) over the last axis: scores {name: [P, C]} -> [P, C].

    Each reward is standardised over a prompt's C candidates (population std; a reward equal on
    all candidates contributes 0), so that rewards on different scales weigh as ``weights`` say.
    """
    total = None
    for name, w in weights.items():
        if w == 0:
            continue
        s = scores[name].double()
        z = (s - s.mean(-1, keepdim=True)) / (s.std(-1, unbiased=False, keepdim=True) + 1e-12)
        total = w * z if total is None else total + w * z
    if total is None:
        raise ValueError("selection needs at least one reward with a positive weight")
    return total


@dataclass
class TestTimeResult:
    images: torch.Tensor                 # [P, 3, H, W] in [0, 1]: each prompt's chosen candidate
    scores: dict                         # selection reward -> [P] raw values of the chosen images
    combined: torch.Tensor               # [P] combined selection score of the chosen images
    start: torch.Tensor                  # [P] which of the N starts was chosen
    iterate: torch.Tensor                # [P] at which iterate (0 = before any SGD step)
    trace: dict = field(default_factory=dict)   # reward -> [max(K, 1)] mean over the B starts


def _scores(rewards: Mapping[str, RewardFn], names, images: torch.Tensor, prompts: list) -> dict:
    return {name: rewards[name](images, prompts).float() for name in names}


def multistart_tteo(teacher: Teacher, net: nn.Module, cond: torch.Tensor, prompts: Sequence[str],
                    rewards: Mapping[str, RewardFn], reward_weights: Mapping[str, float],
                    select_weights: Mapping[str, float], bon: int, iters: int, lr: float,
                    generator: torch.Generator, init_mask_ratio: Sequence[float] = (0.6,),
                    embed_noise: float = 0.1, tau: float = 1.0) -> TestTimeResult:
    """Best-of-N with K TTEO iterations per start for P prompts (cond [P, ...]) in one batch of P·N.

    ``rewards`` maps every name in ``reward_weights`` and ``select_weights`` to a differentiable
    scorer (images [B, 3, H, W] in [0, 1], B prompts -> [B]). Only e receives gradients
    (``torch.autograd.grad``): the generator, decoder and scorers stay untouched.
    """
    p, n = cond.shape[0], bon
    if len(prompts) != p:
        raise ValueError(f"{len(prompts)} prompts for {p} conditions")
    t = teacher
    cond_b = cond.repeat_interleave(n, dim=0)
    prompts_b = [q for q in prompts for _ in range(n)]
    evals = max(iters, 1)
    optimised = [k for k, w in reward_weights.items() if w != 0] if evals > 1 else []
    selecting = [k for k, w in select_weights.items() if w != 0]
    was_training = net.training
    net.eval()
    with torch.no_grad():
        r_init = masking.draw_init_ratio(list(init_mask_ratio), generator)
        x_init = masking.sample_init(p * n, t.seq_len, t.V, t.mask_id, r_init, generator,
                                     device=cond.device)
        e = masking.embed_noise(t.embed_ids(x_init), embed_noise, generator).float()
    images, selected = [], {k: [] for k in selecting}
    trace = {k: [] for k in dict.fromkeys(optimised + selecting)}
    for k in range(evals):
        step = k < evals - 1
        e = e.detach().requires_grad_(step)
        with torch.set_grad_enabled(step):
            z = t.forward_embeddings(net, e, cond_b)[0].float()
            image = t.decode_probs(torch.softmax(z / tau, dim=-1), cond_b).float()
            values = _scores(rewards, optimised, image, prompts_b) if step else {}
        if step:
            objective = sum(reward_weights[name] * values[name] for name in optimised).sum()
            grad, = torch.autograd.grad(objective, e)
            e = e.detach() + lr * grad        # SGD ascent on Σ_i w_i R_i, i.e. descent on Eq. 9
        with torch.no_grad():
            image = image.detach()
            values = {name: v.detach() for name, v in values.items()}
            values.update(_scores(rewards, [s for s in trace if s not in values], image, prompts_b))
        images.append(image)
        for name in selecting:
            selected[name].append(values[name])
        for name in trace:
            trace[name].append(float(values[name].mean()))
    net.train(was_training)
    # candidates of prompt i: every iterate of its N starts, laid out [P, evals·N] as (iterate, start)
    per_prompt = {name: torch.stack(v).view(evals, p, n).transpose(0, 1).reshape(p, -1)
                  for name, v in selected.items()}
    combined = combined_score(per_prompt, select_weights)
    best = combined.argmax(dim=1)                          # [P]
    iterate, start = best // n, best % n
    rows = torch.arange(p, device=best.device)
    stacked = torch.stack(images)                          # [evals, B, 3, H, W]
    chosen = stacked[iterate.to(stacked.device), (rows * n + start).to(stacked.device)]
    return TestTimeResult(
        images=chosen, scores={name: v[rows, best].float() for name, v in per_prompt.items()},
        combined=combined[rows, best].float(), start=start, iterate=iterate,
        trace={name: torch.tensor(v) for name, v in trace.items()})
