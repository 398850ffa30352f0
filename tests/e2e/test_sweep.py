"""Sweeps end to end: real Ray (Tune + Train, num_cpus=2), a real MLflow store, the test world.

Each trial is a Ray Train run of the real trainer; these tests check files, MLflow runs and metrics,
never timings.
"""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from orchestrator import source, sweep, tracking
from orchestrator.config import UserError

ROOT = Path(__file__).resolve().parents[2]
# gan_mask runs in test_default_tracking_server_resume_and_report (with the same checks)
SHIPPED = ["gan_weight", "clip_weight", "temperature", "embedding"]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def ray_session(test_world):
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=True, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "SOFTDIMO_CACHE": os.environ["SOFTDIMO_CACHE"]}})
    yield
    ray.shutdown()


def tiny(out: Path, *extra: str, sqlite: bool = True) -> list:
    """Overrides that shrink any sweep to the test world and two steps per trial."""
    args = ["world.spec=test", "train.steps=2", "train.checkpoint_every=1", "train.log_every=1",
            "train.grid_size=4", "train.batch_size=8", "sweep.evaluation.num_images=32",
            "sweep.evaluation.cpus_per_actor=0.25", "sweep.evaluation.geneval_prompts_per_task=1",
            "sweep.evaluation.images_per_prompt=1",
            f"sweep.output_dir={out}", "sweep.max_concurrent_trials=2", "--quiet", *extra]
    if sqlite:
        args.append(f"sweep.tracking.uri=sqlite:///{out}/mlflow.db")
    return args


def one_trial_sweep(path: Path, name: str, search: dict, **extra) -> Path:
    body = {"name": name, "preset": str(ROOT / "sweeps/presets/tiny_c2i.yaml"), "search": search,
            "evaluation": {"num_images": 0, "metrics": []}, "metric": "loss/dimo", **extra}
    path.write_text(yaml.safe_dump(body))
    return path


def results(sweep_dir: Path) -> dict:
    state = json.loads((sweep_dir / "sweep.json").read_text())
    out = {}
    for t in state["trials"]:
        done = sweep_dir / "trials" / t["key"] / "result.json"
        out[t["key"]] = json.loads(done.read_text()) if done.is_file() else None
    return out


def mlflow_children(uri: str, name: str) -> list:
    parent = tracking.find_parent(uri, "softdimo", name)
    return tracking.children(uri, parent.info.run_id)


def check_layout(sweep_dir: Path) -> None:
    """Every file orchestrator.sweeping.layout.SweepLayout names for a finished sweep is where the sweep wrote it."""
    from orchestrator.sweeping.layout import SweepLayout

    layout = SweepLayout(sweep_dir)
    assert layout.state.is_file() and layout.marker.is_file() and layout.train.is_dir()
    assert layout.parent_spool.name == "parent_spool.jsonl" and not layout.server.exists()   # server gone
    keys = [t["key"] for t in json.loads(layout.state.read_text())["trials"]]
    assert layout.trial_keys() == keys
    for key in keys:
        files = layout.trial(key)
        for path in (files.result, files.final, files.attempts, files.eval_log):
            assert path.is_file(), path
        assert not files.failure.exists()
        step = json.loads(files.result.read_text())["step"]
        assert files.snapshot(f"step_{step:08d}").is_dir()
        assert [json.loads(line)["checkpoint"] for line in files.eval_log.read_text().splitlines()] == [
            str(files.snapshot(f"step_{step:08d}"))]
        assert (layout.train / key).is_dir()


