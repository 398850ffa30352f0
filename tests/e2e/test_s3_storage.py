"""A sweep whose output_dir is object storage: a real S3-compatible server (moto's) on loopback.

The driver is SIGKILLed mid-sweep and resumed; afterwards every file the sweep layout names, the
Ray Train checkpoints, the evaluation snapshots, Tune's state and the MLflow artifacts are objects
in the bucket, the results are complete and the checkpoints verify against their checksums.
"""
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator import tracking
from tests.e2e.test_sweep import ROOT, _wait, mlflow_children, one_trial_sweep, tiny

BUCKET, PREFIX = "softdimo-test", "sweeps"
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture
def s3(monkeypatch):
    """moto's S3 server on a free loopback port; the AWS variables every process reads."""
    pytest.importorskip("boto3")
    server_mod = pytest.importorskip("moto.server")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    logging.getLogger("werkzeug").setLevel(logging.WARNING)       # one line per request otherwise
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    import boto3

    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    yield client
    server.stop()


def keys(client, prefix: str = "") -> set:
    out, token = set(), None
    while True:
        page = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix, **({"ContinuationToken": token} if token else {}))
        out |= {o["Key"] for o in page.get("Contents", [])}
        token = page.get("NextContinuationToken")
        if not token:
            return out


def read_json(client, key: str) -> dict:
    return json.loads(client.get_object(Bucket=BUCKET, Key=key)["Body"].read())


