"""Training iterations per second on the CPU: the joint Soft-Di[M]O step next to the Di[M]O-only step.

    python benchmarks/train_speed.py                      # full world, tiny_c2i, one thread
    python benchmarks/train_speed.py --world test --iters 5 --threads 1     # smoke

Both configurations run side by side in one process on the same world, after a few warm-up
iterations, each timed over ``--iters`` iterations. For each it prints iterations per second, the
seconds spent in each of Algorithm 1's three updates (θ, ψ, η), and how many forward passes each
network runs per iteration with how many samples, against the minimum Algorithm 1 needs:

    θ (generator)   2  (the θ update, then fresh samples from the updated θ for ψ's targets, as
                        the Di[M]O code does: lines 3 and 19)
    φ (teacher)     1  Di[M]O only: CFG as one pass on [conditional; unconditional] (2B samples);
                    3  joint: + the GAN features of the fakes in the θ update (B, with gradient to
                        the soft embeddings) + real and fakes in one pass for η (2B)
    ψ (auxiliary)   2  (no-grad logits in the θ update, its own update)
    η (heads)       2  joint: one in the θ update, one for η's update
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _timed(module, name: str, seconds: Counter):
    fn = getattr(module, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            seconds[name] += time.perf_counter() - start
    setattr(module, name, wrapper)
    return fn


def measure(preset: str, overrides: list[str], iters: int, warmup: int) -> dict:
    """Iterations/s, seconds per update and forward passes per network of one configuration."""
    import torch

    import trainers.steps as steps
    from orchestrator.config import load_config
    from trainers.state import build_context, build_state

    cfg = load_config(preset, overrides)
    ctx = build_context(cfg, progress=False)
    st = build_state(cfg, ctx)
    nets = {"generator": st.generator, "teacher": ctx.teacher.backbone, "auxiliary": st.auxiliary,
            "discriminator heads": st.heads}
    names = {id(net): name for name, net in nets.items()}
    calls, samples = Counter(), Counter()
    forward = ctx.teacher.forward_embeddings    # every network runs through the teacher protocol

    def counted(net, e, *args, **kwargs):
        calls[names[id(net)]] += 1
        samples[names[id(net)]] += int(e.shape[0])
        return forward(net, e, *args, **kwargs)
    ctx.teacher.forward_embeddings = counted

    def heads_hook(module, args, output):
        calls["discriminator heads"] += 1
        samples["discriminator heads"] += int(output.shape[0])
    st.heads.register_forward_hook(heads_hook)
    for _ in range(warmup):
        steps.train_step(cfg, ctx, st)
    calls.clear(), samples.clear()
    seconds = Counter()
    originals = {n: _timed(steps, n, seconds) for n in ("generator_step", "auxiliary_step",
                                                        "discriminator_step")}
    try:
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(iters):
            steps.train_step(cfg, ctx, st)
        total, cpu = time.perf_counter() - start, time.process_time() - cpu
    finally:
        for n, fn in originals.items():
            setattr(steps, n, fn)
    # CPU seconds barely move when other processes share the cores; wall seconds do
    return {"it_per_s": iters / total, "ms_per_it": 1000 * total / iters,
            "cpu_ms_per_it": 1000 * cpu / iters,
            "ms_per_update": {k: round(1000 * v / iters, 1) for k, v in seconds.items()},
            "forward_passes": {k: calls[k] / iters for k in nets},
            "samples_per_pass": {k: samples[k] / max(calls[k], 1) for k in nets}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=str(ROOT / "sweeps/presets/tiny_c2i.yaml"))
    p.add_argument("--world", default="full", choices=("full", "test"))
    p.add_argument("--iters", type=int, default=40)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="also write the figures to this file")
    args = p.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch
    torch.set_num_threads(args.threads)

    base = [f"world.spec={args.world}", "train.device=cpu", "output_dir=/tmp/train_speed"]
    runs = {"joint (Di[M]O + GAN, the preset)": base,
            "Di[M]O only (gan.weight=0)": base + ["gan.weight=0"]}
    results = {name: measure(args.preset, o, args.iters, args.warmup) for name, o in runs.items()}
    print(f"{Path(args.preset).name}, world {args.world}, {args.threads} thread(s), "
          f"{args.iters} iterations each after {args.warmup} warm-up\n")
    for name, r in results.items():
        passes = ", ".join(f"{k} {v:g}x{r['samples_per_pass'][k]:g}"
                           for k, v in r["forward_passes"].items() if v)
        updates = ", ".join(f"{k.split('_')[0]} {v:g}" for k, v in r["ms_per_update"].items())
        print(f"{name:34s} {r['it_per_s']:6.2f} it/s  {r['ms_per_it']:7.1f} ms/it "
              f"({r['cpu_ms_per_it']:.1f} CPU ms)  "
              f"[ms: {updates}]\n{'':34s} forward passes per iteration (x samples): {passes}")
    joint, dimo = results.values()
    print(f"\njoint step / Di[M]O-only step: {joint['ms_per_it'] / dimo['ms_per_it']:.2f}x the time")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
