"""Build the embedded default world: data, VQ tokenizer, two teachers, tiny CLIP, quality and
feature networks, all trained by this project's code with fixed seeds.

    python -m orchestrator.prepare            # the full world (minutes, once; cached)
    python -m orchestrator.prepare --force    # rebuild even if the cache has it
    python -m orchestrator.prepare --spec test
    python -m orchestrator.prepare --track c2i   # only what class-to-image runs need

The result lives under $SOFTDIMO_CACHE (default ~/.cache/softdimo) in a folder keyed by a content
hash of the build spec, so running this again is instant.
"""
from __future__ import annotations

import argparse
import json
from typing import Sequence

from orchestrator.config import run_cli


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m orchestrator.prepare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spec", default="full", choices=("full", "test"),
                   help="which world: full (default) or the tiny test variant")
    p.add_argument("--cache-dir", default=None, help="cache root (default: $SOFTDIMO_CACHE or ~/.cache/softdimo)")
    p.add_argument("--track", default="all", choices=("all", "c2i", "t2i"),
                   help="build every component (default) or only what one track's runs need: c2i = "
                        "data, tokenizer, c2i teacher, feature net; t2i adds the tiny CLIP, the t2i "
                        "teacher and the quality reward")
    p.add_argument("--force", action="store_true", help="rebuild even if a cached world exists")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: all cores)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    import torch

    from softdimo.world.build import build_components
    from softdimo.world.layout import COMPONENTS, TRACK_NEEDS, WORLD_SPECS, default_cache_dir

    if args.threads:
        torch.set_num_threads(args.threads)
    cache = args.cache_dir or default_cache_dir()
    needs = COMPONENTS if args.track == "all" else TRACK_NEEDS[args.track]
    root = build_components(WORLD_SPECS[args.spec], cache, needs, force=args.force,
                            progress=not args.quiet)
    manifest = json.loads((root / "manifest.json").read_text())
    total = manifest.get("total_seconds", 0)
    print(f"world '{args.spec}' ({', '.join(manifest['components'])}) ready at {root}"
          + (f" (built in {total:.0f} s)" if total else ""))
    return 0


if __name__ == "__main__":
    run_cli(main)
