"""The Tracker: rank-0 logging into one MLflow run that never raises and spools while MLflow is away.

Records (metrics, images, artifacts, text, tags, status) go to the server at once; when it cannot
be reached they are appended to a JSONL spool and replayed in order when it answers again (or by
``replay_spool`` from a later process). Errors that retrying cannot fix drop the record with a
warning instead of blocking the spool.
"""
from __future__ import annotations

import json
import logging
import os
import time
import uuid
import warnings
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Metric, RunTag
from mlflow.exceptions import MlflowException

METRIC_BATCH = 1000         # metrics per log_batch (MLflow's limit)
# Errors that retrying cannot fix: the record is dropped with a warning instead of blocking the spool.
PERMANENT_CODES = {"INVALID_PARAMETER_VALUE", "BAD_REQUEST", "RESOURCE_ALREADY_EXISTS",
                   "RESOURCE_DOES_NOT_EXIST"}
logger = logging.getLogger(__name__)


def mlflow_client(uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=uri)


class TrackingOfflineWarning(UserWarning):
    """Emitted once when a Tracker loses its tracking server and starts spooling."""


def _is_permanent(err: Exception) -> bool:
    """Retrying cannot help (bad value, missing file): drop the record rather than block the spool."""
    if isinstance(err, MlflowException):
        return err.error_code in PERMANENT_CODES
    return isinstance(err, (TypeError, ValueError))


def _send(client, run_id: str, records: list[dict]) -> None:
    """Send one record, or a run of metrics records as one log_batch per 1000 metrics."""
    if records[0]["kind"] == "metrics":
        metrics = [Metric(k, float(v), r["timestamp"], r["step"])
                   for r in records for k, v in r["metrics"].items()]
        for i in range(0, len(metrics), METRIC_BATCH):
            client.log_batch(run_id, metrics=metrics[i:i + METRIC_BATCH])
        return
    rec = records[0]
    kind = rec["kind"]
    if kind in ("image", "artifact") and not Path(rec["path"]).exists():
        raise ValueError(f"{rec['path']}: file not found")
    if kind == "image":
        from PIL import Image
        try:
            with Image.open(rec["path"]) as img:
                img = img.convert("RGBA" if "A" in img.getbands() else "RGB")
        except OSError as err:
            raise ValueError(f"{rec['path']}: not an image ({err})") from None
        client.log_image(run_id, img, key=rec["key"], step=rec["step"], timestamp=rec["timestamp"])
    elif kind == "artifact" and Path(rec["path"]).is_dir():
        client.log_artifacts(run_id, rec["path"], rec.get("artifact_path"))
    elif kind == "artifact":
        client.log_artifact(run_id, rec["path"], rec.get("artifact_path"))
    elif kind == "text":
        client.log_text(run_id, rec["text"], rec["artifact_file"])
    elif kind == "tags":
        client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in rec["tags"].items()])
    elif kind == "status":
        client.set_terminated(run_id, rec["status"])
    else:
        raise ValueError(f"unknown record kind {kind!r}")
    if rec.get("owned"):  # a log_text file the spool wrote: no longer needed
        Path(rec["path"]).unlink(missing_ok=True)
        for folder in (Path(rec["path"]).parent, Path(rec["path"]).parent.parent):
            if not any(folder.iterdir()):
                folder.rmdir()


