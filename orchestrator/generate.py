"""Write one-step images from a trained checkpoint (EMA weights), optionally with test-time scaling.

    python -m orchestrator.generate runs/tiny_c2i --out samples/ --num 64
    python -m orchestrator.generate runs/tiny_c2i/checkpoints/step_00000300 --out s/ --argmax
    python -m orchestrator.generate runs/tiny_t2i --out s/ --prompts prompts.txt --temperature 0.5
    python -m orchestrator.generate runs/tiny_t2i --prompts prompts.txt --out s/ --tteo --bon 4 --iters 4 --lr 0.2
    python -m orchestrator.generate runs/tiny_t2i --prompts prompts.txt --out s/ --tteo --bon 4,8,16 --iters 0

A run directory means its latest checkpoint. Class-to-image checkpoints cycle through the classes
(or take --labels); text-to-image checkpoints take one prompt per line from --prompts (default: the
world's captions). Images are PNG files plus grid.png and samples.json (condition of each image).

Test-time scaling (--tteo, text-to-image; paper §3.2.3, App. I.8): N starts per prompt run as one
batch; with --iters K ≥ 2 each start's input embeddings take K − 1 SGD steps (--lr) on the rewards
(--rewards; default the run's reward.terms) through the soft-embedding decoder, and every iterate is
a candidate (K counts iterations as ReNO and the paper's Table 6 do; 0 is plain Best-of-N). Each
prompt keeps the candidate with the best combined selection score (--select; default CLIP score,
ImageReward, HPS v2.1 and PickScore, or on the embedded world its CLIP and quality scores; each
standardised over the prompt's candidates). Images are soft-decoded, as the rewards see them.
Comma lists in --bon/--iters run every combination, each in its own folder, and a Table 6-style
summary (seconds per prompt, mean scores) is printed. With --tracking-uri (or MLFLOW_TRACKING_URI)
the images, scores and timings are logged to an MLflow run.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

from orchestrator.cli_common import add_test_time_options, find_checkpoint, test_time_settings
from orchestrator.config import UserError, from_dict, run_cli


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m orchestrator.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a checkpoint directory, or a run's output_dir (latest checkpoint)")
    p.add_argument("--out", required=True, help="folder for the images")
    p.add_argument("--num", type=int, default=None,
                   help="number of images (default 64; with --tteo and --prompts: one per prompt)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--batch-size", type=int, default=64)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--argmax", action="store_true", help="take the most likely token everywhere")
    mode.add_argument("--temperature", type=float, default=None,
                      help="sampling temperature (default: the run's generator.eval_temperature, "
                           "else generator.temperature)")
    p.add_argument("--labels", default=None, help="class ids, comma separated (class-to-image)")
    p.add_argument("--prompts", default=None, help="text file, one prompt per line (text-to-image)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: all cores)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_test_time_options(p)
    return p


def conditions(args, teacher, ctx, names: list) -> tuple[list, object]:
    """The condition of each of the --num images: (descriptions, labels tensor or prompt list)."""
    import torch

    n = args.num or 64
    if teacher.conditioning == "class":
        if args.tteo:
            raise UserError(f"{args.checkpoint}: test-time scaling needs a text-to-image checkpoint "
                            "(this one is class-conditional)")
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
        n = args.num or (len(lines) if args.tteo else 64)
    else:
        lines = sorted(set(ctx.data.captions))
    prompts = [lines[i % len(lines)] for i in range(n)]
    return prompts, prompts


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if (args.num is not None and args.num <= 0) or args.batch_size <= 0:
        raise UserError("--num and --batch-size must be positive")
    if args.temperature is not None and not 0 < args.temperature < float("inf"):
        raise UserError(f"--temperature must be a positive finite number, got {args.temperature}")
    configs = test_time_settings(args) if args.tteo else []
    path = find_checkpoint(args.checkpoint)
    import torch

    from softdimo.checkpoints import WeightsFileError
    from trainers.checkpoint import CheckpointDamaged, load_generator, read_meta
    from trainers.loop import class_names
    from trainers.state import build_context

    if args.threads:
        torch.set_num_threads(args.threads)
    meta = read_meta(path)
    cfg = from_dict(meta["config"], str(path / "meta.json"))
    try:
        ctx = build_context(cfg, rewards=False)
    except WeightsFileError as err:
        raise UserError(f"{path / 'meta.json'}: {err}") from None
    try:
        net = load_generator(ctx.teacher, path, ctx.device)
    except CheckpointDamaged as err:
        raise UserError(str(err)) from None
    except RuntimeError as err:   # load_state_dict: weights that do not fit the run's network
        raise UserError(f"{path}: the weights do not fit the network of its meta.json "
                        f"({str(err).splitlines()[0]})") from None
    described, cond_source = conditions(args, ctx.teacher, ctx, class_names(ctx))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if configs:
        from orchestrator.generate_tts import run_configs

        return run_configs(args, configs, path, meta, cfg, ctx, net, described, out)
    return _plain(args, path, meta, cfg, ctx, net, described, cond_source, out)


def _plain(args, path, meta, cfg, ctx, net, described, cond_source, out: Path) -> int:
    import torch
    from torchvision.utils import save_image

    from trainers.config import eval_temperature
    from trainers.sampling import one_step_tokens

    teacher, num = ctx.teacher, len(described)
    temperature = args.temperature or eval_temperature(cfg.generator)
    g = torch.Generator(device=ctx.device).manual_seed(args.seed)
    images = []
    for start in range(0, num, args.batch_size):
        chunk = slice(start, min(start + args.batch_size, num))
        if teacher.conditioning == "class":
            cond = teacher.encode_condition(labels=cond_source[chunk])
        else:
            cond = teacher.encode_condition(prompts=cond_source[chunk]).to(ctx.device)
        tokens = one_step_tokens(teacher, net, cond, g, cfg.generator.init_mask_ratio,
                                 cfg.generator.embed_noise, temperature, argmax=args.argmax)
        with torch.no_grad():
            images.append(teacher.decode_ids(tokens, cond).float().cpu())
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
