"""orchestrator.report: the pure plot/table functions, and one report of a real SQLite store."""
import csv
import json
import sys

import pytest
from mlflow import MlflowClient
from PIL import Image

from orchestrator import report
from orchestrator.config import UserError, run_cli
from orchestrator.report import Trial, build_table, differing_params, plot_metric, write_report
from orchestrator.tracking import (default_store, ensure_experiment, get_or_create_child,
                                   get_or_create_parent, sqlite_uri)


def trials():
    return [
        Trial("t001", "t001 gan.weight=1", "FAILED", {"seed": "0", "gan.weight": "1"},
              {"loss/dimo": [(0, 2.0), (10, 1.0)], "eval/world_fid": [(0, 30.0), (10, 20.0)],
               "images_seen": [(10, 80.0)]}),
        Trial("t000", "t000 gan.weight=0", "FINISHED", {"seed": "0", "gan.weight": "0", "x": "a|b"},
              {"loss/dimo": [(0, 3.0), (10, 1.5)], "eval/world_fid": [(0, 25.0), (10, 40.0)],
               "ema/entropy": [(10, 0.5)]}),
    ]


def test_differing_params_and_table_rows():
    assert differing_params(trials()) == ["gan.weight", "x"]
    header, rows = build_table(trials(), ["eval/world_fid", "loss/dimo", "ema/entropy"])
    assert header == ["trial", "run", "status", "gan.weight", "x", "eval/world_fid",
                      "eval/world_fid (best)", "loss/dimo", "ema/entropy"]
    assert rows == [
        ["t000", "t000 gan.weight=0", "FINISHED", "0", "a|b", 40.0, 25.0, 1.5, 0.5],
        ["t001", "t001 gan.weight=1", "FAILED", "1", "", 20.0, 20.0, 1.0, None],
    ]
    # FID: lower is better; other eval metrics: higher is better.
    clip = [Trial("t0", "a", "FINISHED", {}, {"eval/clip": [(0, 0.2), (5, 0.3), (9, 0.25)]})]
    assert build_table(clip, ["eval/clip"])[1] == [["t0", "a", "FINISHED", 0.25, 0.3]]


def test_plot_metric_writes_a_png(tmp_path):
    path = plot_metric("loss/dimo", {"t000 a": [(0, 1.0), (10, 0.5)], "t001 b": [(5, 2.0)],
                                     "t002 empty": []}, tmp_path / "loss_dimo.png")
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size[0] > 300


def test_write_report_files(tmp_path):
    files, table = write_report(trials(), ["loss/dimo", "eval/world_fid"], tmp_path / "r", "sweep s")
    assert sorted(f.name for f in files) == ["eval_world_fid.png", "loss_dimo.png", "results.csv",
                                             "results.md"]
    with open(tmp_path / "r" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["trial"] for r in rows] == ["t000", "t001"]
    assert rows[0]["loss/dimo"] == "1.5" and rows[1]["eval/world_fid (best)"] == "20.0"
    assert rows[1]["x"] == ""
    md = (tmp_path / "r" / "results.md").read_text()
    assert md.startswith("# sweep s\n")
    assert "| t000 | t000 gan.weight=0 | FINISHED | 0 | a\\|b | 1.5 | 40 | 25 |" in md
    assert "![loss/dimo](loss_dimo.png)" in md
    lines = table.splitlines()
    assert lines[0].split() == ["trial", "status", "gan.weight", "x", "loss/dimo",
                                "eval/world_fid", "eval/world_fid", "(best)"]
    assert lines[2].split() == ["t001", "FAILED", "1", "1", "20", "20"]


