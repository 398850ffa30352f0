"""orchestrator.tracking against a real MLflow SQLite store: idempotent runs, Tracker and its spool."""
import json
import os
import logging
import time
import warnings

import pytest
from mlflow import MlflowClient
from PIL import Image

from orchestrator import tracking
from orchestrator.tracking import (TAG_KIND, TAG_SWEEP, TAG_TRIAL, Tracker, TrackingOfflineWarning,
                                   children, ensure_experiment, find_parent, finish_run,
                                   flatten_params, get_or_create_child, get_or_create_parent,
                                   metric_history, replay_spool)


@pytest.fixture(autouse=True)
def _restore_http_env(monkeypatch):
    """The Tracker sets MLflow's HTTP retry/timeout variables; undo that after each test."""
    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def uri(tmp_path_factory):
    """One store for the module: creating the schema takes about 2 s, so it is done once, here."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('store')}/mlflow.db"
    MlflowClient(uri).search_experiments()
    return uri


@pytest.fixture
def exp(uri, request):
    return ensure_experiment(uri, request.node.name)


@pytest.fixture
def run_id(uri, exp):
    return MlflowClient(uri).create_run(exp, run_name="r").info.run_id


def png(path, color=(255, 0, 0)):
    Image.new("RGB", (8, 8), color).save(path)
    return path


class FlakyClient:
    """A real MlflowClient whose calls raise ConnectionError while ``down`` (fault injection)."""

    def __init__(self, uri):
        self.real, self.down, self.failed, self.sent = MlflowClient(uri), False, 0, []

    def __getattr__(self, name):
        method = getattr(self.real, name)

        def call(*args, **kwargs):
            if self.down:
                self.failed += 1
                raise ConnectionError("connection refused")
            self.sent.append((name, [m.step for m in kwargs.get("metrics", ())]))
            return method(*args, **kwargs)
        return call


class Clock:
    """tracking's ``time`` module with a monotonic clock the test moves by hand."""

    def __init__(self):
        self.now = 0.0

    def monotonic(self):
        return self.now

    def __getattr__(self, name):
        return getattr(time, name)


def test_flatten_params_values():
    resolved = {"seed": 3, "gan": {"mask_range": [0.0, 0.5], "weight": 0.1},
                "dimo": {"mask_clamp": None, "soft_input": False},
                "reward": {"terms": [{"name": "clip", "weight": 1.0}], "weight": 0.0},
                "generator": {"init_mask_ratio": [0.6]}, "empty": []}
    assert flatten_params(resolved) == {
        "seed": "3", "gan.mask_range": "[0.0, 0.5]", "gan.weight": "0.1",
        "dimo.mask_clamp": "None", "dimo.soft_input": "False",
        "reward.terms": '[{"name":"clip","weight":1.0}]', "reward.weight": "0.0",
        "generator.init_mask_ratio": "[0.6]", "empty": "[]"}


def test_ensure_experiment_is_idempotent_and_restores_deleted(uri, tmp_path, monkeypatch):
    first = ensure_experiment(uri, "idem")
    assert ensure_experiment(uri, "idem") == first
    client = MlflowClient(uri)
    # Without an explicit location, artifacts sit next to the SQLite file, not in ./mlruns.
    db_dir = uri[len("sqlite:///"):].rsplit("/", 1)[0]
    assert client.get_experiment(first).artifact_location == f"{db_dir}/artifacts"
    client.delete_experiment(first)
    assert ensure_experiment(uri, "idem") == first
    assert client.get_experiment(first).lifecycle_stage == "active"
    other = ensure_experiment(uri, "located", artifact_location=str(tmp_path / "a"))
    assert client.get_experiment(other).artifact_location == str(tmp_path / "a")
    monkeypatch.chdir(tmp_path)
    relative = ensure_experiment(uri, "relative", artifact_location="rel/artifacts")
    assert client.get_experiment(relative).artifact_location == str(tmp_path / "rel" / "artifacts")


