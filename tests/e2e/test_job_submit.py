"""The cluster path: a local Ray head (`ray start --head`), `ray job submit` of a tiny sweep."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from orchestrator import tracking

ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, head: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if head.poll() is not None:
            raise RuntimeError("ray start --head exited early")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:      # answering (401 without the auth token): it is up
            return
        except OSError:
            time.sleep(1)
    raise TimeoutError(url)


@pytest.fixture
def ray_head(test_world):
    """A head node of its own (own temp dir and ports); --block ties its processes to this one."""
    temp = tempfile.mkdtemp(prefix="rayjob", dir="/tmp")   # short: Ray's socket paths have a limit
    dashboard = _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    log = open(Path(temp) / "head.log", "w")
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--port={_free_port()}", "--num-cpus=2",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--disable-usage-stats",
         f"--temp-dir={temp}"], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        address = f"http://127.0.0.1:{dashboard}"
        _wait_http(f"{address}/api/version", head)
        yield address, env
    finally:
        head.send_signal(signal.SIGTERM)    # --block: the head stops every process it started
        try:
            head.wait(timeout=10)
        except subprocess.TimeoutExpired:   # its processes share the session's process group
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=30)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_job_submit_runs_a_sweep_on_the_cluster(ray_head, tmp_path):
    address, env = ray_head
    runtime_env = {"excludes": ["runs", ".git", "*.egg-info", "__pycache__", ".pytest_cache"],
                   "env_vars": {"OMP_NUM_THREADS": "1", "SOFTDIMO_CACHE": os.environ["SOFTDIMO_CACHE"]}}
    out = tmp_path / "sweeps"
    sub = subprocess.run(
        [RAY, "job", "submit", "--address", address, "--working-dir", str(ROOT),
         "--runtime-env-json", json.dumps(runtime_env), "--",
         "python", "-m", "orchestrator.sweep", "sweeps/embedding.yaml", "world.spec=test",
         "train.steps=2", "train.checkpoint_every=1", "train.log_every=1", "train.grid_size=4",
         "train.batch_size=8", "sweep.evaluation.num_images=0", "sweep.evaluation.metrics=[]",
         "sweep.metric=loss/dimo", "sweep.search.embedding.kind={grid: [gumbel_st]}",
         f"sweep.output_dir={out}",
         f"sweep.tracking.uri=sqlite:///{out}/mlflow.db", "sweep.max_concurrent_trials=2", "--quiet"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=800)
    assert sub.returncode == 0, sub.stdout[-3000:] + sub.stderr[-3000:]
    assert "succeeded" in sub.stdout and "sweep folder" in sub.stdout     # the job's own output
    result = json.loads((out / "embedding/trials/t000/result.json").read_text())
    assert result["step"] == 2
    uri = f"sqlite:///{out}/mlflow.db"
    parent = tracking.find_parent(uri, "softdimo", "embedding")
    runs = tracking.children(uri, parent.info.run_id)
    assert [r.data.params["embedding.kind"] for r in runs] == ["gumbel_st"]