def check_shipped(sweep_dir: Path, uri: str) -> None:
    check_layout(sweep_dir)
    state = json.loads((sweep_dir / "sweep.json").read_text())
    found = results(sweep_dir)
    assert len(found) == len(state["trials"]) >= 2
    for key, result in found.items():
        assert result is not None, key
        assert result["step"] == 2 and result["images_seen"] == 16
        assert (Path(result["checkpoint"]) / "meta.json").is_file()
        evals = [json.loads(line) for line in (sweep_dir / "trials" / key / "eval.jsonl").read_text().splitlines()]
        assert [e["step"] for e in evals] == [2]          # the pool scored the final checkpoint once
        assert evals[0]["metrics"]["eval/world_fid"] >= 0.0
        if state["file"]["evaluation"]["test_time"]:        # clip_weight: with and without TTS
            for metric in ("geneval_world", "world_clip"):
                assert {f"eval/{metric}", f"eval/tts/{metric}"} <= set(evals[0]["metrics"])
            assert evals[0]["metrics"]["eval/tts/seconds_per_prompt"] > 0
    runs = mlflow_children(uri, sweep_dir.name)
    for run in runs:                                   # ... and its result is in the trial's run
        assert [s for s, _ in tracking.metric_history(uri, run.info.run_id, "eval/world_fid")] == [2]
        if state["file"]["evaluation"]["test_time"]:
            assert tracking.metric_history(uri, run.info.run_id, "eval/tts/geneval_world")[0][0] == 2
    assert [r.data.tags["softdimo.trial"] for r in runs] == sorted(found)
    assert all(r.info.status == "FINISHED" for r in runs)
    for run, trial in zip(runs, state["trials"]):
        for key, value in trial["overrides"].items():
            assert run.data.params[key] == str(value), key   # the searched value is the logged param


def first_two(name: str, folder: Path) -> Path:
    """The shipped sweep with each search axis cut to its first two values (the file's every key,
    sampler and evaluation setting kept; the unit tests expand the full grids)."""
    body = yaml.safe_load((ROOT / f"sweeps/{name}.yaml").read_text())
    body["preset"] = str((ROOT / "sweeps" / body["preset"]).resolve())
    for spec in body["search"].values():
        for sampler, values in spec.items():
            if sampler in ("grid", "choice"):
                spec[sampler] = values[:2]
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_sweep_runs_two_steps_per_trial(name, tmp_path, ray_session):
    assert sweep.main([str(first_two(name, tmp_path)), *tiny(tmp_path)]) == 0
    check_shipped(tmp_path / name, f"sqlite:///{tmp_path}/mlflow.db")


def test_default_tracking_server_resume_and_report(tmp_path, ray_session):
    """gan_mask with the default local MLflow server; then --resume reruns nothing; then a report."""
    from orchestrator import report

    args = [str(ROOT / "sweeps/gan_mask.yaml"), *tiny(tmp_path, sqlite=False)]
    assert sweep.main(args) == 0
    uri = tracking.sqlite_uri(tmp_path / "mlflow")
    check_shipped(tmp_path / "gan_mask", uri)
    runs = mlflow_children(uri, "gan_mask")
    assert len(runs) == 3
    run = runs[1]
    assert run.data.params["gan.mask_range"] == "[0.0, 0.5]"
    assert run.data.params["train.global_batch_size"] == "8"
    assert len(run.data.params) > 40                              # every resolved config value
    assert [s for s, _ in tracking.metric_history(uri, run.info.run_id, "loss/dimo")] == [1, 2]
    artifacts = {a.path for a in tracking._client(uri).list_artifacts(run.info.run_id)}
    assert {"config.yaml", "images"} <= artifacts
    assert Path(run.data.tags["checkpoint.final"]).name == "step_00000002"
    attempts = {k: (tmp_path / "gan_mask/trials" / k / "attempts.jsonl").read_text() for k in ("t000", "t001", "t002")}
    # which code ran: the sweep's state and every run carry the checkout's commit
    here = source.commit()
    assert json.loads((tmp_path / "gan_mask/sweep.json").read_text())["commits"] == [here]
    parent = tracking.find_parent(uri, "softdimo", "gan_mask")
    assert {r.data.tags[source.TAG_COMMIT] for r in runs + [parent]} == {here}

    with pytest.raises(UserError, match="already exists"):
        sweep.main(args)
    assert sweep.main(args + ["--resume"]) == 0
    again = mlflow_children(uri, "gan_mask")
    assert [r.info.run_id for r in again] == [r.info.run_id for r in runs]   # no duplicates
    assert json.loads((tmp_path / "gan_mask/sweep.json").read_text())["commits"] == [here]  # same code
    for k, text in attempts.items():                                         # nothing retrained
        assert (tmp_path / "gan_mask/trials" / k / "attempts.jsonl").read_text() == text

    from orchestrator import evaluate  # outside the sweep: by sweep name and by run
    assert evaluate.main(["gan_mask", "--output-dir", str(tmp_path), "--metrics", "world_clip",
                          "--num", "8", "--threads", "1"]) == 0
    for run in runs:
        assert [s for s, _ in tracking.metric_history(uri, run.info.run_id, "eval/world_clip")] == [2]
    assert evaluate.main([runs[0].info.run_id, "--output-dir", str(tmp_path), "--metrics", "world_fid",
                          "--num", "8", "--temperatures", "0.5,1", "--threads", "1"]) == 0
    assert tracking.metric_history(uri, runs[0].info.run_id, "eval/world_fid/T0.5")

    assert report.main(["gan_mask", "--output-dir", str(tmp_path)]) in (0, None)
    out = tmp_path / "gan_mask" / "report"
    assert (out / "loss_dimo.png").is_file() and (out / "results.csv").is_file()
    assert len((out / "results.csv").read_text().strip().splitlines()) == 4   # header + 3 trials

    # a damaged evaluation snapshot: its job fails, t000 ends without the metric, the sweep exits 1
    t000 = tmp_path / "gan_mask/trials/t000"
    (t000 / "eval.jsonl").unlink()
    ema = t000 / "eval/step_00000002/ema.safetensors"
    ema.write_bytes(ema.read_bytes()[:-100])
    assert sweep.main(args + ["--resume"]) == 1
    assert not (t000 / "eval.jsonl").exists()


