"""``orchestrator.generate --tteo``: run each test-time-scaling configuration, write, summarise, log.

Each configuration writes its images (soft-decoded, one per prompt), grid.png and samples.json (per
image: prompt, raw selection scores, combined score, chosen start and iterate; per run: settings,
seconds per prompt and the mean reward per TTEO iterate) into its own folder when several run.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from orchestrator.config import UserError


def _summary_row(name: str, run) -> str:
    means = {k: sum(r["scores"][k] for r in run.records) / len(run.records) for k in run.select}
    return f"{name:<14} {run.seconds_per_prompt:>12.4f}  " + "  ".join(
        f"{k}={v:.4f}" for k, v in means.items())


def _write(folder: Path, run, tt, path: Path, meta: dict, seed: int) -> None:
    from dataclasses import asdict

    from torchvision.utils import save_image

    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for i, (image, record) in enumerate(zip(run.images, run.records)):
        name = f"{i:06d}.png"
        save_image(image, str(folder / name))
        records.append({"file": name, **record})
    save_image(run.images[:64], str(folder / "grid.png"), nrow=8, padding=1)
    settings = {**asdict(tt), "rewards": run.rewards, "select": run.select}
    (folder / "samples.json").write_text(json.dumps(
        {"checkpoint": str(path), "step": meta["step"], "seed": seed, "test_time": settings,
         "decode": "soft", "seconds_per_prompt": run.seconds_per_prompt,
         "trace": run.trace, "images": records}, indent=2))


def _log_mlflow(uri: str, experiment: str, path: Path, meta: dict, args, results: list) -> str:
    from orchestrator import tracking

    params = {"checkpoint": str(path), "step": meta["step"], "seed": args.seed, "lr": args.lr,
              "bon": args.bon, "iters": args.iters,
              "rewards": json.dumps(results[0][2].rewards), "select": json.dumps(results[0][2].select)}
    metrics, files = {}, []
    for name, folder, run in results:
        metrics[f"tts/{name}/seconds_per_prompt"] = run.seconds_per_prompt
        for k in run.select:
            metrics[f"tts/{name}/{k}"] = sum(r["scores"][k] for r in run.records) / len(run.records)
        files.append((folder, f"tts/{name}"))
    return tracking.log_run(uri, experiment, f"generate {path.parent.parent.name}/{path.name}",
                            params, metrics, files)


def run_configs(args, configs: list, path: Path, meta: dict, cfg, ctx, net, prompts: list,
                out: Path) -> int:
    """Run every configuration on ``prompts``; one line of summary per configuration."""
    from evaluators.suite import Student
    from evaluators.scaled_sampling import generate_scaled, label
    from evaluators.networks.weights import WeightsMissing
    from evaluators.suite import reward_factory
    from trainers.config import ConfigValueError

    track = "c2i" if ctx.teacher.conditioning == "class" else "t2i"
    student = Student(cfg, ctx.teacher, net, ctx.world, track)
    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    results = []
    for tt in configs:
        name = label(tt)
        folder = out if len(configs) == 1 else out / name
        try:
            run = generate_scaled(student, prompts, tt, seed=args.seed, device=ctx.device,
                                progress=not args.quiet, reward_factory=reward_factory)
        except WeightsMissing as err:
            raise UserError(f"--rewards/--select: {err}") from None
        except ConfigValueError as err:
            raise UserError(f"--{err}") from None
        _write(folder, run, tt, path, meta, args.seed)
        results.append((name, folder, run))
    print(f"{len(prompts)} prompts from {path} (step {meta['step']}, EMA) -> {out}/")
    print(f"{'configuration':<14} {'s / prompt':>12}  mean selection scores")
    for name, _, run in results:
        print(_summary_row(name, run))
    if uri:
        run_id = _log_mlflow(uri, args.experiment, path, meta, args, results)
        print(f"MLflow: run {run_id} in experiment {args.experiment!r} at {uri}")
    return 0
