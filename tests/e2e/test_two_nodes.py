"""A real two-node Ray cluster on one machine: a sweep's trial on a node with its own network and disk.

Node A (the head, and the sweep's driver) listens on 10.77.0.1, the host side of a veth pair. Node B
runs in its own network namespace (its own loopback, 10.77.0.2 on the other end of the pair) and its
own mount namespace: tmpfs over its private folder (its HOME, $SOFTDIMO_CACHE), over node A's
private folder and over Ray's session folder (named by the head, so both nodes use the same path), so
it sees neither node A's world cache, nor its home, nor its sockets. Both see the
shared folder the sweep writes to (what NFS is on a real cluster). A trial is forced onto node B by a
custom resource (``scaling.resources_per_worker``); in the failure test node B's raylet is killed
mid-trial and the trial must finish on node A from its last checkpoint on the shared folder.
Needs root (namespaces); skipped with a reason elsewhere.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import yaml

from orchestrator import tracking

ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")
HOST_IP, NODE_B_IP = "10.77.0.1", "10.77.0.2"
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "network and mount namespaces need root"
    for tool in ("ip", "unshare"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed"
    if subprocess.run(["ip", "netns", "list"], capture_output=True).returncode != 0:
        return "`ip netns` is not available"
    return None


def _sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST_IP, 0))
        return s.getsockname()[1]


def _wait_nodes(address: str, count: int, env: dict, timeout: float = 120) -> None:
    probe = ("import ray, sys, time\nray.init(address=sys.argv[1], log_to_driver=False)\n"
             "end = time.time() + float(sys.argv[3])\n"
             "while sum(n['Alive'] for n in ray.nodes()) < int(sys.argv[2]):\n"
             "    assert time.time() < end, ray.nodes()\n    time.sleep(1)\n")
    subprocess.run([sys.executable, "-c", probe, address, str(count), str(timeout)], env=env,
                   check=True, capture_output=True, timeout=timeout + 60)


def _stop(proc: subprocess.Popen) -> None:
    """`ray start --block` stops the node's processes on SIGTERM; the group is killed after 15 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def _node_b_raylets() -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if entry.name.isdigit() and cmd and cmd[0].endswith(b"raylet") and \
                f"--node_ip_address={NODE_B_IP}".encode() in cmd:
            found.append(int(entry.name))
    return found