def test_two_worker_gloo_trial_keeps_parameters_identical(tmp_path, ray_session):
    path = one_trial_sweep(tmp_path / "ddp.yaml", "ddp", {"seed": {"grid": [0]}})
    assert sweep.main([str(path), *tiny(tmp_path), "train.steps=3", "sweep.scaling.num_workers=2",
                       "sweep.scaling.cpus_per_worker=0.5"]) == 0
    result = results(tmp_path / "ddp")["t000"]
    assert result["ddp/world_size"] == 2.0
    assert result["ddp/max_param_spread"] == 0.0
    assert result["images_seen"] == 3 * 8 * 2                  # global batch = 8 per worker x 2
    run = mlflow_children(f"sqlite:///{tmp_path}/mlflow.db", "ddp")[0]
    assert run.data.params["train.global_batch_size"] == "16"
    assert run.data.params["scaling.num_workers"] == "2"


def _kill_after_first_checkpoint(trial_root: Path, attempts: Path, killed: list) -> None:
    snapshot = trial_root / "checkpoint_manager_snapshot.json"
    deadline = time.time() + 600
    while time.time() < deadline:
        try:
            committed = json.loads(snapshot.read_text())["checkpoint_results"]
        except (OSError, ValueError, KeyError):
            committed = []
        if committed and attempts.is_file():
            pid = json.loads(attempts.read_text().splitlines()[-1])["pid"]
            os.kill(pid, signal.SIGKILL)
            killed.append(committed[-1]["checkpoint_dir_name"])
            return
        time.sleep(0.05)


def test_sigkilled_worker_resumes_from_its_last_checkpoint(tmp_path, ray_session):
    path = one_trial_sweep(tmp_path / "kill.yaml", "kill", {"seed": {"grid": [0]}})
    killed = []
    killer = threading.Thread(target=_kill_after_first_checkpoint, daemon=True, args=(
        tmp_path / "kill/train/t000", tmp_path / "kill/trials/t000/attempts.jsonl", killed))
    killer.start()
    assert sweep.main([str(path), *tiny(tmp_path), "train.steps=150", "train.checkpoint_every=10",
                       "train.log_every=10", "sweep.failure.max_failures=2"]) == 0
    killer.join(timeout=5)
    assert killed, "the worker was never killed"
    attempts = [json.loads(line) for line in
                (tmp_path / "kill/trials/t000/attempts.jsonl").read_text().splitlines()]
    assert len(attempts) == 2 and attempts[0]["pid"] != attempts[1]["pid"]
    assert attempts[1]["start_step"] >= int(killed[0].split("_")[1]) > 0   # resumed, not restarted
    result = results(tmp_path / "kill")["t000"]
    assert result["step"] == 150 and result["resumed_from_step"] == attempts[1]["start_step"]


