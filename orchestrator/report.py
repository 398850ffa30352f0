"""Plots and a results table of one sweep, read back from MLflow.

``python -m orchestrator.report --claims <sweep> ...`` renders the paper's claims page instead
(``orchestrator.claims``). ``python -m orchestrator.report <sweep name | parent run id>`` draws one PNG per metric (metric
against training step, one line per trial, as in the paper's Fig. 4), writes ``results.md`` and
``results.csv`` (one row per trial: the params that differ between trials, the last value of every
metric and the best value of every ``eval/`` metric), and logs them to the sweep's parent run under
``report/``. Reading needs no server: the default local store is opened as a SQLite file. The
plotting and table code takes plain data, so it is tested without MLflow.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from orchestrator import tracking
from orchestrator.config import UserError, run_cli
from orchestrator.sweeping.layout import SweepLayout

SKIPPED = ("images_seen",)                  # a counter, not a result: not plotted by default
LOWER_IS_BETTER = ("fid", "loss", "error")  # best value of an eval/ metric is its min, else max

Curve = list[tuple[int, float]]  # (step, value), sorted by step


@dataclass
class Trial:
    key: str
    name: str
    status: str
    params: dict[str, str] = field(default_factory=dict)
    history: dict[str, Curve] = field(default_factory=dict)


def default_metrics(trials: Sequence[Trial]) -> list[str]:
    return sorted({m for t in trials for m in t.history} - set(SKIPPED))


def differing_params(trials: Sequence[Trial]) -> list[str]:
    """Param keys whose value is not the same in every trial (missing counts as a value)."""
    keys = sorted({k for t in trials for k in t.params})
    return [k for k in keys if len({t.params.get(k) for t in trials}) > 1]


def lower_is_better(metric: str) -> bool:
    return any(word in metric.lower() for word in LOWER_IS_BETTER)


def plot_name(metric: str) -> str:
    return metric.replace("/", "_") + ".png"


def plot_metric(metric: str, curves: dict[str, Curve], path: Path) -> Path:
    """One line per trial (legend = run name): ``metric`` against training step, as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    FigureCanvasAgg(fig)                    # Agg, without pyplot's global state
    ax = fig.add_subplot()
    for label, points in curves.items():
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, label=label, marker="o" if len(points) <= 20 else None,
                    markersize=3)
    ax.set_xlabel("training step")
    ax.set_ylabel(metric)
    ax.set_title(metric)
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize="small")
    fig.savefig(path, dpi=120)
    return path


def _best(metric: str, points: Curve) -> float | None:
    values = [v for _, v in points if not math.isnan(v)]
    if not values:
        return None
    return min(values) if lower_is_better(metric) else max(values)


def build_table(trials: Sequence[Trial], metrics: Sequence[str]) -> tuple[list[str], list[list]]:
    """Header and rows (sorted by trial key); metric cells are floats or None when not logged."""
    params = differing_params(trials)
    header = ["trial", "run", "status", *params]
    for m in metrics:
        header += [m, f"{m} (best)"] if m.startswith("eval/") else [m]
    rows = []
    for t in sorted(trials, key=lambda t: t.key):
        row = [t.key, t.name, t.status, *(t.params.get(p, "") for p in params)]
        for m in metrics:
            points = t.history.get(m, [])
            row.append(points[-1][1] if points else None)
            if m.startswith("eval/"):
                row.append(_best(m, points))
        rows.append(row)
    return header, rows


def _cell(value, precise: bool) -> str:
    if value is None:
        return "" if precise else "-"
    if isinstance(value, float):
        return repr(value) if precise else f"{value:.4g}"
    return str(value)


def write_csv(header: list[str], rows: list[list], path: Path) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows([[_cell(v, precise=True) for v in row] for row in rows])
    return path


def markdown_table(header: list[str], rows: list[list]) -> str:
    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"
    body = [line(header), line(["---"] * len(header))]
    return "\n".join(body + [line(_cell(v, precise=False) for v in row) for row in rows]) + "\n"


def text_table(header: list[str], rows: list[list], skip: Sequence[str] = ("run",)) -> str:
    """Aligned plain-text table for the terminal (``skip``: columns left out to keep it short)."""
    keep = [i for i, h in enumerate(header) if h not in skip]
    cells = [[header[i] for i in keep]]
    cells += [[_cell(row[i], precise=False) for i in keep] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(keep))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def write_report(trials: Sequence[Trial], metrics: Sequence[str], out: Path,
                 title: str) -> tuple[list[Path], str]:
    """All report files in ``out`` (PNGs, results.md, results.csv) -> (paths, terminal table)."""
    out.mkdir(parents=True, exist_ok=True)
    trials = sorted(trials, key=lambda t: t.key)
    files = [plot_metric(m, {t.name: t.history.get(m, []) for t in trials}, out / plot_name(m))
             for m in metrics]
    header, rows = build_table(trials, metrics)
    plots = "".join(f"![{m}]({plot_name(m)})\n" for m in metrics)
    (out / "results.md").write_text(f"# {title}\n\n{markdown_table(header, rows)}\n{plots}")
    files += [out / "results.md", write_csv(header, rows, out / "results.csv")]
    return files, text_table(header, rows)