@pytest.fixture(scope="module")
def two_nodes(test_world):
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    tag = f"{os.getpid() % 100000}"
    ns, veth_a, veth_b = f"sdm{tag}", f"sdma{tag}", f"sdmb{tag}"
    base = Path(tempfile.mkdtemp(prefix="sdm2n", dir="/tmp"))   # short: Ray's socket paths
    shared, host, node_b = base / "shared", base / "host", base / "nodeb"
    for folder in (shared, host / "home", node_b):
        folder.mkdir(parents=True)
    shutil.copytree(os.environ["SOFTDIMO_CACHE"], host / "cache")   # node A's own world cache
    procs, logs = [], []
    try:
        _sh("ip", "netns", "add", ns)
        _sh("ip", "link", "add", veth_a, "type", "veth", "peer", "name", veth_b)
        _sh("ip", "link", "set", veth_b, "netns", ns)
        _sh("ip", "addr", "add", f"{HOST_IP}/24", "dev", veth_a)
        _sh("ip", "link", "set", veth_a, "up")
        for cmd in (["addr", "add", f"{NODE_B_IP}/24", "dev", veth_b], ["link", "set", veth_b, "up"],
                    ["link", "set", "lo", "up"]):
            _sh("ip", "netns", "exec", ns, "ip", *cmd)
        port = _free_port()
        address = f"{HOST_IP}:{port}"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
               "HOME": str(host / "home"), "SOFTDIMO_CACHE": str(host / "cache"),
               "RAY_AUTH_MODE": "disabled"}
        logs.append(open(base / "head.log", "w"))
        procs.append(subprocess.Popen(
            [RAY, "start", "--head", "--block", f"--node-ip-address={HOST_IP}", f"--port={port}",
             "--num-cpus=2", '--resources={"slot": 1}', "--object-store-memory=100000000",
             "--include-dashboard=true", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={_free_port()}", f"--ray-client-server-port={_free_port()}",
             f"--dashboard-agent-listen-port={_free_port()}", "--disable-usage-stats",
             f"--temp-dir={base / 'rayhead'}"],
            env=env, cwd=ROOT, stdout=logs[-1], stderr=subprocess.STDOUT, start_new_session=True))
        _wait_nodes(address, 1, env)
        # node B: its own network (ip netns) and mounts (unshare); tmpfs hides node A's folder and
        # gives node B private ones (home and world cache; Ray's session folder, named by the head)
        script = (f"mount -t tmpfs tmpfs {host} && mount -t tmpfs tmpfs {node_b} && "
                  f"mount -t tmpfs tmpfs {base / 'rayhead'} && "
                  f"mkdir -p {node_b}/home {node_b}/cache && exec env HOME={node_b}/home "
                  f"SOFTDIMO_CACHE={node_b}/cache {RAY} start --block --address={address} "
                  f"--node-ip-address={NODE_B_IP} --num-cpus=1 "
                  """'--resources={"node_b": 1, "slot": 1}' --object-store-memory=100000000 """
                  "--disable-usage-stats")
        logs.append(open(base / "nodeb.log", "w"))
        procs.append(subprocess.Popen(
            ["ip", "netns", "exec", ns, "unshare", "--mount", "--propagation", "private", "--",
             "sh", "-c", script], env=env, cwd=ROOT, stdout=logs[-1], stderr=subprocess.STDOUT,
            start_new_session=True))
        _wait_nodes(address, 2, env)
        yield {"address": address, "env": env, "shared": shared, "host": host, "node_b": node_b,
               "node_b_pid": procs[1].pid, "base": base}
    finally:
        for proc in reversed(procs):
            _stop(proc)
        for log in logs:
            log.close()
        subprocess.run(["ip", "link", "del", veth_a], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def _sweep(nodes: dict, name: str, resources: dict, *extra: str, timeout: float = 400):
    """Run a one-trial sweep as its own driver process on node A, attached to the cluster."""
    path = nodes["base"] / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "name": name, "preset": str(ROOT / "sweeps/presets/tiny_c2i.yaml"),
        "search": {"seed": {"grid": [0]}}, "metric": "eval/world_fid",
        "evaluation": {"metrics": ["world_fid"], "num_images": 32, "cpus_per_actor": 0.25},
        "scaling": {"cpus_per_worker": 1.0, "resources_per_worker": resources},
        "output_dir": str(nodes["shared"] / "sweeps")}))
    cmd = [sys.executable, "-m", "orchestrator.sweep", str(path), "world.spec=test",
           "train.grid_size=4", "train.batch_size=8", "--quiet", "--address", nodes["address"], *extra]
    return subprocess.run(cmd, cwd=ROOT, env=nodes["env"], capture_output=True, text=True,
                          timeout=timeout)


def _the_run(nodes: dict, name: str):
    uri = tracking.sqlite_uri(nodes["shared"] / "sweeps" / "mlflow")
    runs = tracking.children(uri, tracking.find_parent(uri, "softdimo", name).info.run_id)
    assert len(runs) == 1, runs
    return uri, runs[0]


def _attempts(sweep_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (sweep_dir / "trials/t000/attempts.jsonl").read_text().splitlines()]


def _where(nodes: dict, sweep_dir: Path) -> str:
    """Which node ran what and where the files landed (printed; `pytest -s` shows it, LOG.md keeps it)."""
    lines = [f"attempts: {[(a['node'], a['start_step']) for a in _attempts(sweep_dir)]}"]
    for path in sorted(nodes["shared"].rglob("*")):
        rel = path.relative_to(nodes["shared"])
        if path.is_file() and len(rel.parts) <= 6 and "artifacts" not in rel.parts:
            lines.append(f"  shared/{rel}")
    view = Path(f"/proc/{nodes['node_b_pid']}/root") / str(nodes["node_b"]).lstrip("/")
    lines.append(f"node B's private folder: {sorted(str(p.relative_to(view)) for p in view.rglob('*'))}")
    return "\n".join(lines)


