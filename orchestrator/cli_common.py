"""What the verbs share: the checkpoint a command line names, and the test-time-scaling options.

``orchestrator.generate`` and ``orchestrator.evaluate`` take the same ``--tteo`` options (generate
accepts comma lists and runs each combination, evaluate one configuration) and find and verify a
checkpoint the same way; both import them from here, not from each other.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from orchestrator.config import UserError


def add_test_time_options(p: argparse.ArgumentParser, lists: bool = True) -> None:
    """--tteo and its options (shared with orchestrator.evaluate, which takes one configuration)."""
    more = "; a comma list runs each" if lists else ""
    tts = p.add_argument_group("test-time scaling (text-to-image)")
    tts.add_argument("--tteo", action="store_true", help="Best-of-N with TTEO (the options below)")
    tts.add_argument("--bon", default="4", help=f"N starts per prompt (default 4){more}")
    tts.add_argument("--iters", default="4",
                     help=f"TTEO iterations K (K − 1 SGD steps); 0 = plain Best-of-N (default 4){more}")
    tts.add_argument("--lr", type=float, default=0.2, help="SGD learning rate on the embeddings (0.2)")
    tts.add_argument("--rewards", default=None, metavar="NAME=W,...",
                     help="rewards to optimise (default: the run's reward.terms)")
    tts.add_argument("--select", default=None, metavar="NAME=W,...",
                     help="selection rewards (default: clip, imagereward, hps_v21, pickscore; "
                          "world: clip, quality)")
    if lists:
        tts.add_argument("--tracking-uri", default=None,
                         help="MLflow URI to log to (default: $MLFLOW_TRACKING_URI; unset: no logging)")
        tts.add_argument("--experiment", default="softdimo-generate", help="MLflow experiment name")


def find_checkpoint(path: str, only: tuple = ("ema.safetensors",)) -> Path:
    """The checkpoint directory ``path`` names (or a run folder's latest one), verified against
    its checksums (the ``only`` files: generation needs the EMA weights); damage is a UserError."""
    from trainers.checkpoint import CheckpointDamaged, resolve_checkpoint, verify_checkpoint

    try:
        found = resolve_checkpoint(path)
        verify_checkpoint(found, only)
    except FileNotFoundError as err:
        raise UserError(str(err)) from None
    except CheckpointDamaged as err:
        raise UserError(f"{err}; pass an earlier checkpoint directory instead") from None
    return found


def _ints(text: str, name: str, least: int) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{name}: expected integers, got {text!r}") from None
    if not values or min(values) < least:
        raise UserError(f"{name}: must be >= {least}, got {text!r}")
    return values


def _weights(text: str | None, name: str) -> dict:
    if text is None:
        return {}
    out = {}
    for item in text.split(","):
        key, sep, value = item.strip().partition("=")
        try:
            out[key] = float(value) if sep else 1.0
        except ValueError:
            raise UserError(f"{name}: {item!r} is not NAME=WEIGHT") from None
    return out


def test_time_settings(args) -> list:
    """The --tteo configurations, checked before any network is loaded."""
    from trainers.config import ConfigValueError, TestTime, check_test_time

    if not args.lr > 0:
        raise UserError(f"--lr must be > 0, got {args.lr}")
    rewards, select = _weights(args.rewards, "--rewards"), _weights(args.select, "--select")
    configs = [TestTime(bon=n, iters=k, lr=args.lr, rewards=rewards, select=select,
                        batch=getattr(args, "batch_size", 64))
               for n in _ints(args.bon, "--bon", 1) for k in _ints(args.iters, "--iters", 0)]
    try:
        for tt in configs:
            check_test_time(tt, prefix="--")
    except ConfigValueError as err:
        raise UserError(str(err)) from None
    return configs


