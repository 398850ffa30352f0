"""Score checkpoints with the paper's metrics, outside a sweep (the evaluator pool's code, in-process).

    python -m orchestrator.evaluate runs/tiny_c2i --metrics world_fid,world_clip --num 2000
    python -m orchestrator.evaluate runs/tiny_c2i --temperatures 0.5,1,2      # the best is reported
    python -m orchestrator.evaluate gan_mask --metrics world_fid               # every trial of a sweep
    python -m orchestrator.evaluate 3f2a...e9 --metrics clip,hps_v21,imagereward   # an MLflow run
    python -m orchestrator.evaluate CKPT --metrics fid5k,is,prdc --weights inception=/w/pt_inc.pth
    python -m orchestrator.evaluate --teacher world_c2i --steps 1,2,4,8,16 --cfg 2

The target is a checkpoint directory (or a run folder: its latest checkpoint), a sweep (its name under
--output-dir, or its folder: each trial's final checkpoint) or an MLflow run id (its
``checkpoint.final`` tag). Results of a sweep or run go into the trial's MLflow run at the
checkpoint's step. Generation uses the EMA weights, a fixed seed and fixed, balanced conditions.

Metrics: world_fid, world_clip, geneval_world (embedded world); fid5k, fid50k, is, prdc, clip, hps,
hps_v21, pickscore, imagereward, geneval (real networks: weights staged under $SOFTDIMO_WEIGHTS or
given with --weights KEY=PATH; a missing file is named in a one-line error).

With --tteo (text-to-image), the prompt-based metrics are computed again on test-time-scaled images
(Best-of-N with TTEO, as orchestrator.generate --tteo) and reported as eval/tts/<metric>:
    python -m orchestrator.evaluate runs/tiny_t2i --metrics geneval_world,world_clip --tteo --bon 4 --iters 4
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Sequence

from orchestrator.config import UserError, run_cli


def _floats(text: str, name: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{name}: expected comma-separated numbers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise UserError(f"{name}: expected positive numbers, got {text!r}")
    return values


# Standalone evaluation scores more images than a sweep's per-checkpoint pool (EvalSettings.num_images)
NUM_IMAGES = 2000


def parser() -> argparse.ArgumentParser:
    from evaluators.suite import EvalSettings

    # the defaults are EvalSettings' (one place for them, shared with the sweep's evaluation section)
    default = EvalSettings()
    p = argparse.ArgumentParser(prog="python -m orchestrator.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", nargs="?", help="checkpoint dir | run folder | sweep name or folder | MLflow run id")
    p.add_argument("--metrics", default=",".join(default.metrics),
                   help=f"comma-separated metric names (see above; default {','.join(default.metrics)})")
    p.add_argument("--num", type=int, default=NUM_IMAGES,
                   help=f"images per metric without a fixed count (default {NUM_IMAGES})")
    p.add_argument("--temperatures", default=None,
                   help="sampling temperatures; the best is reported (default: each run's "
                        "generator.eval_temperatures, else its eval_temperature; teachers: 1)")
    p.add_argument("--seed", type=int, default=default.seed)
    p.add_argument("--geneval-prompts-per-task", type=int, default=default.geneval_prompts_per_task,
                   help=f"GenEval-world prompts per task (six tasks, {default.images_per_prompt} images "
                        f"each; default {default.geneval_prompts_per_task})")
    p.add_argument("--geneval-results", default=None, metavar="PATH",
                   help="geneval: also write the per-image results.jsonl (GenEval's official schema)")
    p.add_argument("--weights", nargs="*", default=[], metavar="KEY=PATH",
                   help="explicit weight paths, e.g. inception=/w/pt_inception.pth")
    p.add_argument("--reference", default=default.reference, help="FID reference npz (mu, sigma[, arr_0])")
    p.add_argument("--output-dir", default="runs/sweeps", help="where sweeps live (for a sweep name)")
    p.add_argument("--tracking-uri", default=None, help="MLflow URI (default: the sweeps' local store)")
    p.add_argument("--no-log", action="store_true", help="do not write results to MLflow")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON to FILE")
    # deprecated: --out names a folder in the other verbs (generate, tokenize, report)
    p.add_argument("--out", dest="json_legacy", default=None, help=argparse.SUPPRESS)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: all cores)")
    p.add_argument("--teacher", metavar="world_c2i|world_t2i|PRESET.yaml",
                   help="world-FID of a world teacher at several step counts instead")
    p.add_argument("--steps", default="1,2,4,8,16", help="teacher sampling steps (with --teacher)")
    p.add_argument("--cfg", type=float, default=None,
                   help="teacher CFG weight (with --teacher; default 2 on the world, else the teacher's published one)")
    p.add_argument("--world", default="full", choices=("full", "test"), help="world (with --teacher)")
    from orchestrator.cli_common import add_test_time_options

    add_test_time_options(p, lists=False)
    return p


def _targets(args) -> list[tuple[str, Path, str | None, int | None]]:
    """-> [(name, checkpoint dir, MLflow run id or None, step or None)]."""
    from orchestrator.cli_common import find_checkpoint
    from trainers.checkpoint import read_meta

    from orchestrator.sweeping.layout import SweepLayout

    path = Path(args.target)
    layout = SweepLayout(path)
    if not layout.state.is_file():
        layout = SweepLayout.of(args.output_dir, args.target)
    sweep_dir = layout.root
    if layout.state.is_file():
        out = []
        for trial in json.loads(layout.state.read_text())["trials"]:
            result = layout.trial(trial["key"]).result
            if not result.is_file():
                print(f"{trial['key']}: not finished, skipped")
                continue
            r = json.loads(result.read_text())
            ckpt = find_checkpoint(r["checkpoint"])        # verified: a damaged one is refused
            out.append((f"{trial['key']} {trial['label']}", ckpt, r["mlflow_run_id"], r["step"]))
        if not out:
            raise UserError(f"{args.target}: no finished trial in {sweep_dir}")
        return out
    if re.fullmatch(r"[0-9a-f]{32}", args.target) and not path.exists():
        from orchestrator import tracking

        run = tracking._client(_uri(args)).get_run(args.target)
        final = run.data.tags.get("checkpoint.final")
        if not final:
            raise UserError(f"{args.target}: MLflow run has no checkpoint.final tag")
        ckpt = find_checkpoint(final)
        return [(run.info.run_name, ckpt, args.target, int(read_meta(ckpt)["step"]))]
    ckpt = find_checkpoint(args.target)
    return [(ckpt.name, ckpt, None, None)]


def _uri(args) -> str:
    from orchestrator import tracking

    if args.tracking_uri:
        return args.tracking_uri
    db = tracking.default_store(Path(args.output_dir)).resolve()
    if not (db / "mlflow.db").is_file():
        raise UserError(f"no MLflow store at {db}; pass --tracking-uri")
    return tracking.sqlite_uri(db)


def _settings(args):
    from evaluators.suite import EvalSettings, check_metrics

    try:
        metrics = check_metrics([m.strip() for m in args.metrics.split(",") if m.strip()])
    except ValueError as err:
        raise UserError(f"--metrics: {err}") from None
    paths = {}
    for item in args.weights:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--weights: {item!r} is not KEY=PATH")
        paths[key] = value
    from softdimo.checkpoints import WeightsFileError, check_weight_paths

    try:
        check_weight_paths(paths)
    except WeightsFileError as err:
        raise UserError(f"--weights: {err}") from None
    if args.num < 2:
        raise UserError("--num must be at least 2")
    if args.geneval_prompts_per_task < 1:
        raise UserError("--geneval-prompts-per-task must be at least 1")
    test_time = None
    if args.tteo:
        from dataclasses import asdict

        from orchestrator.cli_common import test_time_settings

        configs = test_time_settings(args)
        if len(configs) != 1:
            raise UserError("--bon/--iters: evaluate takes one configuration (no comma lists)")
        test_time = asdict(configs[0])
    return EvalSettings(metrics=metrics, num_images=args.num,
                        temperatures=(_floats(args.temperatures, "--temperatures")
                                      if args.temperatures else None), seed=args.seed,
                        reference=args.reference, paths=paths, test_time=test_time,
                        geneval_prompts_per_task=args.geneval_prompts_per_task,
                        geneval_results=args.geneval_results)


def evaluate_checkpoints(args) -> list[dict]:
    import torch
    from tqdm.auto import tqdm

    from evaluators.suite import Evaluator
    from evaluators.networks.weights import WeightsMissing, set_offline_env
    from trainers.state import resolve_device

    set_offline_env()
    settings = _settings(args)
    targets = _targets(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        evaluator = Evaluator(settings, device=resolve_device("auto"), progress=not args.quiet)
    except WeightsMissing as err:
        raise UserError(str(err)) from None
    rows = []
    for name, ckpt, run_id, step in tqdm(targets, desc="checkpoints",
                                          disable=len(targets) < 2 or args.quiet):
        try:
            metrics = evaluator.evaluate(ckpt)
        except WeightsMissing as err:
            raise UserError(str(err)) from None
        rows.append({"name": name, "checkpoint": str(ckpt), "metrics": metrics})
        print(f"{name}: " + "  ".join(f"{k[5:]} {v:.4g}" for k, v in metrics.items()), flush=True)
        if run_id and not args.no_log:
            from orchestrator import tracking

            tracker = tracking.Tracker(_uri(args), run_id, ckpt.parent / "evaluate_spool.jsonl")
            tracker.log_metrics(step or 0, metrics)
            tracker.close()
    return rows


def evaluate_real_teacher(args) -> list[dict]:
    """--teacher PRESET.yaml: the preset's teacher sampled with its own sampler at each --steps,
    scored with --metrics (teacher baselines, the paper's Tables 2 and 11)."""
    import torch

    from evaluators.suite import Evaluator
    from evaluators.networks.weights import WeightsMissing
    from orchestrator.config import load_config
    from trainers.state import resolve_device

    if not Path(args.teacher).is_file():
        raise UserError(f"--teacher: {args.teacher}: expected world_c2i, world_t2i or a preset file")
    cfg = load_config(args.teacher)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = _settings(args)
    try:
        evaluator = Evaluator(settings, device=resolve_device("auto"), progress=not args.quiet)
    except WeightsMissing as err:
        raise UserError(str(err)) from None
    rows = []
    for steps in [int(s) for s in _floats(args.steps, "--steps")]:
        name = f"teacher {steps} steps" + (f", cfg {args.cfg:g}" if args.cfg is not None else "")
        try:
            metrics = evaluator.evaluate_teacher(cfg, steps, args.cfg)
        except (ValueError, WeightsMissing) as err:
            raise UserError(f"{args.teacher}: {err}") from None
        rows.append({"name": name, "metrics": metrics})
        print(f"{name}: " + "  ".join(f"{k[5:]} {v:.4g}" for k, v in metrics.items()), flush=True)
    return rows


def evaluate_teacher(args) -> list[dict]:
    import torch

    from evaluators.metrics.world_eval import eval_conditions, generate_images, teacher_sampler, world_fid
    from softdimo.world.scenes import class_names
    from softdimo.world.store import load_world
    from trainers.state import resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device("auto")
    track = args.teacher.split("_")[1]
    world = load_world(args.world, device=device, needs=(track,))
    teacher, reference = world.teacher(track), world.reference(track)
    conds = eval_conditions(teacher, args.num, len(class_names()), reference.captions)
    rows = []
    for steps in [int(s) for s in _floats(args.steps, "--steps")]:
        for t in _floats(args.temperatures or "1", "--temperatures"):
            guidance = 2.0 if args.cfg is None else args.cfg
            name = f"teacher {steps} steps, cfg {guidance:g}, T {t:g}"
            images = generate_images(teacher_sampler(teacher, steps, guidance, t), teacher, conds,
                                     args.seed, device=device, desc=name)
            rows.append({"name": name, "metrics": {"eval/world_fid": world_fid(
                world.features, images, reference.images, device=device)}})
            print(f"{name:40s} world-FID {rows[-1]['metrics']['eval/world_fid']:8.3f}", flush=True)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.json_legacy:
        print("--out FILE is deprecated for evaluate (a folder in the other verbs); use --json FILE",
              file=sys.stderr)
        args.json = args.json or args.json_legacy
    if bool(args.target) == bool(args.teacher):
        raise UserError("give either a target (checkpoint, sweep or MLflow run) or --teacher")
    if args.teacher and args.teacher not in ("world_c2i", "world_t2i"):
        rows = evaluate_real_teacher(args)
    else:
        rows = evaluate_teacher(args) if args.teacher else evaluate_checkpoints(args)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"num": args.num, "seed": args.seed, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    run_cli(main)
