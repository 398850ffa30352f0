"""Write one-step images from a trained checkpoint (EMA weights).

    python -m orchestrator.generate runs/tiny_c2i --out samples/ --num 64
    python -m orchestrator.generate runs/tiny_c2i/checkpoints/step_00000300 --out s/ --argmax
    python -m orchestrator.generate runs/tiny_t2i --out s/ --prompts prompts.txt --temperature 0.5

A run directory means its latest checkpoint. Class-to-image checkpoints cycle through the classes
(or take --labels); text-to-image checkpoints take one prompt per line from --prompts (default: the
world's captions). Images are PNG files plus grid.png and samples.json (condition of each image).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

from orchestrator.config import UserError, from_dict, run_cli


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m orchestrator.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a checkpoint directory, or a run's output_dir (latest checkpoint)")
    p.add_argument("--out", required=True, help="folder for the images")
    p.add_argument("--num", type=int, default=64, help="number of images (default 64)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--batch-size", type=int, default=64)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--argmax", action="store_true", help="take the most likely token everywhere")
    mode.add_argument("--temperature", type=float, default=None,
                      help="sampling temperature (default: the run's generator.temperature)")
    p.add_argument("--labels", default=None, help="class ids, comma separated (class-to-image)")
    p.add_argument("--prompts", default=None, help="text file, one prompt per line (text-to-image)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: all cores)")
    return p


def find_checkpoint(path: str) -> Path:
    from trainers.checkpoint import META, latest_checkpoint

    p = Path(path)
    if (p / META).is_file():
        return p
    latest = latest_checkpoint(p)
    if latest is None:
        raise UserError(f"{path}: no checkpoint found (expected {META} or checkpoints/step_*/)")
    return latest


def conditions(args, teacher, ctx, names: list) -> tuple[list, object]:
    """The condition of each of the --num images: (descriptions, labels tensor or prompt list)."""
    import torch

    n = args.num
    if teacher.conditioning == "class":
        if args.prompts:
            raise UserError(f"{args.checkpoint}: a class-conditional checkpoint takes --labels, not --prompts")
        ids = [int(x) for x in args.labels.split(",")] if args.labels else list(range(len(names)))
        if any(not 0 <= i < len(names) for i in ids):
            raise UserError(f"--labels: class ids must lie in [0, {len(names) - 1}]")
        labels = [ids[i % len(ids)] for i in range(n)]
        return [names[i] for i in labels], torch.tensor(labels, device=ctx.device)
    if args.labels:
        raise UserError(f"{args.checkpoint}: a text-conditional checkpoint takes --prompts, not --labels")
    if args.prompts:
        file = Path(args.prompts)
        if not file.is_file():
            raise UserError(f"--prompts: {file}: file not found")
        lines = [s.strip() for s in file.read_text().splitlines() if s.strip()]
        if not lines:
            raise UserError(f"--prompts: {file}: no prompts in the file")
    else:
        lines = sorted(set(ctx.data.captions))
    prompts = [lines[i % len(lines)] for i in range(n)]
    return prompts, prompts


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.num <= 0 or args.batch_size <= 0:
        raise UserError("--num and --batch-size must be positive")
    if args.temperature is not None and args.temperature <= 0:
        raise UserError("--temperature must be > 0")
    path = find_checkpoint(args.checkpoint)
    import torch
    from torchvision.utils import save_image

    from trainers.checkpoint import load_generator, read_meta
    from trainers.loop import class_names
    from trainers.sampling import one_step_tokens
    from trainers.state import build_context

    if args.threads:
        torch.set_num_threads(args.threads)
    meta = read_meta(path)
    cfg = from_dict(meta["config"], str(path / "meta.json"))
    ctx = build_context(cfg, rewards=False)
    teacher = ctx.teacher
    net = load_generator(teacher, path, ctx.device)
    described, cond_source = conditions(args, teacher, ctx, class_names(ctx))
    temperature = args.temperature or cfg.generator.temperature
    g = torch.Generator(device=ctx.device).manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    images = []
    for start in range(0, args.num, args.batch_size):
        chunk = slice(start, min(start + args.batch_size, args.num))
        if teacher.conditioning == "class":
            cond = teacher.encode_condition(labels=cond_source[chunk])
        else:
            cond = teacher.encode_condition(prompts=cond_source[chunk]).to(ctx.device)
        tokens = one_step_tokens(teacher, net, cond, g, cfg.generator.init_mask_ratio,
                                 cfg.generator.embed_noise, temperature, argmax=args.argmax)
        with torch.no_grad():
            images.append(teacher.decode_ids(tokens).float().cpu())
    images = torch.cat(images)
    records = []
    for i, (image, text) in enumerate(zip(images, described)):
        name = f"{i:06d}.png"
        save_image(image, str(out / name))
        records.append({"file": name, "condition": text})
    save_image(images[:64], str(out / "grid.png"), nrow=8, padding=1)
    (out / "samples.json").write_text(json.dumps(
        {"checkpoint": str(path), "step": meta["step"], "seed": args.seed, "argmax": args.argmax,
         "temperature": None if args.argmax else temperature, "images": records}, indent=2))
    print(f"{len(records)} images from {path} (step {meta['step']}, EMA) -> {out}/")
    return 0


if __name__ == "__main__":
    run_cli(main)
