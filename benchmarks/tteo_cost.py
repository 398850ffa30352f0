"""Seconds per prompt of test-time scaling: Best-of-4 with 4 TTEO iterations vs Best-of-16 (Table 6).

    python benchmarks/tteo_cost.py                                  # full world, a fresh student
    python benchmarks/tteo_cost.py --checkpoint runs/t2i_long --rounds 5 --threads 2
    python benchmarks/tteo_cost.py --configs 16:0,4:4,8:0,4:2       # N:K pairs; the first is the base

Every configuration runs the same code as ``orchestrator.generate --tteo`` (evaluators.scaled_sampling)
on the same prompts, device and images per batch (--batch: prompts × N), in alternating rounds; the
median of each is reported with its ratio to the first. The target is BoN 4 + 4 iterations at no
more than 1.6× BoN 16 (the paper measured 2.14×). Cost does not depend on the weights, so without
--checkpoint a copy of the teacher's backbone stands in for the student (same network, same FLOPs).
K iterations are K forward passes and K − 1 backward passes per start (trainers.tteo).
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch


def _student(args, device):
    from evaluators.suite import Student, load_student
    from orchestrator.config import load_config
    from trainers.state import build_context

    if args.checkpoint:
        from orchestrator.cli_common import find_checkpoint

        return load_student(find_checkpoint(args.checkpoint), device)
    preset = Path(__file__).resolve().parents[1] / "sweeps/presets/tiny_t2i.yaml"
    cfg = load_config(preset, [f"world.spec={args.spec}", f"train.device={device.type}"])
    ctx = build_context(cfg, rewards=False)
    net = ctx.teacher.make_student().to(device).eval().requires_grad_(False)
    return Student(cfg, ctx.teacher, net, ctx.world, "t2i")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="a text-to-image checkpoint or run folder")
    p.add_argument("--spec", default="full", choices=("full", "test"), help="world (no --checkpoint)")
    p.add_argument("--configs", default="16:0,4:4", help="N:K pairs; ratios are to the first")
    p.add_argument("--prompts", type=int, default=32, help="held-out captions per round")
    p.add_argument("--batch", type=int, default=64, help="images per batch (prompts × N)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()

    from evaluators.scaled_sampling import generate_scaled, label
    from trainers.config import TestTime
    from trainers.state import resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    student = _student(args, device)
    prompts = list(student.world.reference("t2i").captions[:args.prompts])
    rewards = {t.name: t.weight for t in student.cfg.reward.terms} or {"quality": 1.0, "clip": 0.2}
    configs = []
    for pair in args.configs.split(","):
        n, k = (int(x) for x in pair.split(":"))
        configs.append(TestTime(bon=n, iters=k, lr=0.2, rewards=rewards, batch=args.batch))
    for tt in configs:                                      # warm-up: caches, allocator, threads
        generate_scaled(student, prompts[:max(1, args.batch // tt.bon)], tt, device=device)
    times = {label(tt): [] for tt in configs}
    for r in range(args.rounds):
        order = configs if r % 2 == 0 else configs[::-1]
        for tt in order:
            run = generate_scaled(student, prompts, tt, seed=r, device=device)
            times[label(tt)].append(run.seconds_per_prompt)
    base = statistics.median(times[label(configs[0])])
    print(f"device {device}, threads {torch.get_num_threads()}, {len(prompts)} prompts, "
          f"{args.batch} images per batch, {args.rounds} rounds (medians)")
    print(f"{'configuration':<14} {'s / prompt':>11} {'ratio':>7} {'passes':>14}")
    for tt in configs:
        median = statistics.median(times[label(tt)])
        evals = max(tt.iters, 1)
        passes = f"{tt.bon * evals}F+{tt.bon * (evals - 1)}B"
        print(f"{label(tt):<14} {median:>11.4f} {median / base:>6.2f}x {passes:>14}")
    if [(c.bon, c.iters) for c in configs[:2]] == [(16, 0), (4, 4)]:
        ratio = statistics.median(times["bon4_tteo4"]) / base
        verdict = "met" if ratio <= 1.6 else "NOT met"
        print(f"BoN 4 + 4 TTEO iterations vs BoN 16: {ratio:.2f}x (target <= 1.6x: {verdict}; "
              f"paper 2.14x)")


if __name__ == "__main__":
    main()