def resolve_uri(sweep: str, output_dir: Path, tracking_uri: str | None) -> str:
    """--tracking-uri, else the sweep's recorded tracking_uri, else the local store's SQLite file."""
    if tracking_uri:
        return tracking_uri
    spec = SweepLayout.of(output_dir, sweep).state
    if spec.is_file():
        try:
            recorded = json.loads(spec.read_text()).get("tracking_uri")
        except (json.JSONDecodeError, AttributeError) as err:
            raise UserError(f"{spec}: not a sweep record ({err})") from None
        if isinstance(recorded, str) and recorded:
            return recorded
    db = tracking.default_store(output_dir).resolve() / "mlflow.db"
    if not db.is_file():  # MLflow would silently create an empty store there
        raise UserError(f"{db}: no MLflow store here (give --output-dir or --tracking-uri)")
    return tracking.sqlite_uri(db.parent)


def load_trials(uri: str, parent_id: str) -> list[Trial]:
    trials = []
    for run in tracking.children(uri, parent_id):
        run_id = run.info.run_id
        trials.append(Trial(
            key=run.data.tags.get(tracking.TAG_TRIAL, run.info.run_name or run_id),
            name=run.info.run_name or run_id, status=run.info.status, params=dict(run.data.params),
            history={m: tracking.metric_history(uri, run_id, m) for m in sorted(run.data.metrics)}))
    return trials


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    return parser().parse_args(argv)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m orchestrator.report",
        description="Plot every metric of a sweep's trials against training step (one PNG per "
                    "metric, one line per trial), write results.md/results.csv (one row per "
                    "trial: differing params, last value of each metric, best value of eval/ "
                    "metrics) and log them to the sweep's parent MLflow run under report/.")
    p.add_argument("sweep", nargs="+", help="sweep name (the newest parent run of that name) or parent "
                   "run id; with --claims: the claims sweeps' names or folders")
    p.add_argument("--claims", action="store_true",
                   help="the paper's claims page (orchestrator.claims_page) from the claims sweeps "
                        "(default --out docs/results/claims)")
    p.add_argument("--command", help=argparse.SUPPRESS)   # orchestrator.claims: the command to record
    p.add_argument("--commit", help=argparse.SUPPRESS)
    p.add_argument("--output-dir", default="runs/sweeps", type=Path,
                   help="the sweeps' output folder (default: runs/sweeps)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: the sweep's recorded "
                   "one, else <output-dir>/mlflow/mlflow.db read directly)")
    p.add_argument("--experiment", default="softdimo", help="MLflow experiment (default: softdimo)")
    p.add_argument("--metrics", help="comma-separated metrics to plot and tabulate, e.g. "
                   "loss/dimo,ema/entropy (default: all logged except images_seen)")
    p.add_argument("--out", type=Path, help="report folder (default: <output-dir>/<sweep>/report, "
                   "or ./report_<run id> when there is no sweep folder)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.claims:
        from orchestrator import claims_report

        dirs = [Path(s) if Path(s).is_dir() else args.output_dir / s for s in args.sweep]
        command = args.command or "python -m orchestrator.report " + " ".join(sys.argv[1:] if argv is None else argv)
        claims_report.report(dirs, args.out or Path("docs/results/claims"), command, args.commit,
                      args.experiment)
        return 0
    if len(args.sweep) != 1:
        raise UserError(f"one sweep at a time (got {len(args.sweep)}); several only with --claims")
    args.sweep = args.sweep[0]
    uri = resolve_uri(args.sweep, args.output_dir, args.tracking_uri)
    try:
        parent = tracking.find_parent(uri, args.experiment, args.sweep)
    except LookupError as err:
        raise UserError(str(err)) from None
    parent_id = parent.info.run_id
    sweep = parent.data.tags.get(tracking.TAG_SWEEP, args.sweep)
    trials = load_trials(uri, parent_id)
    if not trials:
        raise UserError(f"{args.sweep}: the sweep's parent run {parent_id} has no trial runs yet")
    metrics = default_metrics(trials)
    if args.metrics:
        known = {m for t in trials for m in t.history}
        metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
        for m in metrics:
            if m not in known:
                raise UserError(f"--metrics: {m}: not logged by any trial of {sweep} "
                                f"(logged: {', '.join(sorted(known))})")
    out = args.out
    if out is None:
        sweep_dir = args.output_dir / sweep
        out = sweep_dir / "report" if sweep_dir.is_dir() else Path(f"report_{parent_id}")
    files, table = write_report(trials, metrics, out,
                                f"sweep {sweep}: {len(trials)} trials (parent run {parent_id})")
    try:
        tracking.log_files(uri, parent_id, files, "report")
    except Exception as err:  # the local files are the report; the upload is a convenience
        print(f"warning: could not log the report to run {parent_id}: {err}", file=sys.stderr)
    print(f"report of sweep {sweep} ({len(trials)} trials) in {out.resolve()}")
    print(table)
    return 0


if __name__ == "__main__":
    run_cli(main)
