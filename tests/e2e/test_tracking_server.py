"""A real `mlflow server` outage: the Tracker spools while it is down and replays after a restart."""
import time
import urllib.request
import warnings

import pytest

from orchestrator.tracking import (LocalServer, Tracker, TrackingOfflineWarning, children,
                                   ensure_experiment, get_or_create_child, get_or_create_parent,
                                   metric_history, sqlite_uri)


@pytest.fixture(autouse=True)
def _restore_http_env(monkeypatch):
    """The Tracker sets MLflow's HTTP retry/timeout variables; undo that after the test."""
    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.timeout(120)
def test_tracker_rides_out_a_server_restart(tmp_path):
    store = tmp_path / "mlflow"
    server = LocalServer.start(store)
    try:
        with urllib.request.urlopen(f"{server.uri}/health", timeout=5) as resp:
            assert resp.status == 200 and resp.read().strip() == b"OK"
        exp = ensure_experiment(server.uri, "softdimo")
        parent = get_or_create_parent(server.uri, exp, "outage")
        child = get_or_create_child(server.uri, exp, parent, "outage", "t000", "t000 base",
                                    {"gan.weight": "0.1"})
        tracker = Tracker(server.uri, child, tmp_path / "spool.jsonl", retry_every_s=3600)
        for step in range(3):
            tracker.log_metrics(step, {"loss/dimo": float(step)})
        port = server.port
        server.stop()                                   # a real outage

        start = time.monotonic()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for step in range(3, 8):
                tracker.log_metrics(step, {"loss/dimo": float(step)})
        assert time.monotonic() - start < 5             # fail fast, then no network while offline
        assert [w.category for w in caught] == [TrackingOfflineWarning]
        assert len((tmp_path / "spool.jsonl").read_text().splitlines()) == 5

        server = LocalServer.start(store, port=port)   # same store, same URI
        assert tracker.flush() is True
        assert tracker.close("FINISHED") is True
    finally:
        server.stop()
    local = sqlite_uri(store)
    assert metric_history(local, child, "loss/dimo") == [(s, float(s)) for s in range(8)]
    [run] = children(local, parent)
    assert run.info.run_id == child and run.info.status == "FINISHED"
    assert (store / "server.log").read_text().count("Application startup complete") == 2
