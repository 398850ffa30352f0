"""Images per second: one-step generation vs the teacher's 16-step CFG sampler, side by side.

    python benchmarks/sampling_speed.py                 # full world, batch 64, auto device
    python benchmarks/sampling_speed.py --spec test --rounds 3

Both paths include decoding to images, run on the same device and batch, and are timed in
alternating rounds (the median of each is reported) so machine noise hits both alike. The target is
a ratio of at least 25×; the FLOP limit is 32× (16 steps, each a doubled CFG batch).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def _timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spec", default="full", choices=("full", "test"))
    p.add_argument("--track", default="c2i", choices=("c2i", "t2i"))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=16, help="teacher sampling steps")
    p.add_argument("--cfg", type=float, default=2.0, help="teacher CFG weight")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()

    from evaluators.metrics.world_eval import eval_conditions
    from softdimo.world.store import load_world
    from trainers.sampling import one_step_tokens
    from trainers.state import resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    world = load_world(args.spec, device=device)
    teacher = world.teacher(args.track)
    student = teacher.make_student().to(device).eval()   # same network, same FLOPs
    conds = eval_conditions(teacher, args.batch, 18, world.data(args.track).captions)
    if teacher.conditioning == "class":
        cond = teacher.encode_condition(labels=torch.tensor(conds, device=device))
    else:
        cond = teacher.encode_condition(prompts=conds).to(device)
    g = torch.Generator(device=device).manual_seed(0)

    @torch.no_grad()
    def one_step():
        teacher.decode_ids(one_step_tokens(teacher, student, cond, g), cond)

    @torch.no_grad()
    def multi_step():
        teacher.decode_ids(teacher.sample(cond, args.steps, args.cfg, g), cond)

    one_step(), multi_step()   # warm-up
    t_one, t_multi = [], []
    for _ in range(args.rounds):
        t_one.append(_timed(one_step, device))
        t_multi.append(_timed(multi_step, device))
    one, multi = statistics.median(t_one), statistics.median(t_multi)
    print(f"device {device}, batch {args.batch}, world {args.spec}/{args.track}, {args.rounds} rounds")
    print(f"one-step student        : {args.batch / one:10.1f} images/s  ({one * 1e3:.1f} ms/batch)")
    print(f"teacher {args.steps:2d}-step CFG {args.cfg:g}: {args.batch / multi:10.1f} images/s  "
          f"({multi * 1e3:.1f} ms/batch)")
    print(f"speed-up: {multi / one:.1f}x  (target >= 25x; FLOP limit {2 * args.steps}x)")


if __name__ == "__main__":
    main()