def test_parent_and_children_are_created_once_and_found_again(uri, exp):
    client = MlflowClient(uri)
    parent = get_or_create_parent(uri, exp, "sw", tags={"git": "abc"})
    run = client.get_run(parent)
    assert run.info.run_name == "sweep:sw"
    assert run.data.tags[TAG_SWEEP] == "sw" and run.data.tags[TAG_KIND] == "sweep"
    finish_run(uri, parent, "KILLED")
    assert get_or_create_parent(uri, exp, "sw") == parent          # resume: same parent ...
    assert client.get_run(parent).info.status == "RUNNING"          # ... running again
    assert get_or_create_parent(uri, exp, "other") != parent

    params = {f"p{i:03d}": str(i) for i in range(250)}             # > 100: several batches
    late = get_or_create_child(uri, exp, parent, "sw", "t001", "t001 b", {"a": "1"})
    child = get_or_create_child(uri, exp, parent, "sw", "t000", "t000 a", params,
                                tags={"ray.trial_id": "x1"})
    finish_run(uri, child, "FAILED")
    again = get_or_create_child(uri, exp, parent, "sw", "t000", "t000 a",
                                {**params, "p000": "changed", "new": "yes"},
                                tags={"ray.trial_id": "x2"})
    assert again == child
    run = client.get_run(child)
    assert run.info.status == "RUNNING"
    assert run.data.params == {**params, "new": "yes"}             # write-once: first value stays
    assert run.data.tags["ray.trial_id"] == "x2"
    assert run.data.tags["mlflow.parentRunId"] == parent and run.data.tags[TAG_TRIAL] == "t000"
    assert [r.info.run_id for r in children(uri, parent)] == [child, late]
    assert children(uri, get_or_create_parent(uri, exp, "other")) == []

    assert find_parent(uri, exp_name(client, exp), "sw").info.run_id == parent
    assert find_parent(uri, "no such experiment", parent).info.run_id == parent
    with pytest.raises(LookupError, match="nope: no sweep or parent run"):
        find_parent(uri, exp_name(client, exp), "nope")
    with pytest.raises(ValueError, match="status must be one of"):
        finish_run(uri, child, "DONE")


def exp_name(client, exp_id):
    return client.get_experiment(exp_id).name


def test_metric_history_sorted_by_step_last_value_wins(uri, run_id):
    client = MlflowClient(uri)
    for step, value in [(5, 0.5), (1, 0.1), (5, 0.55)]:
        client.log_metric(run_id, "loss/dimo", value, step=step)
        time.sleep(0.002)   # distinct timestamps
    assert metric_history(uri, run_id, "loss/dimo") == [(1, 0.1), (5, 0.55)]


def test_tracker_logs_metrics_images_text_and_tags(uri, run_id, tmp_path):
    tracker = Tracker(uri, run_id, tmp_path / "spool.jsonl")
    for step in range(3):
        tracker.log_metrics(step, {"loss/dimo": 1.0 / (step + 1), "images_seen": 32 * step})
    tracker.log_image(png(tmp_path / "grid.png"), "samples", step=2)
    tracker.log_text("seed: 0\n", "config.yaml")
    tracker.log_artifact(png(tmp_path / "extra.png"), "samples")
    tracker.set_tags({"checkpoint.last": "/x/step_00000002"})
    assert tracker.close("FINISHED") is True
    client = MlflowClient(uri)
    assert metric_history(uri, run_id, "loss/dimo") == [(0, 1.0), (1, 0.5), (2, 1 / 3)]
    assert metric_history(uri, run_id, "images_seen") == [(0, 0), (1, 32), (2, 64)]
    images = [f.path for f in client.list_artifacts(run_id, "images")]
    assert any(p.startswith("images/samples+step+2+") and p.endswith(".png") for p in images)
    assert {f.path for f in client.list_artifacts(run_id)} >= {"config.yaml", "samples"}
    assert client.download_artifacts(run_id, "config.yaml", str(tmp_path)).endswith("config.yaml")
    assert (tmp_path / "config.yaml").read_text() == "seed: 0\n"
    run = client.get_run(run_id)
    assert run.data.tags["checkpoint.last"] == "/x/step_00000002"
    assert run.info.status == "FINISHED"
    assert not (tmp_path / "spool.jsonl").exists()