def _replay_file(client, run_id: str, spool: Path) -> tuple[int, Exception | None]:
    """Send a spool in order; on a transient failure keep the unsent records. -> (sent, error)."""
    records = []
    for n, line in enumerate(spool.read_text().splitlines() if spool.exists() else [], 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short when the process died mid-write
            logger.warning("%s:%d: skipping an unreadable spool line", spool, n)
    sent, i = 0, 0
    while i < len(records):
        j = i + 1   # consecutive metrics records go together (one request per 1000 metrics)
        while records[i]["kind"] == "metrics" and j < len(records) and j - i < 100 \
                and records[j]["kind"] == "metrics":
            j += 1
        try:
            _send(client, run_id, records[i:j])
            sent += j - i
        except Exception as err:
            if not _is_permanent(err):
                spool.write_text("".join(json.dumps(r) + "\n" for r in records[i:]))
                return sent, err
            logger.warning("dropping %d spooled %s record(s) for run %s: %s", j - i,
                           records[i]["kind"], run_id, err)
        i = j
    spool.unlink(missing_ok=True)
    return sent, None


def replay_spool(uri: str, run_id: str, spool: Path) -> int:
    """Replay a leftover spool file; removes it when everything went through. -> records sent."""
    sent, err = _replay_file(mlflow_client(uri), run_id, Path(spool))
    if err is not None:
        logger.warning("replayed %d records of %s, then failed (%s); the rest stays there",
                       sent, spool, _short(err))
    return sent


def _short(err: Exception) -> str:
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    return text if len(text) <= 200 else text[:200] + "..."


class Tracker:
    """Rank-0 logging into one run: never raises, spools records while the server is away."""

    def __init__(self, uri: str, run_id: str, spool: Path, retry_every_s: float = 30.0,
                 client=None):
        # Fail fast (MLflow's default is 7 retries with exponential backoff, minutes per call);
        # mlflow reads these per request. A user's own setting wins.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self.uri, self.run_id, self.spool = uri, run_id, Path(spool)
        self.retry_every_s = retry_every_s
        self.client = client if client is not None else mlflow_client(uri)
        self.offline = False
        self._next_try = 0.0
        self._pending = self.spool.exists()   # a spool left by an earlier process is replayed too

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self._submit({"kind": "metrics", "step": int(step), "timestamp": int(time.time() * 1000),
                      "metrics": {k: float(v) for k, v in metrics.items()}})

    def log_image(self, path: Path, key: str, step: int) -> None:
        """A PNG as an MLflow image (``images/<key>+step+<step>...``, step slider in the UI)."""
        self._submit({"kind": "image", "path": str(Path(path).resolve()), "key": key,
                      "step": int(step), "timestamp": int(time.time() * 1000)})

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self._submit({"kind": "artifact", "path": str(Path(path).resolve()),
                      "artifact_path": artifact_path})

    def log_text(self, text: str, artifact_file: str) -> None:
        self._submit({"kind": "text", "text": text, "artifact_file": artifact_file})

    def set_tags(self, tags: dict) -> None:
        self._submit({"kind": "tags", "tags": {k: str(v) for k, v in tags.items()}})

    def flush(self) -> bool:
        """Try to replay the spool now (ignoring the retry interval). True when nothing is pending."""
        try:
            if self._pending:
                self._replay()
        except Exception:  # e.g. the spool's disk is gone; never raise into training
            logger.exception("replaying %s failed", self.spool)
        return not self._pending

    def close(self, status: str | None = None) -> bool:
        """Flush, then end the run with ``status`` (spooled too if the server is away)."""
        if status is not None:
            self._next_try = 0.0
            self._submit({"kind": "status", "status": status})
        return self.flush()

    def _submit(self, record: dict) -> None:
        try:
            if self.offline and time.monotonic() < self._next_try:
                self._append(record)
                return
            if self._pending and not self._replay():
                self._append(record)
                return
            try:
                _send(self.client, self.run_id, [record])
                self.offline = False
            except Exception as err:
                if _is_permanent(err):
                    logger.warning("dropping %s record for run %s: %s", record["kind"],
                                   self.run_id, _short(err))
                    return
                self._go_offline(err)
                self._append(record)
        except Exception:  # last resort: tracking must never stop training
            logger.exception("tracking record lost for run %s", self.run_id)

    def _replay(self) -> bool:
        sent, err = _replay_file(self.client, self.run_id, self.spool)
        if err is not None:
            self._go_offline(err)
            return False
        self._pending = False
        if self.offline or sent:
            logger.warning("MLflow tracking at %s back online, replayed %d records for run %s",
                           self.uri, sent, self.run_id)
        self.offline = False
        return True

    def _go_offline(self, err: Exception) -> None:
        if not self.offline:
            warnings.warn(f"MLflow tracking at {self.uri} unreachable ({_short(err)}); spooling "
                          f"to {self.spool}, retrying every {self.retry_every_s:g} s",
                          TrackingOfflineWarning, stacklevel=4)
        self.offline = True
        self._next_try = time.monotonic() + self.retry_every_s

    def _append(self, record: dict) -> None:
        if record["kind"] == "text":  # the spool keeps artifacts as files
            folder = self.spool.with_name(self.spool.name + ".files") / uuid.uuid4().hex[:12]
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / Path(record["artifact_file"]).name
            path.write_text(record["text"])
            parent = str(Path(record["artifact_file"]).parent)
            record = {"kind": "artifact", "path": str(path), "owned": True,
                      "artifact_path": None if parent == "." else parent}
        self.spool.parent.mkdir(parents=True, exist_ok=True)
        with open(self.spool, "a") as f:
            f.write(json.dumps(record) + "\n")
        self._pending = True
