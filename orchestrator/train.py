"""Train a one-step Soft-Di[M]O generator in this process.

    python -m orchestrator.train sweeps/presets/tiny_c2i.yaml train.steps=300
    python -m orchestrator.train sweeps/presets/tiny_t2i.yaml --resume

The config file is validated (with any key=value overrides) before anything runs; the embedded
world is built on first use. Checkpoints, the resolved config and sample grids go to output_dir.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from orchestrator.config import UserError, load_config, run_cli, to_dict

LOCK = ".softdimo.lock"      # one training process per output_dir (orchestrator.locks)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m orchestrator.train", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="a YAML preset, e.g. sweeps/presets/tiny_c2i.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. train.steps=300 gan.weight=0")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in output_dir (same config)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (default: all cores)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_intermixed_args(argv)
    cfg = load_config(args.config, args.overrides)
    from orchestrator import locks

    # before the world or any network loads: a bad folder or a second writer costs one line
    out = locks.writable_dir(cfg.output_dir, f"{args.config}: output_dir")
    locks.acquire(out / LOCK, f"{args.config}: output_dir {out}")
    try:
        return _run(args, cfg)
    finally:
        locks.release(out / LOCK)


def _run(args, cfg) -> int:
    import torch

    from trainers.config import ConfigValueError
    from trainers.loop import ResumeError, train

    if args.threads:
        torch.set_num_threads(args.threads)
    resolved = to_dict(cfg)
    from evaluators.suite import reward_factory
    from evaluators.networks.weights import WeightsMissing
    from softdimo.checkpoints import WeightsFileError
    from trainers.state import build_context

    try:
        ctx = build_context(cfg, progress=not args.quiet, reward_factory=reward_factory)
        result = train(cfg, resolved, resume=args.resume, progress=not args.quiet, ctx=ctx)
    except WeightsMissing as err:
        raise UserError(f"{args.config}: reward.terms: {err}") from None
    except (ResumeError, ConfigValueError) as err:
        raise UserError(f"{args.config}: {err}") from None
    except WeightsFileError as err:
        raise UserError(f"{args.config}: {err}") from None
    except FloatingPointError as err:
        print(f"error: training diverged: {err}", file=sys.stderr)
        return 1
    print(f"checkpoint:  {result.checkpoint}")
    if result.grid:
        print(f"sample grid: {result.grid}")
    print(f"output dir:  {result.output_dir}{os.sep}")
    return 0


if __name__ == "__main__":
    run_cli(main)