def test_a_trial_on_another_node_trains_logs_checkpoints_and_is_evaluated(two_nodes):
    done = _sweep(two_nodes, "nodeb", {"node_b": 1}, "train.steps=6", "train.checkpoint_every=3",
                  "train.log_every=1", "train.keep_checkpoints=2")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-4000:]
    sweep_dir = two_nodes["shared"] / "sweeps" / "nodeb"
    assert [a["node"] for a in _attempts(sweep_dir)] == [NODE_B_IP]    # it ran on node B
    # node B built no world: neither in its own cache nor where node A's cache is (hidden from it);
    # it read the one the driver put on the shared folder
    view = Path(f"/proc/{two_nodes['node_b_pid']}/root")              # node B's mount namespace
    assert not list((view / str(two_nodes["host"]).lstrip("/")).iterdir())
    assert not list((view / str(two_nodes["node_b"]).lstrip("/") / "cache").iterdir())
    assert (two_nodes["shared"] / "sweeps/worlds").is_dir()
    # MLflow heard node B live, at the driver's address: no record waited in a spool (node B's
    # worker warns "unreachable ... spooling" on the driver's stderr when it cannot reach it)
    output = done.stdout + done.stderr
    assert "unreachable" not in output and "replayed" not in output, output[-3000:]
    assert "cannot list placement groups" not in output        # the State API found this cluster
    assert not (sweep_dir / "trials/t000/spool.jsonl").exists()
    uri, run = _the_run(two_nodes, "nodeb")
    assert run.info.status == "FINISHED" and "softdimo.world_build" not in run.data.tags
    assert [s for s, _ in tracking.metric_history(uri, run.info.run_id, "loss/dimo")] == list(range(1, 7))
    assert "eval/world_fid" in run.data.metrics                        # evaluated
    assert json.loads((sweep_dir / "trials/t000/eval.jsonl").read_text().splitlines()[-1])["step"] == 6
    # checkpoints on the shared folder
    assert sorted(p.name for p in (sweep_dir / "train/t000").glob("step_*")) == [
        "step_00000003", "step_00000006"]
    print(_where(two_nodes, sweep_dir))


def test_a_killed_node_s_trial_resumes_on_the_head_and_loses_no_metric(two_nodes):
    # node A's "slot" is held by a placeholder until node B dies, so the trial starts on node B
    hold = ("import ray, sys\nfrom ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy\n"
            "ray.init(address=sys.argv[1], log_to_driver=False)\n"
            "@ray.remote(num_cpus=0, resources={'slot': 1})\nclass Hold:\n    def ok(self): return 1\n"
            "h = Hold.options(scheduling_strategy=NodeAffinitySchedulingStrategy("
            "ray.get_runtime_context().get_node_id(), soft=False)).remote()\n"
            "ray.get(h.ok.remote()); print('held', flush=True); sys.stdin.read()\n")
    holder = subprocess.Popen([sys.executable, "-c", hold, two_nodes["address"]], env=two_nodes["env"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    sweep_dir = two_nodes["shared"] / "sweeps" / "failover"
    killed = []

    def kill_node_b_after_its_first_checkpoint():
        snapshot = sweep_dir / "train/t000/checkpoint_manager_snapshot.json"
        deadline = time.time() + 300
        while time.time() < deadline:
            try:                              # committed by Train, not just being copied
                committed = json.loads(snapshot.read_text())["checkpoint_results"]
            except (OSError, ValueError, KeyError):
                committed = []
            if committed:
                break
            time.sleep(0.05)
        for pid in _node_b_raylets():
            os.kill(pid, signal.SIGKILL)
            killed.append(int(committed[-1]["checkpoint_dir_name"].split("_")[1]))
        holder.stdin.close()              # node A's slot is free: the restart can go there

    try:
        assert holder.stdout.readline().strip() == "held"
        killer = threading.Thread(target=kill_node_b_after_its_first_checkpoint, daemon=True)
        killer.start()
        done = _sweep(two_nodes, "failover", {"slot": 1}, "train.steps=15", "train.checkpoint_every=5",
                      "train.log_every=1", "sweep.failure.max_failures=2")
        killer.join(timeout=5)
    finally:
        if holder.poll() is None:
            holder.kill()
        holder.wait(timeout=30)
    assert killed, "node B's raylet was never killed"
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-4000:]
    attempts = _attempts(sweep_dir)
    assert [a["node"] for a in attempts] == [NODE_B_IP, HOST_IP]
    assert 0 < killed[0] <= attempts[1]["start_step"] < 15                # resumed, not restarted
    result = json.loads((sweep_dir / "trials/t000/result.json").read_text())
    assert result["step"] == 15 and result["resumed_from_step"] == attempts[1]["start_step"]
    uri, run = _the_run(two_nodes, "failover")
    assert run.info.status == "FINISHED"
    assert [s for s, _ in tracking.metric_history(uri, run.info.run_id, "loss/dimo")] == list(range(1, 16))
    assert "eval/world_fid" in run.data.metrics
    print(_where(two_nodes, sweep_dir))
