"""A sweep on a cluster: per-worker custom resources, the tracking address, the world on shared storage.

The two-node run itself is tests/e2e/test_two_nodes.py; these are the decisions it rests on.
"""
from pathlib import Path

import pytest
import ray.util

from orchestrator.config import UserError
from orchestrator.sweeping import cluster
from orchestrator.sweeping.dry_run import format_dry_run
from orchestrator.sweeping.spec import load_sweep

ROOT = Path(__file__).resolve().parents[2]


def sweep(tmp_path, *overrides):
    return load_sweep(ROOT / "sweeps" / "gan_mask.yaml", list(overrides), cwd=tmp_path)


def test_resources_per_worker_reach_the_plan_and_the_dry_run(tmp_path):
    from orchestrator.sweep import plan_resources

    spec = sweep(tmp_path, "sweep.scaling.resources_per_worker={node_b: 1}")
    assert spec.file.scaling.resources_per_worker == {"node_b": 1.0}
    assert "1 worker(s) on cpu (gloo), CPU from the cluster's cores + 1 node_b per worker" in format_dry_run(spec)
    # three trials and 8 cores, but one node_b: one trial at a time, with the cores it leaves
    assert plan_resources(spec, {"CPU": 8.0, "node_b": 1.0})[0] == 1
    spec.file.scaling.cpus_per_worker = 1.0
    assert plan_resources(spec, {"CPU": 8.0, "node_b": 2.0})[0] == 2
    with pytest.raises(UserError, match=r"one trial needs .*'node_b': 1.0.*'node_b': 0.0"):
        plan_resources(spec, {"CPU": 8.0})


@pytest.mark.parametrize("value, message", [
    ("{CPU: 1}", "CPU and GPU come from cpus_per_worker"),
    ("{node_b: 0}", "scaling.resources_per_worker: takes custom resources > 0"),
])
def test_bad_resources_per_worker_are_refused_in_one_line(tmp_path, value, message):
    with pytest.raises(UserError, match=message):
        sweep(tmp_path, f"sweep.scaling.resources_per_worker={value}")


def test_loopback_addresses():
    assert cluster.is_loopback("127.0.0.1") and cluster.is_loopback("localhost")
    assert cluster.is_loopback("::1") and cluster.is_loopback("127.0.1.1")
    assert not cluster.is_loopback("10.77.0.1") and not cluster.is_loopback("mlflow.internal")
    assert not cluster.is_loopback(None)


def test_on_a_cluster_no_trial_is_told_a_loopback_tracking_address(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    address = "10.77.0.1:6379"               # attaching: known without asking Ray
    with pytest.raises(UserError, match="s.yaml: tracking.uri: http://127.0.0.1:5000 is a loopback"):
        cluster.check_tracking_uri("s.yaml", "http://127.0.0.1:5000", address)
    with pytest.raises(UserError, match="tracking.uri: http://localhost:5000 is a loopback"):
        cluster.check_tracking_uri("s.yaml", "http://localhost:5000", address)
    cluster.check_tracking_uri("s.yaml", "http://10.77.0.1:5000", address)
    cluster.check_tracking_uri("s.yaml", "sqlite:////shared/mlflow.db", address)
    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "10.77.0.1")
    assert cluster.tracking_host("s.yaml", address) == "10.77.0.1"
    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "127.0.0.1")
    with pytest.raises(UserError, match="s.yaml: tracking.uri: the sweep runs on a cluster but this "
                                        "node's address is 127.0.0.1"):
        cluster.tracking_host("s.yaml", address)
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")   # inside `ray job submit`
    assert cluster.attaching(None)


def test_on_a_cluster_the_world_is_pinned_to_the_shared_folder(tmp_path):
    from orchestrator.sweeping.worlds import pin_worlds

    shared = cluster.shared_world_cache(str(tmp_path / "out"))
    assert shared == tmp_path / "out" / "worlds"
    assert cluster.shared_world_cache("s3://bucket/sweeps") is None
    spec = sweep(tmp_path, "world.spec=test")
    needs = pin_worlds(spec, shared)
    assert {t.config["world"]["cache_dir"] for t in spec.trials} == {str(shared.resolve())}
    assert needs == {("test", str(shared.resolve())): {"c2i"}}
    own = sweep(tmp_path, "world.spec=test", f"world.cache_dir={tmp_path / 'mine'}")
    pin_worlds(own, shared)                  # a folder the user names is kept
    assert {t.config["world"]["cache_dir"] for t in own.trials} == {str(tmp_path / "mine")}


def test_the_shared_world_is_copied_from_the_driver_s_cache_not_rebuilt(test_world, tmp_path):
    from softdimo.world.build import copy_world
    from softdimo.world.layout import built_components, world_dir

    src = test_world.root.parent
    assert copy_world("test", src, tmp_path / "shared", ["c2i"])
    copied = world_dir(test_world.spec, tmp_path / "shared")
    assert built_components(copied) == built_components(test_world.root)
    assert (copied / "c2i_teacher.safetensors").read_bytes() == \
        (test_world.root / "c2i_teacher.safetensors").read_bytes()
    assert not copy_world("test", src, tmp_path / "shared", ["c2i"])      # there already
    assert not copy_world("test", tmp_path / "empty", tmp_path / "other", ["c2i"])   # nothing to copy
    assert not list(tmp_path.glob("shared/.world-*"))                    # no scratch left


def test_a_worker_that_must_build_the_world_says_so(tmp_path, caplog, test_world):
    from orchestrator.config import load_config
    from orchestrator.sweeping.trial import _announce_world_build

    class Tags:          # stands in for the trial's Tracker: only its tags matter here
        def __init__(self):
            self.tags = {}

        def set_tags(self, tags):
            self.tags.update(tags)

    cfg = load_config(ROOT / "sweeps/presets/tiny_c2i.yaml",
                      ["world.spec=test", f"world.cache_dir={tmp_path / 'empty'}"])
    tags = Tags()
    with caplog.at_level("WARNING"):
        _announce_world_build(cfg, "t003", 0, tags)
    message = tags.tags["softdimo.world_build"]
    assert message in caplog.text
    assert message.startswith("trial t003 rank 0 on node ") and str(tmp_path / "empty") in message
    assert "base, c2i_teacher, features" in message
    built = load_config(ROOT / "sweeps/presets/tiny_c2i.yaml",
                        ["world.spec=test", f"world.cache_dir={test_world.root.parent}"])
    quiet = Tags()
    _announce_world_build(built, "t003", 0, quiet)       # the world is there: nothing to say
    assert not quiet.tags