def test_nan_trial_fails_clearly_and_the_others_finish(tmp_path, ray_session):
    path = one_trial_sweep(tmp_path / "nan.yaml", "nan", {"train.lr_generator": {"grid": [1e-4, 1e6]}})
    assert sweep.main([str(path), *tiny(tmp_path), "train.steps=6", "train.batch_size=32"]) == 1
    found = results(tmp_path / "nan")
    assert found["t000"]["step"] == 6
    assert found["t001"] is None
    from orchestrator.sweeping.layout import SweepLayout

    assert SweepLayout(tmp_path / "nan").trial("t001").failure == tmp_path / "nan/trials/t001/failure.json"
    failure = json.loads((tmp_path / "nan/trials/t001/failure.json").read_text())
    assert "non-finite" in failure["error"] and "step 3" in failure["error"]
    kept = sorted(p.name for p in (tmp_path / "nan/train/t001").glob("step_*"))
    assert kept[-1] == "step_00000002"                            # the last good checkpoint stays
    runs = {r.data.tags["softdimo.trial"]: r for r in mlflow_children(f"sqlite:///{tmp_path}/mlflow.db", "nan")}
    assert runs["t000"].info.status == "FINISHED" and runs["t001"].info.status == "FAILED"


def test_cli_dry_run_and_bad_input_without_ray(tmp_path):
    env = {**os.environ, "RAY_ADDRESS": ""}
    ok = subprocess.run([sys.executable, "-m", "orchestrator.sweep", "sweeps/gan_weight.yaml",
                         "--dry-run", "train.steps=7"], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    for key in ("t000", "t001", "t002", "t003"):
        assert key in ok.stdout
    assert "steps: 7" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"name": "bad", "preset": str(ROOT / "sweeps/presets/tiny_c2i.yaml"),
                                   "search": {"gan.weight": {"grid": []}}}))
    err = subprocess.run([sys.executable, "-m", "orchestrator.sweep", str(bad)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert err.returncode == 2
    assert err.stderr.count("\n") == 1 and "Traceback" not in err.stderr
    assert str(bad) in err.stderr and "search.gan.weight" in err.stderr


def test_asha_stops_trials_early_and_frees_their_resources(tmp_path, ray_session):
    import ray

    path = one_trial_sweep(tmp_path / "asha.yaml", "asha",
                           {"train.lr_generator": {"grid": [1e-4, 1e-1, 3e-1]}},
                           # a larger step size collapses the student's entropy sooner: later
                           # trials fall below the rung's median and are stopped
                           metric="diag/entropy", mode="max", scheduler={"type": "asha", "grace_period": 16, "max_t": 64,
                                                  "reduction_factor": 2})
    assert sweep.main([str(path), *tiny(tmp_path), "train.steps=8", "train.checkpoint_every=4",
                       "sweep.max_concurrent_trials=1"]) == 0
    found = results(tmp_path / "asha")
    done = [k for k, r in found.items() if r is not None]
    stopped = [k for k, r in found.items() if r is None]
    assert done and stopped                                   # ASHA let some run and cut others
    assert all(found[k]["step"] == 8 for k in done)
    runs = {r.data.tags["softdimo.trial"]: r for r in mlflow_children(f"sqlite:///{tmp_path}/mlflow.db", "asha")}
    assert {runs[k].info.status for k in stopped} == {"KILLED"}
    # marked before Tune tells the trial, so a late error in the trial's fit() also ends KILLED
    assert all((tmp_path / "asha" / "trials" / k / "stopped.json").is_file() for k in stopped)
    assert not any((tmp_path / "asha" / "trials" / k / "stopped.json").exists() for k in done)
    deadline = time.time() + 60                               # stopped trials' placement groups go
    while ray.available_resources().get("CPU", 0) < 2 and time.time() < deadline:
        time.sleep(1)
    assert ray.available_resources().get("CPU", 0) == 2


def test_a_stage_end_removes_the_placement_groups_this_job_still_holds(ray_session):
    """A stopped trial's worker group may still be PENDING when the stage ends; granted later, it
    would hold its CPUs for good. The stage's end removes created and pending groups alike."""
    import ray
    from ray.util import placement_group, placement_group_table

    from orchestrator.sweeping.pg_cleanup import remove_leftover_groups

    idle = placement_group([{"CPU": 1}])
    ray.get(idle.ready(), timeout=60)                          # created, nothing in it
    pending = placement_group([{"CPU": 64}])                   # more than the node has: pending
    assert remove_leftover_groups(settle_s=1.0) >= 2
    table = placement_group_table()
    assert {table[g.id.hex()]["state"] for g in (idle, pending)} == {"REMOVED"}
    deadline = time.time() + 30
    while ray.available_resources().get("CPU", 0) < 2 and time.time() < deadline:
        time.sleep(0.5)
    assert ray.available_resources().get("CPU", 0) == 2
    assert remove_leftover_groups(settle_s=0.5) == 0           # nothing left: nothing removed


def test_evaluator_pool_requeues_the_checkpoint_of_a_dead_actor(tmp_path, ray_session, c2i_checkpoint):
    import ray

    from evaluators.suite import EvalSettings
    from orchestrator.sweeping.pool import EvalJob, EvaluatorPool

    got = []
    pool = EvaluatorPool(EvalSettings(metrics=["world_fid"], num_images=32), size=1, num_cpus=0.5,
                         on_result=lambda job, metrics: got.append((job.step, metrics)))
    first = pool.actors[0]
    pool.submit(EvalJob(trial="t000", run_id="r", step=2, checkpoint=str(c2i_checkpoint)))
    pool.submit(EvalJob(trial="t000", run_id="r", step=2, checkpoint=str(c2i_checkpoint)))  # dup
    ray.kill(first, no_restart=True)                  # dies while loading or evaluating
    assert pool.drain(timeout=600)
    assert pool.failures == []
    assert len(got) == 1 and got[0][1]["eval/world_fid"] >= 0.0
    assert pool.actors and pool.actors[0] != first    # replaced
    pool.shutdown()


def _alive(pid: int) -> bool:
    """A running process (a zombie that nobody reaped has ended)."""
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


def _servers(store: Path) -> list:
    """Live processes (mlflow server, uvicorn, watchdog) whose command line names ``store``."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if str(store) in (proc / "cmdline").read_bytes().decode(errors="replace") and _alive(int(proc.name)):
                found.append(int(proc.name))
        except OSError:
            pass
    return found


def _wait(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_killed_driver_resumes_without_unpickling_and_leaves_no_server(tmp_path, test_world):
    """SIGKILL the driver mid-sweep: its MLflow server goes with it; pickles planted in the sweep
    folder (Tune's tuner.pkl among them) never run on --resume; nothing finished is retrained, the
    unfinished trial continues from its checkpoint, and MLflow holds one run per trial."""
    from tests.e2e.test_damaged_input import plant

    path = one_trial_sweep(tmp_path / "k.yaml", "k", {"seed": {"grid": [0, 1]}})
    args = [sys.executable, "-m", "orchestrator.sweep", str(path), *tiny(tmp_path, sqlite=False),
            "train.steps=24", "train.checkpoint_every=4", "train.log_every=4",
            "sweep.max_concurrent_trials=1", "--num-cpus", "2"]
    env = {**os.environ, "RAY_ADDRESS": ""}
    sweep_dir, store = tmp_path / "k", (tmp_path / "mlflow").resolve()
    driver = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        server = _wait(lambda: (sweep_dir / "mlflow_server.json").is_file() and json.loads(
            (sweep_dir / "mlflow_server.json").read_text()), 180, "the MLflow server")
        assert _alive(server["watchdog_pid"]) and _servers(store)
        second = sweep_dir / "train/t001/checkpoint_manager_snapshot.json"
        _wait(lambda: (sweep_dir / "trials/t000/result.json").is_file() and second.is_file()
              and json.loads(second.read_text())["checkpoint_results"], 240, "t001's first checkpoint")
        driver.kill()
    finally:
        driver.kill()
        driver.wait()
    _wait(lambda: not _servers(store), 30, "the orphaned MLflow server to stop")
    assert not (sweep_dir / "trials/t001/result.json").is_file()
    done = (sweep_dir / "trials/t000/attempts.jsonl").read_text()

    marker = tmp_path / "planted-code-ran"
    for planted in ("tune/tuner.pkl", "tune/trainable.pkl", "tune/t001/params.pkl", "trials/t001/state.pkl"):
        plant(sweep_dir / planted, marker)
    resumed = subprocess.run(args + ["--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not marker.exists()
    assert (sweep_dir / "trials/t000/attempts.jsonl").read_text() == done          # not retrained
    attempts = [json.loads(line) for line in (sweep_dir / "trials/t001/attempts.jsonl").read_text().splitlines()]
    assert attempts[-1]["start_step"] > 0                                           # resumed
    found = results(sweep_dir)
    assert found["t000"]["step"] == found["t001"]["step"] == 24
    runs = mlflow_children(tracking.sqlite_uri(store), "k")
    assert [r.data.tags["softdimo.trial"] for r in runs] == ["t000", "t001"]        # no duplicates
    assert all(r.info.status == "FINISHED" for r in runs)
    assert not _servers(store) and not (sweep_dir / "mlflow_server.json").exists()
