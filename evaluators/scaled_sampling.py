"""Run test-time scaling (Best-of-N, TTEO: trainers.tteo) over many prompts for a loaded checkpoint.

Shared by ``orchestrator.generate --tteo`` and the evaluator pool (``EvalSettings.test_time``), so
that a sweep reports GenEval and HPS with and without test-time scaling from the same code. Prompts
are processed in batches of ⌊batch / N⌋ prompts (at least one), each prompt's N starts together.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from trainers.config import TestTime
from trainers.state import make_reward
from trainers.tteo import multistart_tteo, resolve


@dataclass
class TestTimeRun:
    """Images and scores of a test-time-scaled generation, and what it cost."""
    __test__ = False

    images: torch.Tensor                 # [P, 3, H, W] in [0, 1], one per prompt, on the CPU
    records: list                        # per prompt: prompt, scores, combined, start, iterate
    seconds_per_prompt: float
    rewards: dict                        # the optimised reward weights actually used
    select: dict                         # the selection weights actually used
    trace: dict = field(default_factory=dict)   # reward -> mean per iterate, over all prompts


def settings_of(tt: TestTime | dict | None) -> TestTime | None:
    if tt is None or isinstance(tt, TestTime):
        return tt
    return TestTime(**tt)


def label(tt: TestTime) -> str:
    """A short name for a configuration, e.g. 'bon4' or 'bon4_tteo4' (folders, MLflow keys)."""
    return f"bon{tt.bon}" + (f"_tteo{tt.iters}" if tt.iters > 1 else "")


def generate_scaled(student, prompts: Sequence[str], tt: TestTime, seed: int = 0,
                  device: torch.device | str = "cpu", progress: bool = False,
                  reward_factory: Callable | None = None) -> TestTimeRun:
    """Best-of-N / TTEO images for ``prompts`` with ``student`` (evaluators.suite.Student).

    ``reward_factory(name, device)`` builds real scorers (evaluators.networks.scorers); the world's clip and
    quality need none. Raises ValueError for a class-conditional checkpoint.
    """
    if student.teacher.conditioning != "text":
        raise ValueError("test-time scaling needs a text-to-image checkpoint (its rewards score "
                         "images against prompts)")
    cfg, teacher, device = student.cfg, student.teacher, torch.device(device)
    run_terms = {term.name: term.weight for term in cfg.reward.terms}
    rewards, select = resolve(tt, run_terms, on_world=student.world is not None)
    fns = {name: make_reward(name, student.world, device, reward_factory)
           for name in dict.fromkeys([*rewards, *select])}
    per_batch = max(1, tt.batch // tt.bon)
    g = torch.Generator(device=device).manual_seed(seed)
    images, records, traces = [], [], []
    start = time.perf_counter()
    for first in tqdm(range(0, len(prompts), per_batch), desc=f"{label(tt)}", disable=not progress,
                      unit="batch", leave=False):
        chunk = list(prompts[first:first + per_batch])
        cond = teacher.encode_condition(prompts=chunk).to(device)
        r = multistart_tteo(teacher, student.net, cond, chunk, fns, rewards, select, tt.bon,
                            tt.iters, tt.lr, g, cfg.generator.init_mask_ratio,
                            cfg.generator.embed_noise, cfg.embedding.temperature)
        images.append(r.images.cpu())
        traces.append((len(chunk), r.trace))
        for i, prompt in enumerate(chunk):
            records.append({"prompt": prompt,
                            "scores": {k: float(v[i]) for k, v in r.scores.items()},
                            "combined": float(r.combined[i]), "start": int(r.start[i]),
                            "iterate": int(r.iterate[i])})
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - start) / max(1, len(prompts))
    total = sum(n for n, _ in traces)
    trace = {name: [float(sum(n * t[name][k] for n, t in traces) / total)
                    for k in range(len(traces[0][1][name]))] for name in traces[0][1]}
    return TestTimeRun(torch.cat(images), records, seconds, rewards, select, trace)
