"""The embedded worlds a sweep's trials train on: pinned, then built by the driver before any trial.

Each trial's ``world.cache_dir`` is pinned to an absolute folder (part of what ``--resume``
compares), and the driver builds what the trials need of each world once, so no trial spends
minutes building it. On a cluster the folder is the sweep's shared one (``cluster.shared_world_cache``),
seeded from the driver's own cache when that holds the world.
"""
from __future__ import annotations

from pathlib import Path

from orchestrator.sweeping.schema import SweepSpec


def pin_worlds(spec: SweepSpec, shared: Path | None = None) -> dict[tuple[str, str], set[str]]:
    """Pin each embedded world's cache folder in the trial configs (cheap: nothing is built); returns
    the components each (world spec, cache) needs. ``shared``: the folder every node of a cluster
    reads (orchestrator.sweeping.cluster), used where ``world.cache_dir`` is unset."""
    from softdimo.world.layout import default_cache_dir

    needs: dict[tuple[str, str], set[str]] = {}
    for trial in spec.students + spec.trials:
        world, kind = trial.config["world"], trial.config["teacher"]["kind"]
        cache = str(Path(world["cache_dir"] or shared or default_cache_dir()).resolve())
        world["cache_dir"] = cache
        if kind in ("world_c2i", "world_t2i"):
            # each trial's track, and the world scorers its rewards name (built here, not in a trial)
            terms = {t["name"] for t in trial.config["reward"]["terms"]
                     if trial.config["reward"]["weight"] > 0}
            needs.setdefault((world["spec"], cache), set()).update(
                {kind[len("world_"):]} | terms & {"clip", "quality"})
    return needs


def build_worlds(needs: dict[tuple[str, str], set[str]], progress: bool,
                 shared: Path | None = None) -> None:
    """Build what the trials need of each world here, once, not inside a trial. A world in the
    ``shared`` folder is first copied from this node's own cache when that holds it."""
    from softdimo.world.build import copy_world
    from softdimo.world.layout import default_cache_dir
    from softdimo.world.store import load_world

    for (name, cache), components in needs.items():
        if shared is not None and Path(cache) == shared.resolve():
            copied = copy_world(name, default_cache_dir(), cache, sorted(components))
            print(f"world {name}: every node reads it from {cache}"
                  + (f" (copied from {default_cache_dir()})" if copied else ""), flush=True)
        load_world(name, cache, build_if_missing=True, progress=progress, needs=sorted(components))
