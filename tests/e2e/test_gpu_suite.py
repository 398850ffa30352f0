"""The GPU suite, proven on the CPU: ``gpu_suite.py --smoke`` end to end and its report's contents,
the published architectures it builds (on the meta device: no memory), and its command-line errors.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SUITE = ROOT / "benchmarks" / "gpu_suite.py"
GAN = {"maskgit", "maskbit", "maskgen"}             # Table 5: GAN heads on these
REWARD = {"maskgen", "meissonic", "amused_512"}     # ImageReward + CLIP score reward


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_suite")
    proc = subprocess.run([sys.executable, str(SUITE), str(out), "--smoke", "--device", "cpu", "--sweep"],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / "results.json").read_text()), (out / "report.md").read_text()


def test_smoke_run_covers_every_stage(smoke_run):
    _, results, _ = smoke_run
    assert results["mode"] == "smoke" and results["stages"] == ["tests", "steps", "fid", "sweep"]
    assert not results.get("skipped") and "RANDOM weights" in results["weights_note"]
    # the gpu tier is collected and, without CUDA, every test in it is skipped (not failed)
    tests = results["tests"]
    assert tests["returncode"] == 0 and tests["failed"] == tests["errors"] == 0
    assert tests["skipped"] >= 8 and tests["passed"] == 0


def test_every_family_gets_both_steps_side_by_side(smoke_run):
    _, results, _ = smoke_run
    rows = {row["family"]: row for row in results["steps"]}
    assert set(rows) == {"maskgit", "maskbit", "maskgen", "meissonic", "amused_512"}
    for family, row in rows.items():
        assert "error" not in row, row.get("traceback")
        dimo, joint = row["dimo_only"], row["joint"]
        for v in (dimo, joint):
            assert v["fits"] and v["batch"] == 2 and v["seconds_per_step"] > 0 and v["flops_per_step"] > 0
            assert v["precision"] == "fp32" and v["mfu"] is None        # no GPU peak on the CPU
        assert dimo["gan_weight"] == dimo["reward_weight"] == 0
        assert ("loss/gan_generator" in joint["losses"]) == (family in GAN)
        assert ("loss/reward" in joint["losses"]) == (family in REWARD)
        assert "loss/gan_generator" not in dimo["losses"] and "loss/reward" not in dimo["losses"]
        # the extra terms cost FLOPs; the ratios are measured in the same run
        assert joint["flops_per_step"] > dimo["flops_per_step"]
        assert row["flop_ratio"] == pytest.approx(joint["flops_per_step"] / dimo["flops_per_step"])
        assert row["time_ratio"] == pytest.approx(joint["seconds_per_step"] / dimo["seconds_per_step"])


def test_fid_paths_agree_and_the_sweep_resolves(smoke_run):
    _, results, _ = smoke_run
    fid = results["fid"]
    assert fid["feature_dims"] == 64 and fid["images"] == 8
    assert fid["abs_delta_fid"] <= 1e-3                       # the same features through both paths
    assert fid["project"]["images_per_second"] > 0 and fid["cleanfid"]["images_per_second"] > 0
    sweep = results["sweep"]
    assert sweep["dry_run"] and sweep["returncode"] == 0 and sweep["trials"] == 4
    assert "sweep.scaling.gpus_per_worker=0.25" in sweep["command"]


def test_report_reads_the_figures(smoke_run):
    out, results, report = smoke_run
    for heading in ("## 1. CUDA test tier", "## 2. Training step per teacher family",
                    "## 3. FID feature throughput", "## 4. Embedded-world sweep on one GPU"):
        assert heading in report
    for family in ("maskgit", "maskbit", "maskgen", "meissonic", "amused_512"):
        assert f"| {family} | joint |" in report and f"| {family} | dimo_only |" in report
    assert "time / FLOP ratio" in report and "|ΔFID|" in report
    assert (out / "tests_junit.xml").is_file() and (out / "tests_output.txt").is_file()


def test_full_size_architectures_have_table_5_shapes():
    """The random teachers are the published networks: sizes (meta device, no memory), L and V."""
    code = """
