"""MLflow tracking for sweeps: the only package that imports mlflow (the Tracker is in ``spool.py``).

Everything goes through ``MlflowClient`` with explicit run ids (no global ``mlflow.start_run`` or
autolog state, which Ray workers would share by accident). Parent run = one sweep, child run = one
trial, both found again by tags so a resumed sweep reuses them. ``Tracker`` is what rank 0 logs
through: a tracking outage never raises and never loses data; records wait in a JSONL spool file
and are replayed in order when the server answers again. ``LocalServer`` runs ``mlflow server`` on
a local SQLite store, because several processes writing to one fresh SQLite file race its migration.
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Param, RunTag, ViewType
from mlflow.exceptions import MlflowException

from orchestrator.tracking import spool

# the Tracker and its spool live in spool.py; callers use them from here
Tracker, TrackingOfflineWarning, replay_spool = spool.Tracker, spool.TrackingOfflineWarning, spool.replay_spool
_client, logger = spool.mlflow_client, spool.logger

TAG_SWEEP = "softdimo.sweep"
TAG_KIND = "softdimo.kind"
TAG_TRIAL = "softdimo.trial"
TAG_STAGE = "softdimo.stage"      # "student" (the two-stage recipe's first stage) or "search"
TAG_RAY_TRIAL = "ray.trial_id"
TAG_PARENT = "mlflow.parentRunId"
STATUSES = ("FINISHED", "FAILED", "KILLED")
BATCH = 100                 # params per log_batch (MLflow allows 100 params per request)


def flatten_params(resolved: dict, prefix: str = "") -> dict[str, str]:
    """Dotted keys -> text: lists of scalars as Python list text, lists of dicts as compact JSON."""
    out: dict[str, str] = {}
    for key, value in resolved.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten_params(value, f"{name}."))
        elif isinstance(value, (list, tuple)) and any(isinstance(v, dict) for v in value):
            out[name] = json.dumps(list(value), separators=(",", ":"))
        elif isinstance(value, (list, tuple)):
            out[name] = str(list(value))
        else:
            out[name] = str(value)
    return out


def default_store(output_root: Path) -> Path:
    return Path(output_root) / "mlflow"


def sqlite_uri(store: Path) -> str:
    """The tracking URI that reads a local store directly (no server needed)."""
    return f"sqlite:///{Path(store).resolve() / 'mlflow.db'}"


def ui_command(store: Path) -> str:
    store = Path(store).resolve()
    return (f"mlflow server --backend-store-uri {shlex.quote(sqlite_uri(store))} "
            f"--default-artifact-root {shlex.quote(str(store / 'artifacts'))} "
            "--host 127.0.0.1 --port 5000")


class LocalServer:
    """``mlflow server`` on ``<store>/mlflow.db`` + ``<store>/artifacts``, in its own process group
    led by ``orchestrator.tracking.watchdog``, which stops the server when this process dies.

    ``host`` is the address it listens on and the one its URI names: 127.0.0.1 when every client
    runs on this machine, the node's own address when Ray nodes elsewhere log to it.
    """

    def __init__(self, store: Path, port: int, process: subprocess.Popen, host: str = "127.0.0.1"):
        self.store, self.port, self.process, self.host = store, port, process, host
        self.uri = f"http://{host}:{port}"

    @classmethod
    def start(cls, store: Path, port: int | None = None, timeout: float = 90,
              host: str = "127.0.0.1", artifacts: str | None = None,
              env: dict | None = None) -> "LocalServer":
        """``host``: the address it listens on (a cluster's driver node, not loopback, when trials
        run on other nodes); ``artifacts``: an object-storage URI (s3://...) the server writes
        artifacts to, clients sending them through it (only the server needs credentials);
        ``env``: for its S3 client."""
        store = Path(store).resolve()
        (store / "artifacts").mkdir(parents=True, exist_ok=True)
        # Create the schema here, before the server (and any worker) touches the file.
        _client(sqlite_uri(store)).search_experiments(max_results=1)
        if not port:
            with socket.socket() as sock:
                sock.bind((host, 0))
                port = sock.getsockname()[1]
        log_path = store / "server.log"
        # under the watchdog: the server ends with this process even when it is SIGKILLed
        cmd = [sys.executable, str(Path(__file__).with_name("watchdog.py")), "--",
               sys.executable, "-m", "mlflow", "server", "--backend-store-uri", sqlite_uri(store),
               *(["--serve-artifacts", "--artifacts-destination", artifacts] if artifacts else
                 ["--default-artifact-root", str(store / "artifacts")]),
               "--host", host, "--port", str(port), "--workers", "1"]
        if host != "127.0.0.1":     # MLflow's DNS-rebinding guard admits localhost and private IPs
            cmd += ["--allowed-hosts", f"{host},{host}:{port},localhost,localhost:{port},127.0.0.1,"
                    f"127.0.0.1:{port}"]
        env = {**os.environ, **(env or {}), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        with open(log_path, "ab") as log:
            process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
        server = cls(store, port, process, host)
        deadline = time.monotonic() + timeout
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"mlflow server exited with code {process.returncode}; "
                                   f"see {log_path}")
            try:
                with opener.open(f"{server.uri}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return server
            except OSError:
                pass
            time.sleep(0.25)
        server.stop()
        raise RuntimeError(f"mlflow server did not answer {server.uri}/health within {timeout:g} s; "
                           f"see {log_path}")

    def stop(self) -> None:
        """SIGTERM to the whole process group (uvicorn runs as a child), SIGKILL after 10 s."""
        for sig in (signal.SIGTERM, signal.SIGKILL):  # SIGKILL also ends stragglers holding the port
            try:
                os.killpg(self.process.pid, sig)
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            except ProcessLookupError:
                return

    def __enter__(self) -> "LocalServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def ensure_experiment(uri: str, name: str, artifact_location: str | None = None) -> str:
    """The experiment's id; created if missing. Local artifact paths are made absolute (workers
    run in other folders); a SQLite store's default is ``<db folder>/artifacts``, not ./mlruns."""
    client = _client(uri)
    exp = client.get_experiment_by_name(name)
    if exp is None:
        if artifact_location is None and uri.startswith("sqlite:///"):
            artifact_location = str(Path(uri[len("sqlite:///"):]).parent / "artifacts")
        if artifact_location and ":" not in artifact_location:
            artifact_location = str(Path(artifact_location).resolve())
        try:
            return client.create_experiment(name, artifact_location)
        except MlflowException:  # created meanwhile by another process
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp.experiment_id)
    return exp.experiment_id


