"""Remove placement groups that trials stopped by the scheduler leave behind.

When Tune stops a trial (ASHA), it kills the trial's Train controller; Ray Train's own
PlacementGroupCleaner should then remove the workers' placement group, but in Ray 2.60 it sometimes
does not (reproduced: the group stayed CREATED with its CPU reserved and no actor in it, and the
next trial waited forever for its worker group). This callback removes any placement group whose
every bundle has stayed wholly unused for ``idle_s`` seconds: a live worker group uses its bundles
within moments of being created, and Tune's own trial groups are used by their driver.
"""
from __future__ import annotations

import logging
import time

import ray
from ray import tune
from ray.util import placement_group_table, remove_placement_group
from ray.util.placement_group import PlacementGroup

log = logging.getLogger(__name__)


def own_groups() -> set[str] | None:
    """Placement groups created by this job (the sweep); None if the State API cannot say."""
    try:
        from ray.util.state import list_placement_groups

        context = ray.get_runtime_context()
        # this session's cluster by its address: "auto" fails where the machine runs two Ray
        # instances (a head joined with --address beside a local one)
        return {pg.placement_group_id for pg in list_placement_groups(
            address=context.gcs_address, filters=[("creator_job_id", "=", context.get_job_id())],
            limit=10_000)}
    except Exception as err:      # no dashboard: never touch groups we cannot attribute
        log.warning("cannot list placement groups (%s); not cleaning", err)
        return None


def idle_groups(available: dict) -> set[str]:
    """Ids of this job's CREATED placement groups none of whose bundle resources is in use."""
    mine = own_groups()
    if mine is None:
        return set()
    idle = set()
    for pg_id, pg in placement_group_table().items():
        if pg["state"] != "CREATED" or pg_id not in mine:
            continue
        unused = all(
            available.get(f"{resource}_group_{index}_{pg_id}", 0.0) >= amount - 1e-9
            for index, bundle in pg["bundles"].items() for resource, amount in bundle.items())
        if unused:
            idle.add(pg_id)
    return idle


class OrphanGroupCleaner(tune.Callback):
    """Checks on Tune's steps (at most every ``every_s``); removes groups idle for ``idle_s``."""

    def __init__(self, idle_s: float = 30.0, every_s: float = 5.0):
        self.idle_s, self.every_s = idle_s, every_s
        self.first_idle: dict = {}
        self.last_check = 0.0

    def on_step_end(self, iteration, trials, **info):
        now = time.time()
        if now - self.last_check < self.every_s:
            return
        self.last_check = now
        self.sweep(now)

    def on_experiment_end(self, trials, **info):
        self.idle_s = 0.0           # no trial runs any more: whatever is unused now is left over
        self.sweep(time.time())

    def sweep(self, now: float) -> None:
        idle = idle_groups(ray.available_resources())
        self.first_idle = {pg: self.first_idle.get(pg, now) for pg in idle}
        for pg_id, since in list(self.first_idle.items()):
            if now - since >= self.idle_s:
                log.warning("removing placement group %s, unused for %.0f s (left by a stopped trial)",
                            pg_id, now - since)
                remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id))))
                del self.first_idle[pg_id]
