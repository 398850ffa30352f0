"""World-FID of a trained checkpoint, or of a world teacher at several sampling step counts.

    python -m orchestrator.evaluate runs/tiny_c2i --num 2000
    python -m orchestrator.evaluate runs/tiny_c2i --temperatures 1,2,4      # best of a sweep
    python -m orchestrator.evaluate --teacher world_c2i --steps 1,2,4,8,16 --cfg 2

Images are generated with fixed seeds and fixed, balanced conditions and compared with the world's
held-out reference images through the world's feature network. Results print as a table and, with
--out, are written as JSON.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

from orchestrator.config import UserError, from_dict, run_cli


def _floats(text: str, name: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{name}: expected comma-separated numbers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise UserError(f"{name}: expected positive numbers, got {text!r}")
    return values


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m orchestrator.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", nargs="?", help="a checkpoint directory or a run's output_dir")
    p.add_argument("--teacher", choices=("world_c2i", "world_t2i"),
                   help="evaluate a world teacher instead of a checkpoint")
    p.add_argument("--steps", default="1,2,4,8,16", help="teacher sampling steps (with --teacher)")
    p.add_argument("--cfg", type=float, default=2.0, help="teacher CFG weight (with --teacher)")
    p.add_argument("--randomize", type=float, default=4.5,
                   help="teacher Gumbel confidence randomisation (with --teacher)")
    p.add_argument("--temperatures", default="1", help="sampling temperatures; the best is reported")
    p.add_argument("--argmax", action="store_true", help="student: argmax tokens instead of sampling")
    p.add_argument("--num", type=int, default=2000, help="images to generate (default 2000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--world", default="full", choices=("full", "test"), help="world (with --teacher)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: all cores)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if bool(args.checkpoint) == bool(args.teacher):
        raise UserError("give either a checkpoint or --teacher")
    if args.num < 2:
        raise UserError("--num must be at least 2")
    temperatures = _floats(args.temperatures, "--temperatures")
    import torch

    from evaluators.world_eval import (eval_conditions, generate_images, student_sampler,
                                       teacher_sampler, world_fid)
    from softdimo.world.store import load_world
    from trainers.state import resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    if args.teacher:
        steps = [int(s) for s in _floats(args.steps, "--steps")]
        device = resolve_device("auto")
        world = load_world(args.world, device=device)
        track = args.teacher.split("_")[1]
        teacher = world.teacher(track)
        samplers = {f"teacher {s} steps, cfg {args.cfg:g}, T {t:g}":
                    teacher_sampler(teacher, s, args.cfg, t, args.randomize)
                    for s in steps for t in temperatures}
    else:
        from orchestrator.generate import find_checkpoint
        from trainers.checkpoint import load_generator, read_meta
        from trainers.state import build_context

        path = find_checkpoint(args.checkpoint)
        meta = read_meta(path)
        cfg = from_dict(meta["config"], str(path / "meta.json"))
        ctx = build_context(cfg)
        device, teacher, world = ctx.device, ctx.teacher, ctx.world
        track = "c2i" if cfg.teacher.kind == "world_c2i" else "t2i"
        net = load_generator(teacher, path, device)
        g = cfg.generator
        samplers = {f"{path.name} EMA, T {t:g}" + (" argmax" if args.argmax else ""):
                    student_sampler(teacher, net, g.init_mask_ratio, g.embed_noise, t, args.argmax)
                    for t in (temperatures[:1] if args.argmax else temperatures)}
    reference = world.reference(track)
    conds = eval_conditions(teacher, args.num, 18, reference.captions)
    for name, sample in samplers.items():
        images = generate_images(sample, teacher, conds, args.seed, device=device, desc=name)
        rows.append({"name": name, "world_fid": world_fid(world.features, images, reference.images,
                                                          device=device)})
        print(f"{name:48s} world-FID {rows[-1]['world_fid']:8.3f}", flush=True)
    best = min(rows, key=lambda r: r["world_fid"])
    print(f"best: {best['name']} world-FID {best['world_fid']:.3f} ({args.num} images)")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"num": args.num, "seed": args.seed, "rows": rows,
                                              "best": best}, indent=2))
    return 0


if __name__ == "__main__":
    run_cli(main)