def test_sweep_on_s3_resumes_after_a_killed_driver_and_every_file_lands_in_the_bucket(
        tmp_path, test_world, s3):
    from trainers.checkpoint import verify_checkpoint

    path = one_trial_sweep(tmp_path / "k.yaml", "k", {"seed": {"grid": [0, 1]}},
                           evaluation={"metrics": ["world_fid"], "num_images": 32},
                           metric="eval/world_fid")
    scratch = tmp_path / "scratch"
    out = f"s3://{BUCKET}/{PREFIX}"
    args = [sys.executable, "-m", "orchestrator.sweep", str(path), *tiny(tmp_path, sqlite=False),
            f"sweep.output_dir={out}", f"sweep.storage.scratch_dir={scratch}",
            "train.steps=12", "train.checkpoint_every=4", "train.log_every=4",
            "sweep.max_concurrent_trials=1", "--num-cpus", "2"]
    env = {**os.environ, "RAY_ADDRESS": ""}
    root = f"{PREFIX}/k"
    driver = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        # t000 finished and t001 has a committed checkpoint in the bucket: kill the driver
        # mid-trial. Committed means Train's snapshot names it; a step_ folder alone may still be
        # uploading, and a resume then rightly starts afresh (a quiet machine won that race).
        _wait(lambda: driver.poll() is not None or (
            f"{root}/trials/t000/result.json" in keys(s3, root)
            and f"{root}/train/t001/checkpoint_manager_snapshot.json" in keys(s3, root)), 300,
            "t001's first committed checkpoint in the bucket")
        assert driver.poll() is None, driver.stderr.read().decode()[-3000:]
        driver.kill()
    finally:
        driver.kill()
        driver.wait()
    assert f"{root}/trials/t001/result.json" not in keys(s3, root)
    done = s3.get_object(Bucket=BUCKET, Key=f"{root}/trials/t000/attempts.jsonl")["Body"].read()

    # the resume reads what it needs from the bucket, not from the killed driver's folder
    shutil.rmtree(scratch / BUCKET / PREFIX / "k")
    started = time.monotonic()
    resumed = subprocess.run(args + ["--resume"], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    print(f"resume took {time.monotonic() - started:.0f} s")
    assert not (tmp_path / "s3:").exists()             # nothing went to a folder named after the URI

    found = keys(s3)
    for name in (".softdimo-sweep", "sweep.json", "results.txt"):
        assert f"{root}/{name}" in found, name
    assert any(k.startswith(f"{root}/tune/") for k in found)                     # Tune's state
    assert s3.get_object(Bucket=BUCKET, Key=f"{root}/trials/t000/attempts.jsonl")["Body"].read() == done
    for key in ("t000", "t001"):
        trial = f"{root}/trials/{key}"
        for name in ("result.json", "final.json", "attempts.jsonl", "eval.jsonl", "config.json"):
            assert f"{trial}/{name}" in found, (key, name)
        result = read_json(s3, f"{trial}/result.json")
        assert result["step"] == 12
        assert result["checkpoint"] == f"s3://{BUCKET}/{root}/train/{key}/step_00000012"
        for name in ("ema.safetensors", "meta.json"):                              # evaluation snapshot
            assert f"{trial}/eval/step_00000012/{name}" in found
        evals = [json.loads(line) for line in s3.get_object(
            Bucket=BUCKET, Key=f"{trial}/eval.jsonl")["Body"].read().decode().splitlines()]
        assert [e["step"] for e in evals] == [12] and evals[0]["metrics"]["eval/world_fid"] >= 0
        # the final checkpoint, downloaded, verifies against the checksums in its meta.json
        local = tmp_path / "verify" / key
        local.mkdir(parents=True)
        ckpt = f"{root}/train/{key}/step_00000012"
        for k in sorted(keys(s3, ckpt + "/")):
            if k.endswith("/"):                  # a folder marker pyarrow leaves
                continue
            s3.download_file(BUCKET, k, str(local / k[len(ckpt) + 1:]))
        verify_checkpoint(local)
    attempts = [json.loads(line) for line in s3.get_object(
        Bucket=BUCKET, Key=f"{root}/trials/t001/attempts.jsonl")["Body"].read().decode().splitlines()]
    assert attempts[-1]["start_step"] > 0                                        # resumed, not restarted
    assert read_json(s3, f"{root}/trials/t001/result.json")["resumed_from_step"] == attempts[-1]["start_step"]

    # MLflow: the runs' artifacts went through the sweep's server into the bucket; its store too
    artifacts = {k for k in found if k.startswith(f"{PREFIX}/mlflow/artifacts/")}
    assert {Path(k).name for k in artifacts} >= {"config.yaml", "results.txt", "sweep.json"}
    assert f"{PREFIX}/mlflow/mlflow.db" in found
    uri = tracking.sqlite_uri(scratch / BUCKET / PREFIX / "mlflow")
    runs = mlflow_children(uri, "k")
    assert [r.data.tags["softdimo.trial"] for r in runs] == ["t000", "t001"]     # no duplicates
    assert all(r.info.status == "FINISHED" for r in runs)


def test_an_s3_sweep_folder_is_refused_or_overwritten_by_what_the_bucket_holds(tmp_path, s3):
    """The checks before any work read the bucket, not the driver's scratch folder: an existing
    sweep is refused without --overwrite, a prefix without the marker is left alone, --overwrite
    deletes a sweep's objects, --resume needs a sweep.json in the bucket."""
    from argparse import Namespace

    from orchestrator import sweep
    from orchestrator.config import UserError
    from orchestrator.sweeping.spec import load_sweep

    path = one_trial_sweep(tmp_path / "s.yaml", "s", {"seed": {"grid": [0]}})
    spec = load_sweep(path, [f"sweep.output_dir=s3://{BUCKET}/{PREFIX}",
                             f"sweep.storage.scratch_dir={tmp_path / 'scratch'}"], cwd=tmp_path)
    fresh, again, resume = (Namespace(resume=False, overwrite=False), Namespace(resume=False, overwrite=True),
                            Namespace(resume=True, overwrite=False))
    with pytest.raises(UserError, match=rf"--resume: no earlier sweep in s3://{BUCKET}/{PREFIX}/s$"):
        sweep._check_folder(spec, resume)
    sweep._check_folder(spec, fresh)                                  # nothing there: go
    s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}/s/notes.txt", Body=b"someone else's")
    with pytest.raises(UserError, match=rf"name: s3://{BUCKET}/{PREFIX}/s already exists"):
        sweep._check_folder(spec, fresh)
    with pytest.raises(UserError, match="was not made by a sweep"):
        sweep._check_folder(spec, again)
    assert f"{PREFIX}/s/notes.txt" in keys(s3)                          # left alone
    s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}/s/.softdimo-sweep", Body=b"")
    sweep._check_folder(spec, again)
    assert not keys(s3, f"{PREFIX}/s/")                                  # a sweep's: deleted
