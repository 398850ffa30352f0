"""Damaged, planted and conflicting input, tried as a hostile or unlucky user would, through the CLIs.

Every case runs the real command in a subprocess and checks the contract: one line on stderr, exit
code 2, no traceback (or, where the project can carry on, one warning line and exit 0). Planted
pickles carry a payload that would create a file: the file must never appear.
"""
import importlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]
C2I = ROOT / "sweeps/presets/tiny_c2i.yaml"
RUN = ["world.spec=test", "train.batch_size=8", "train.grid_size=4", "train.device=cpu",
       "train.checkpoint_every=1", "train.keep_checkpoints=3", "train.sample_every=0"]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


class Payload:
    """A pickle that creates ``marker`` when unpickled: the file must never appear."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps({"state_dict": Payload(marker)}))
    return path


def cli(module: str, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ADDRESS": "", "SOFTDIMO_WEIGHTS": ""}
    return subprocess.run([sys.executable, "-m", f"orchestrator.{module}", *map(str, args)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)


def one_line(result: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, exactly one line on stderr, no traceback; the line holds every needle."""
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def run_dir(test_world, tmp_path_factory) -> Path:
    """A 2-step class-to-image run with a checkpoint at steps 1 and 2 (trained in this process)."""
    from orchestrator.config import load_config, to_dict
    from trainers.loop import train

    out = tmp_path_factory.mktemp("run") / "run"
    cfg = load_config(C2I, [*RUN, "train.steps=2", f"output_dir={out}"])
    train(cfg, to_dict(cfg), progress=False)
    return out