def _quoted(value: str) -> str:
    if "'" in value or "\\" in value:
        raise ValueError(f"{value!r}: quotes and backslashes are not allowed in sweep/trial names")
    return f"'{value}'"


def _newest(client: MlflowClient, experiment_id: str, filt: str):
    runs = client.search_runs([experiment_id], filt, ViewType.ACTIVE_ONLY, max_results=1,
                              order_by=["attributes.start_time DESC"])
    return runs[0] if runs else None


def _parent_filter(sweep_name: str) -> str:
    return f"tags.`{TAG_SWEEP}` = {_quoted(sweep_name)} and tags.`{TAG_KIND}` = 'sweep'"


def get_or_create_parent(uri: str, experiment_id: str, sweep_name: str,
                         tags: dict | None = None) -> str:
    client = _client(uri)
    found = _newest(client, experiment_id, _parent_filter(sweep_name))
    if found is None:
        run = client.create_run(experiment_id, run_name=f"sweep:{sweep_name}",
                                tags={**(tags or {}), TAG_SWEEP: sweep_name, TAG_KIND: "sweep"})
        return run.info.run_id
    _reopen(client, found.info.run_id, tags)
    return found.info.run_id


def get_or_create_child(uri: str, experiment_id: str, parent_id: str, sweep_name: str,
                        trial_key: str, run_name: str, params: dict[str, str],
                        tags: dict | None = None) -> str:
    """The trial's run under ``parent_id`` (created once); logs only params not yet there."""
    client = _client(uri)
    filt = f"tags.`{TAG_PARENT}` = {_quoted(parent_id)} and tags.`{TAG_TRIAL}` = {_quoted(trial_key)}"
    run = _newest(client, experiment_id, filt)
    if run is None:
        run = client.create_run(experiment_id, run_name=run_name, tags={
            **(tags or {}), TAG_PARENT: parent_id, TAG_SWEEP: sweep_name, TAG_KIND: "trial",
            TAG_TRIAL: trial_key})
    else:
        _reopen(client, run.info.run_id, tags)
    run_id, have = run.info.run_id, run.data.params
    changed = sorted(k for k, v in params.items() if k in have and have[k] != str(v))
    if changed:  # MLflow params are write-once; the first value stays
        logger.warning("run %s keeps its logged values of changed params: %s", run_id,
                       ", ".join(changed))
    new = [Param(k, str(v)) for k, v in params.items() if k not in have]
    for i in range(0, len(new), BATCH):
        client.log_batch(run_id, params=new[i:i + BATCH])
    return run_id


