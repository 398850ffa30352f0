"""The GPU suite's report on GPU-shaped results: target verdicts, out-of-memory and error rows."""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import suite_report  # noqa: E402


def _variant(seconds, flops, mfu, batch=64, requested=64):
    return {"batch": batch, "requested_batch": requested, "fits": batch == requested,
            "seconds_per_step": seconds, "images_per_second": batch / seconds,
            "peak_memory_bytes": 40 * 2 ** 30, "flops_per_step": flops,
            "tflops_per_second": flops / seconds / 1e12, "mfu": mfu}


def results():
    good = {"family": "maskgit", "weights": "RANDOM weights", "dimo_only": _variant(1.0, 4e14, 0.41),
            "joint": _variant(1.5, 6e14, 0.40), "time_ratio": 1.5, "flop_ratio": 1.5,
            "time_over_flop_ratio": 1.0,
            }
    good["joint"]["profile"] = {"table": "profile_maskgit.txt", "host_syncs_per_step": 12,
                                "time_key": "self_device_time_total",
                                "top_ops": [{"op": "aten::mm", "share": 0.5, "calls": 10}]}
    slow = {"family": "maskbit", "dimo_only": _variant(1.0, 4e14, 0.30),
            "joint": _variant(2.0, 5e14, 0.25), "time_ratio": 2.0, "flop_ratio": 1.25,
            "time_over_flop_ratio": 1.6}
    oom = {"family": "meissonic", "dimo_only": _variant(3.0, 2e15, 0.5, batch=4, requested=4),
           "joint": _variant(2.0, 1e15, 0.5, batch=2, requested=4)}
    return {"mode": "full", "environment": {"device": "NVIDIA H200"}, "wall_seconds": 400,
            "tests": {"command": "python -m pytest -q -m gpu tests/gpu", "passed": 9, "failed": 1,
                      "skipped": 0, "errors": 0, "seconds": 50.0, "returncode": 1,
                      "failures": ["tests.gpu.test_cuda_paths::test_x"]},
            "steps": [good, slow, oom, {"family": "maskgen", "error": "RuntimeError: boom"}],
            "fid": {"num_per_set": 5000, "size": 256, "feature_dims": 2048, "weights": "RANDOM",
                    "project": {"batch": 250, "images_per_second": 3000.0, "wall_seconds": 3.3, "fid": 1.0},
                    "cleanfid": {"batch": 32, "workers": 8, "images_per_second": 1000.0,
                                 "wall_seconds": 10.0, "fid": 1.0000001},
                    "ratio_wall": 3.0, "abs_delta_fid": 1e-7, "target_ratio": 2.0,
                    "target_abs_delta_fid": 1e-3},
            "skipped": {"steps/amused_512": "time budget spent"}}


def test_verdicts_oom_and_errors_are_reported(tmp_path):
    js, md = suite_report.write(tmp_path, results())
    assert json.loads(js.read_text())["steps"][0]["family"] == "maskgit"
    text = md.read_text()
    assert "| maskgit | joint | 64 |" in text and "| 40.0% | met |" in text      # MFU >= 40%
    assert "| maskbit | joint | 64 |" in text and "| 25.0% | **missed** |" in text
    assert "| maskgit | 1.50x | 1.50x | 1.00 | met |" in text                       # time <= 1.1 x FLOPs
    assert "| maskbit | 2.00x | 1.25x | 1.60 | **missed** |" in text
    assert "2 (requested 4 did not fit)" in text                                    # halved batch
    assert "meissonic | 2" not in text.split("time / FLOP ratio")[1]                  # no ratio at unequal batches
    assert "| maskgen | error |" in text and "RuntimeError: boom" in text
    assert "FAILED tests.gpu.test_cuda_paths::test_x" in text
    assert "12 host syncs per step" in text and "aten::mm 50%" in text
    assert "Ratio 3.00x (target >= 2x)" in text and ": met." in text
    assert "steps/amused_512: time budget spent" in text