def copy_run(run_dir: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    return out


def overwrite_middle(file: Path, n: int = 100) -> None:
    data = bytearray(file.read_bytes())
    mid = len(data) // 2
    data[mid:mid + n] = os.urandom(n)
    file.write_bytes(bytes(data))


# --- checkpoints ------------------------------------------------------------------------------------

def test_resume_falls_back_past_a_truncated_weights_file(run_dir, tmp_path):
    out = copy_run(run_dir, tmp_path)
    ema = out / "checkpoints/step_00000002/ema.safetensors"
    ema.write_bytes(ema.read_bytes()[: ema.stat().st_size // 2])
    r = cli("train", C2I, *RUN, "train.steps=3", f"output_dir={out}", "--resume", "--quiet", "--threads", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "step_00000002/ema.safetensors" in warnings[0]
    from trainers.checkpoint import read_meta, verify_checkpoint

    assert verify_checkpoint(out / "checkpoints/step_00000003")["step"] == 3
    assert read_meta(out / "checkpoints/step_00000002")["step"] == 2    # redone from step 1


def test_resume_skips_a_truncated_meta_and_a_meta_only_folder(run_dir, tmp_path):
    out = copy_run(run_dir, tmp_path)
    meta = out / "checkpoints/step_00000002/meta.json"
    lone = out / "checkpoints/step_00000009"
    lone.mkdir()
    shutil.copy(meta, lone / "meta.json")               # a step folder holding only meta.json
    meta.write_text(meta.read_text()[:40])              # and a truncated meta.json
    r = cli("train", C2I, *RUN, "train.steps=3", f"output_dir={out}", "--resume", "--quiet", "--threads", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2 and "step_00000009" in warnings[0] and "step_00000002" in warnings[1]
    assert (out / "checkpoints/step_00000003/meta.json").is_file()


def test_generate_and_evaluate_refuse_flipped_bytes(run_dir, tmp_path):
    out = copy_run(run_dir, tmp_path)
    ckpt = out / "checkpoints/step_00000002"
    overwrite_middle(ckpt / "ema.safetensors")
    one_line(cli("generate", out, "--out", tmp_path / "img", "--num", "2"), "ema.safetensors", "checksum")
    one_line(cli("generate", ckpt, "--out", tmp_path / "img", "--num", "2"), "ema.safetensors")
    one_line(cli("evaluate", ckpt, "--metrics", "world_fid", "--num", "8"), "ema.safetensors")
    (ckpt / "meta.json").write_text("{\"step\": 2, \"conf")
    one_line(cli("generate", ckpt, "--out", tmp_path / "img"), "meta.json", "cannot be read")


def test_generate_refuses_a_nan_temperature(run_dir, tmp_path):
    one_line(cli("generate", run_dir, "--out", tmp_path / "img", "--temperature", "nan"), "--temperature")


# --- training input ---------------------------------------------------------------------------------

def test_train_bad_list_index_output_dir_and_second_writer(tmp_path):
    one_line(cli("train", C2I, "reward.terms.1.weight=0.5"), "reward.terms.1.weight", "out of range")
    afile = tmp_path / "afile"
    afile.write_text("x")
    one_line(cli("train", C2I, f"output_dir={afile}"), "output_dir", "existing file")
    one_line(cli("train", C2I, f"output_dir={afile}/sub"), "output_dir", "cannot be created")
    from orchestrator import locks  # this process is the first writer

    out = tmp_path / "busy"
    out.mkdir()
    locks.acquire(out / ".softdimo.lock", "test")
    try:
        one_line(cli("train", C2I, *RUN, f"output_dir={out}"), "another run is writing there",
                 f"pid {os.getpid()}")
    finally:
        locks.release(out / ".softdimo.lock")


def _maskgit_overrides(tmp_path: Path, transformer: Path) -> list:
    fake = importlib.import_module("tests.fakes.maskgit")
    paths, options = fake.write(tmp_path / "weights")
    save_file({"tokens": torch.zeros(2, 16, dtype=torch.long), "labels": torch.zeros(2, dtype=torch.long)},
              str(tmp_path / "tokens.safetensors"))
    return [f"teacher.paths.transformer={transformer}", f"teacher.paths.vqgan={paths['vqgan']}",
            f"teacher.paths.vqgan_config={paths['vqgan_config']}",
            "teacher.options={" + ", ".join(f"{k}: {v}" for k, v in options.items()) + "}",
            f"data.tokens={tmp_path / 'tokens.safetensors'}", f"output_dir={tmp_path / 'run'}",
            "train.device=cpu", "--quiet"]


def test_train_refuses_mismatched_and_pickled_teacher_weights(tmp_path):
    preset = ROOT / "sweeps/presets/maskgit.yaml"
    wrong = tmp_path / "wrong.pth"
    torch.save({"model_state_dict": {"not.a.key": torch.zeros(3)}}, wrong)
    one_line(cli("train", preset, *_maskgit_overrides(tmp_path, wrong)), "wrong.pth", "does not fit")
    marker = tmp_path / "ran"
    planted = plant(tmp_path / "planted.pth", marker)
    one_line(cli("train", preset, *_maskgit_overrides(tmp_path, planted)), "planted.pth")
    assert not marker.exists()


def test_evaluate_refuses_a_planted_weights_file(run_dir, tmp_path):
    marker = tmp_path / "ran"
    planted = plant(tmp_path / "pt_inception.pth", marker)
    one_line(cli("evaluate", run_dir, "--metrics", "fid5k", "--weights", f"inception={planted}"),
             "--weights", "inception", "pt_inception.pth")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(os.urandom(300))
    one_line(cli("evaluate", run_dir, "--metrics", "fid5k", "--weights", f"inception={junk}"),
             "junk.safetensors")
    assert not marker.exists()


# --- sweeps -----------------------------------------------------------------------------------------

def sweep_file(tmp_path: Path, **extra) -> Path:
    body = {"name": "s", "preset": str(C2I), "search": {"seed": {"grid": [0, 1]}}, "metric": "loss/dimo",
            "evaluation": {"metrics": [], "num_images": 0}, "output_dir": str(tmp_path / "sweeps"), **extra}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def test_sweep_files_refused_in_the_dry_run(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    one_line(cli("sweep", sweep_file(tmp_path, output_dir=str(afile)), "--dry-run"), "output_dir", "existing file")
    one_line(cli("sweep", sweep_file(tmp_path, search_seed=-3), "--dry-run"), "search_seed", ">= 0")
    one_line(cli("sweep", sweep_file(tmp_path, scheduler="fifo"), "--dry-run"), "s.yaml: scheduler:")
    one_line(cli("sweep", sweep_file(tmp_path, num_samples=1_000_000), "--dry-run"), "num_samples", "10000")
    for name in ("..", ".hidden"):
        one_line(cli("sweep", sweep_file(tmp_path, name=name), "--dry-run", "--overwrite"), "name:")
    evaluation = {"metrics": ["fid5k"], "num_images": 8}
    one_line(cli("sweep", sweep_file(tmp_path, evaluation=evaluation, metric="eval/fid5k"), "--dry-run"),
             "evaluation.weights", "inception")


def test_sweep_overwrite_spares_foreign_folders_and_a_second_driver_stops(tmp_path):
    path = sweep_file(tmp_path)
    precious = tmp_path / "sweeps/s/keep.txt"
    precious.parent.mkdir(parents=True)
    precious.write_text("mine")
    one_line(cli("sweep", path, "--overwrite"), "was not made by a sweep")
    assert precious.read_text() == "mine"
    from orchestrator import locks

    lock = tmp_path / "sweeps/.s.lock"
    locks.acquire(lock, "test")
    try:
        one_line(cli("sweep", path, "--resume"), "another run is writing there")
    finally:
        locks.release(lock)
    (tmp_path / "sweeps/s/sweep.json").write_text("{\"trials\": [")
    one_line(cli("sweep", path, "--resume"), "sweep.json", "not a readable sweep state")