def _reopen(client: MlflowClient, run_id: str, tags: dict | None) -> None:
    """A resumed run: refresh its tags and mark it RUNNING again."""
    if tags:
        client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
    client.update_run(run_id, status="RUNNING")


def finish_run(uri: str, run_id: str, status: str) -> None:
    if status not in STATUSES:
        raise ValueError(f"status must be one of {', '.join(STATUSES)}, got {status!r}")
    _client(uri).set_terminated(run_id, status)


def children(uri: str, parent_id: str) -> list:
    """Child runs of a parent (tag mlflow.parentRunId), sorted by trial key."""
    client = _client(uri)
    exp_id = client.get_run(parent_id).info.experiment_id
    runs, token = [], None
    while True:
        page = client.search_runs([exp_id], f"tags.`{TAG_PARENT}` = {_quoted(parent_id)}",
                                  ViewType.ACTIVE_ONLY, 1000, page_token=token)
        runs, token = runs + list(page), page.token
        if not token:
            break
    return sorted(runs, key=lambda r: (r.data.tags.get(TAG_TRIAL, ""), r.info.run_name or ""))


def find_parent(uri: str, experiment_name: str, sweep_or_run: str):
    """The parent run given its run id or its sweep name (then the newest one); else LookupError."""
    client = _client(uri)
    if len(sweep_or_run) == 32 and all(c in "0123456789abcdef" for c in sweep_or_run):
        try:
            return client.get_run(sweep_or_run)
        except MlflowException:
            pass
    exp = client.get_experiment_by_name(experiment_name)
    if exp is None:
        raise LookupError(f"{sweep_or_run}: no MLflow experiment {experiment_name!r} at {uri}")
    try:
        found = _newest(client, exp.experiment_id, _parent_filter(sweep_or_run))
    except ValueError as err:
        raise LookupError(str(err)) from None
    if found is None:
        raise LookupError(f"{sweep_or_run}: no sweep or parent run of that name in experiment "
                          f"{experiment_name!r} at {uri}")
    return found


def metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) sorted by step; a step logged twice (e.g. after a resume) keeps its last value."""
    history = sorted(_client(uri).get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
    return sorted({m.step: m.value for m in history}.items())


def log_files(uri: str, run_id: str, paths: list[Path], artifact_path: str | None = None) -> None:
    client = _client(uri)
    for path in paths:
        client.log_artifact(run_id, str(path), artifact_path)


def log_run(uri: str, experiment: str, run_name: str, params: dict, metrics: dict,
            folders: list[tuple[Path, str]]) -> str:
    """A one-off finished run (e.g. a generation): params, metrics at step 0, folders as artifacts."""
    client = _client(uri)
    run = client.create_run(ensure_experiment(uri, experiment), run_name=run_name)
    run_id = run.info.run_id
    for key, value in params.items():
        client.log_param(run_id, key, str(value))
    for key, value in metrics.items():
        client.log_metric(run_id, key, float(value), step=0)
    for folder, artifact_path in folders:
        client.log_artifacts(run_id, str(folder), artifact_path)
    client.set_terminated(run_id, "FINISHED")
    return run_id