def test_tracker_survives_an_outage_and_replays_in_order(uri, run_id, tmp_path, caplog,
                                                        monkeypatch):
    clock = Clock()
    monkeypatch.setattr(tracking.spool, "time", clock)
    flaky = FlakyClient(uri)
    spool = tmp_path / "spool.jsonl"
    tracker = Tracker(uri, run_id, spool, retry_every_s=30, client=flaky)
    tracker.log_metrics(0, {"loss/total": 0.0})
    flaky.down = True
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(1, 6):
            tracker.log_metrics(step, {"loss/total": float(step)})
            clock.now += 5                      # less than the retry interval in all
        tracker.log_text("notes", "notes/a.txt")
    assert [w.category for w in caught] == [TrackingOfflineWarning]
    assert flaky.failed == 1                    # offline: no further network attempts
    records = [json.loads(line) for line in spool.read_text().splitlines()]
    assert [r["step"] for r in records[:5]] == [1, 2, 3, 4, 5]
    assert records[5]["kind"] == "artifact" and records[5]["artifact_path"] == "notes"
    assert tracker.flush() is False and flaky.failed == 2   # flush tries at once; still down

    flaky.down = False
    clock.now += 40                             # the retry interval passes
    with caplog.at_level(logging.INFO, logger="orchestrator.tracking"):
        tracker.log_metrics(6, {"loss/total": 6.0})
    assert "back online, replayed 6 records" in caplog.text
    assert not spool.exists() and not (tmp_path / "spool.jsonl.files").exists()
    # The five spooled metrics records went in one batch, in order, before step 6.
    assert [s for name, s in flaky.sent if name == "log_batch"] == [[0], [1, 2, 3, 4, 5], [6]]
    history = MlflowClient(uri).get_metric_history(run_id, "loss/total")
    assert sorted((m.step, m.value) for m in history) == [(s, float(s)) for s in range(7)]
    by_step = {m.step: m.timestamp for m in history}
    assert [by_step[s] for s in range(7)] == sorted(by_step.values())   # logged, not replayed, times
    assert [f.path for f in MlflowClient(uri).list_artifacts(run_id, "notes")] == ["notes/a.txt"]
    assert tracker.flush() is True


def test_replay_spool_of_a_leftover_file(uri, run_id, tmp_path):
    flaky = FlakyClient(uri)
    flaky.down = True
    spool = tmp_path / "trial" / "spool.jsonl"
    tracker = Tracker(uri, run_id, spool, client=flaky)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TrackingOfflineWarning)
        tracker.log_metrics(10, {"ema/entropy": 1.5})
        tracker.log_image(png(tmp_path / "g.png"), "samples", step=10)
        tracker.log_text("final", "result.txt")
        tracker.log_metrics(20, {"ema/entropy": 1.25})
    assert len(spool.read_text().splitlines()) == 4      # the process "ends" here, offline

    assert replay_spool(uri, run_id, spool) == 4
    assert not spool.exists() and not spool.with_name("spool.jsonl.files").exists()
    assert metric_history(uri, run_id, "ema/entropy") == [(10, 1.5), (20, 1.25)]
    paths = {f.path for f in MlflowClient(uri).list_artifacts(run_id)}
    assert "result.txt" in paths and "images" in paths
    assert replay_spool(uri, run_id, spool) == 0          # nothing left: a no-op


def test_tracker_replays_a_leftover_spool_first_and_drops_unsendable_records(uri, run_id, tmp_path,
                                                                          caplog):
    spool = tmp_path / "spool.jsonl"
    spool.write_text(json.dumps({"kind": "metrics", "step": 1, "timestamp": 1000,
                                 "metrics": {"reward/clip": 0.25}}) + "\n" + '{"kind": "metr')
    tracker = Tracker(uri, run_id, spool)
    with caplog.at_level(logging.WARNING, logger="orchestrator.tracking"):
        tracker.log_artifact(tmp_path / "missing.png")   # can never be sent: dropped, not spooled
        tracker.log_metrics(2, {"reward/clip": 0.5})
    assert "unreadable spool line" in caplog.text and "missing.png: file not found" in caplog.text
    assert not spool.exists()
    assert metric_history(uri, run_id, "reward/clip") == [(1, 0.25), (2, 0.5)]


def test_tracker_sets_fail_fast_http_defaults_without_overriding_the_user(uri, run_id, tmp_path,
                                                                         monkeypatch):
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "33")
    Tracker(uri, run_id, tmp_path / "s.jsonl")
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "1"
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "33"
    assert tracking.STATUSES == ("FINISHED", "FAILED", "KILLED")
