"""Where a sweep's trials run: this machine only, or a cluster of nodes, and what that changes.

On one machine every trial shares the driver's loopback and disk. On a cluster (the sweep was given
``--address`` or ``$RAY_ADDRESS``, or Ray shows more than one alive node) a trial may run on another
node with its own loopback and its own disk, so:

- the sweep's own MLflow server listens on the driver node's address (Ray's view of it), never on
  127.0.0.1, and a ``tracking.uri`` on a loopback address is refused in one line;
- the embedded world lives once under the sweep's storage (``<output_dir>/worlds/``, which every
  node sees) instead of the driver's node-local cache: the driver builds it there, or copies it
  from its own cache, before any trial starts, so no node builds it at training time.
"""
from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from urllib.parse import urlparse

from orchestrator.config import UserError

LOOPBACK = "127.0.0.1"
WORLDS = "worlds"         # <output_dir>/worlds/: the embedded worlds every node of a cluster reads


def attaching(address: str | None) -> bool:
    """True when the sweep joins an existing cluster (``--address`` or ``$RAY_ADDRESS``): known
    before Ray starts, so the world's folder can be pinned and built before any trial."""
    return bool(address or os.environ.get("RAY_ADDRESS"))


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def multi_node(address: str | None) -> bool:
    """Trials may run on another node: attached to a cluster, or more than one alive node."""
    import ray

    return attaching(address) or sum(1 for n in ray.nodes() if n.get("Alive")) > 1


def tracking_host(source: str, address: str | None) -> str:
    """The address the sweep's own MLflow server listens on: loopback on one machine, else the
    driver node's address as Ray knows it (the address the other nodes reach this one by)."""
    if not multi_node(address):
        return LOOPBACK
    import ray.util

    host = ray.util.get_node_ip_address()
    if is_loopback(host):
        raise UserError(f"{source}: tracking.uri: the sweep runs on a cluster but this node's "
                        f"address is {host}, which other nodes cannot reach; set tracking.uri to an "
                        "MLflow server every node reaches (sweep.tracking.uri=http://HOST:PORT)")
    return host


def check_tracking_uri(source: str, uri: str, address: str | None) -> None:
    """A trial on another node would log to its own loopback: refuse such a URI on a cluster."""
    if is_loopback(urlparse(uri).hostname) and multi_node(address):
        raise UserError(f"{source}: tracking.uri: {uri} is a loopback address, which trials on "
                        "other nodes of the cluster cannot reach; name the MLflow server by an "
                        "address every node reaches")


def shared_world_cache(output_dir: str) -> Path | None:
    """``<output_dir>/worlds`` when the sweep's storage is a (shared) POSIX folder, else None."""
    if "://" in str(output_dir):
        return None       # object storage: each node builds its own copy under its world lock
    return Path(output_dir) / WORLDS