@pytest.fixture(scope="module")
def sweep_store(tmp_path_factory):
    """<output_dir>/mlflow with a parent run and two children with metric histories."""
    output_dir = tmp_path_factory.mktemp("sweeps")
    uri = sqlite_uri(default_store(output_dir))
    default_store(output_dir).mkdir()
    exp = ensure_experiment(uri, "softdimo")
    parent = get_or_create_parent(uri, exp, "gan_mask")
    client = MlflowClient(uri)
    for key, mask, scale in [("t001", "[0.0, 0.95]", 2.0), ("t000", "[0.0, 0.5]", 1.0)]:
        child = get_or_create_child(uri, exp, parent, "gan_mask", key, f"{key} gan.mask_range={mask}",
                                    {"gan.mask_range": mask, "seed": "0"})
        for step in (0, 10, 20):
            client.log_metric(child, "loss/dimo", scale / (step + 1), step=step)
            client.log_metric(child, "images_seen", 8.0 * step, step=step)
        client.log_metric(child, "eval/world_fid", 50.0 * scale, step=10)
        client.log_metric(child, "eval/world_fid", 40.0 * scale, step=20)
        client.set_terminated(child, "FINISHED")
    (output_dir / "gan_mask").mkdir()
    (output_dir / "gan_mask" / "sweep.json").write_text(json.dumps({"tracking_uri": None}))
    return output_dir, uri, parent


def test_main_reports_a_sweep_from_the_sqlite_store(sweep_store, capsys):
    output_dir, uri, parent = sweep_store
    assert report.main(["gan_mask", "--output-dir", str(output_dir)]) == 0
    out = output_dir / "gan_mask" / "report"
    assert {p.name for p in out.iterdir()} == {"loss_dimo.png", "eval_world_fid.png",
                                               "results.md", "results.csv"}
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["trial"], r["run"], r["status"], r["gan.mask_range"]) for r in rows] == [
        ("t000", "t000 gan.mask_range=[0.0, 0.5]", "FINISHED", "[0.0, 0.5]"),
        ("t001", "t001 gan.mask_range=[0.0, 0.95]", "FINISHED", "[0.0, 0.95]")]
    assert "seed" not in rows[0] and "images_seen" not in rows[0]
    assert [float(r["loss/dimo"]) for r in rows] == [1 / 21, 2 / 21]
    assert [float(r["eval/world_fid (best)"]) for r in rows] == [40.0, 80.0]
    logged = {f.path for f in MlflowClient(uri).list_artifacts(parent, "report")}
    assert logged >= {"report/loss_dimo.png", "report/eval_world_fid.png", "report/results.md",
                      "report/results.csv"}
    printed = capsys.readouterr().out
    assert str(out) in printed
    assert ["t001", "FINISHED", "[0.0,", "0.95]", "80", "80", "0.09524"] in [
        line.split() for line in printed.splitlines()]


def test_main_by_run_id_with_chosen_metrics(sweep_store, tmp_path, monkeypatch):
    _, uri, parent = sweep_store
    monkeypatch.chdir(tmp_path)
    assert report.main([parent, "--tracking-uri", uri, "--output-dir", str(tmp_path / "none"),
                        "--metrics", "images_seen"]) == 0
    # No sweep folder under --output-dir: the report goes to ./report_<run id>.
    out = tmp_path / f"report_{parent}"
    assert sorted(p.name for p in out.iterdir()) == ["images_seen.png", "results.csv",
                                                     "results.md"]
    assert list(csv.DictReader(open(out / "results.csv")))[0]["images_seen"] == "160.0"


def test_bad_input_is_one_line_and_exit_2(sweep_store, tmp_path, monkeypatch, capsys):
    output_dir = str(sweep_store[0])
    with pytest.raises(UserError, match="nope: no sweep or parent run"):
        report.main(["nope", "--output-dir", output_dir])
    with pytest.raises(UserError, match="--metrics: loss/nope: not logged by any trial"):
        report.main(["gan_mask", "--output-dir", output_dir, "--metrics", "loss/dimo,loss/nope"])
    with pytest.raises(UserError, match="no MLflow store here"):
        report.main(["gan_mask", "--output-dir", str(tmp_path)])
    assert not (tmp_path / "mlflow").exists()
    monkeypatch.setattr(sys, "argv", ["report", "nope", "--output-dir", output_dir])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(report.main)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1