import json
from benchmarks import random_teachers as rt
out = {}
for f in rt.FAMILIES:
    b = rt.build(f, "full", "meta")
    t = b.teacher
    out[f] = [b.params, t.seq_len, t.V, t.image_size, t.depth, rt.per_gpu_batch(f)]
print(json.dumps(out))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    # teachers.md: MaskGIT "base" about 174 M parameters, aMUSEd about 604 M; Table 5: L, V, pixels
    assert got["maskgit"][0] == pytest.approx(174e6, rel=0.01)
    assert got["amused_512"][0] == pytest.approx(604e6, rel=0.01)
    assert got["meissonic"][0] == pytest.approx(1.0e9, rel=0.02)
    assert [g[1:4] for g in (got["maskgit"], got["maskbit"], got["meissonic"], got["maskgen"])] == [
        [256, 1024, 256], [512, 128, 256], [4096, 8192, 1024], [128, 8192, 256]]
    assert [got[f][4] for f in ("maskgit", "maskbit", "maskgen", "meissonic", "amused_512")] == [24, 24, 16, 42, 22]
    assert [got[f][5] for f in ("maskgit", "maskbit", "maskgen", "meissonic")] == [64, 64, 16, 4]


def test_full_size_forward_decode_and_reward_shapes_on_meta():
    """Every full-size path the joint step takes, shape-checked on the meta device: soft and hard
    embeddings, the backbone with the GAN layers' features, the soft decode, ImageReward."""
    code = """
import json, torch
from benchmarks import random_teachers as rt
meta = torch.device("meta")
out = {}
for f in rt.FAMILIES:
    t = rt.build(f, "full", meta).teacher
    B = 2
    if t.conditioning == "class":          # (encode_condition range-checks values: not on meta)
        cond = torch.zeros(B, dtype=torch.long, device=meta)
    else:
        cond = t.encode_condition(prompts=["a", "b"])
    p = torch.softmax(torch.empty(B, t.seq_len, t.V, device=meta), -1)
    e = torch.cat([t.embed_probs(p), t.embed_ids(torch.zeros(B, t.seq_len, dtype=torch.long, device=meta))])
    logits, feats = t.forward_embeddings(t.make_student(), e, torch.cat([cond, t.null_condition(B)]), [1, -1])
    out[f] = [list(logits.shape), list(feats[-1].shape), list(t.decode_probs(p, cond).shape)]
ir = rt.random_scorers(["imagereward"], "full", meta)["imagereward"]
out["imagereward"] = list(ir(torch.rand(2, 3, 1024, 1024, device=meta), ["a", "b"]).shape)
print(json.dumps(out))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    if got["maskgit"][0][-1] == 1025:      # V + 1: a version whose MaskGit logits keep the mask column
        got["maskgit"][0][-1] = 1024
    assert got == {"maskgit": [[4, 256, 1024], [4, 256, 768], [2, 3, 256, 256]],
                   "maskbit": [[4, 512, 128], [4, 256, 1024], [2, 3, 256, 256]],
                   "maskgen": [[4, 128, 8192], [4, 128, 1024], [2, 3, 256, 256]],
                   "meissonic": [[4, 4096, 8192], [4, 1024, 1024], [2, 3, 1024, 1024]],
                   "amused_512": [[4, 1024, 8192], [4, 256, 1024], [2, 3, 512, 512]],
                   "imagereward": [2]}


def test_bad_arguments_stop_with_one_line_and_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, str(SUITE), str(tmp_path), "--only", "bogus"], cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert "bogus" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, str(SUITE), str(tmp_path / "x"), "--device", "cpu"], cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--smoke" in proc.stderr and "Traceback" not in proc.stderr
