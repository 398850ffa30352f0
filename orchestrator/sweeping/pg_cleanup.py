"""Remove placement groups that trials stopped by the scheduler leave behind.

When Tune stops a trial (ASHA), it kills the trial's Train controller; Ray Train's own
PlacementGroupCleaner should then remove the workers' placement group, but in Ray 2.60 it sometimes
does not (reproduced: the group stayed CREATED with its CPU reserved and no actor in it, and the
next trial waited forever for its worker group). While a stage runs, ``OrphanGroupCleaner`` removes
any placement group whose every bundle has stayed wholly unused for ``idle_s`` seconds: a live
worker group uses its bundles within moments of being created, and Tune's own trial groups are used
by their driver. When the stage ends, ``remove_leftover_groups`` removes whatever this job still holds.
"""
from __future__ import annotations

import logging
import time

import ray
from ray import tune
from ray.util import placement_group_table, remove_placement_group
from ray.util.placement_group import PlacementGroup

log = logging.getLogger(__name__)


def own_groups(live_only: bool = False) -> set[str] | None:
    """Placement groups created by this job (the sweep), with ``live_only`` those not yet removed;
    None if the State API cannot say."""
    try:
        from ray.util.state import list_placement_groups

        context = ray.get_runtime_context()
        # this session's cluster by its address: "auto" fails where the machine runs two Ray
        # instances (a head joined with --address beside a local one)
        return {pg.placement_group_id for pg in list_placement_groups(
            address=context.gcs_address, filters=[("creator_job_id", "=", context.get_job_id())],
            limit=10_000) if not (live_only and pg.state == "REMOVED")}
    except Exception as err:      # no dashboard: never touch groups we cannot attribute
        log.warning("cannot list placement groups (%s); not cleaning", err)
        return None


def _remove(pg_id: str) -> None:
    """Remove a placement group given its hex id (as the State API lists it)."""
    remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id))))


def remove_leftover_groups(settle_s: float = 5.0, timeout_s: float = 60.0) -> int:
    """After a stage's ``Tuner.fit``: every placement group this job still holds is left over.

    Tune has removed its trials' own groups and no trial runs between stages, so what remains was
    requested by the Train controller of a trial the scheduler stopped. One still PENDING when the
    stage ended is granted later and then holds its CPUs idle for good (reproduced: 1.99 CPUs of a
    2-CPU node), so pending groups go too. Repeats until none has appeared for ``settle_s`` (a
    stopped trial may still be asking as it dies), at most ``timeout_s``; -> groups removed.
    """
    removed: set[str] = set()
    deadline, quiet_since = time.time() + timeout_s, time.time()
    while time.time() < deadline and time.time() - quiet_since < settle_s:
        left = own_groups(live_only=True)
        if left is None:
            break
        for pg_id in left - removed:
            log.warning("removing placement group %s, left by a stopped trial", pg_id)
            try:
                _remove(pg_id)
            except Exception as err:     # removed meanwhile by its owner
                log.debug("placement group %s: %s", pg_id, err)
            removed.add(pg_id)
            quiet_since = time.time()
        time.sleep(0.5)
    return len(removed)


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

    def sweep(self, now: float) -> None:
        idle = idle_groups(ray.available_resources())
        self.first_idle = {pg: self.first_idle.get(pg, now) for pg in idle}
        for pg_id, since in list(self.first_idle.items()):
            if now - since >= self.idle_s:
                log.warning("removing placement group %s, unused for %.0f s (left by a stopped trial)",
                            pg_id, now - since)
                _remove(pg_id)
                del self.first_idle[pg_id]
