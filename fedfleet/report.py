"""``fedfleet report RUN_DIR [RUN_DIR ...]``: PNG plots and one self-contained report.html.

Reads what a run leaves behind (metrics.jsonl, summary.json, devices.csv). Several run folders are
drawn on the same axes, one colour per run. Fields that only some runs record (compression,
staleness, privacy, per-stage device latency) are plotted when present and skipped otherwise.
"""

from __future__ import annotations

import argparse
import base64
import csv
import html
import io
import json
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeGuard

from fedfleet.output import check_out_dir

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

Record = dict[str, Any]
STAGES = ("download_mean_s", "train_mean_s", "upload_mean_s")  # devices.csv, per phone
ROUND_COLUMNS = ("round", "version", "accuracy", "loss", "updates", "bytes_up", "bytes_down", "latency_p50_s",
                 "latency_p95_s", "latency_max_s", "time_s", "virtual_time_s", "dense_bytes", "compression_ratio",
                 "staleness_mean", "staleness_max", "epsilon_max", "epsilon_median",
                 "accuracy_p10", "accuracy_p90", "consensus_distance", "messages_dropped")  # shown when recorded


@dataclass
class Run:
    name: str  # legend label: the folder name
    path: Path
    metrics: list[Record]
    summary: dict[str, Any] = field(default_factory=dict)
    devices: list[Record] = field(default_factory=list)


# --- reading ------------------------------------------------------------------------------
def load_run(path: Path) -> Run:
    if not path.is_dir():
        raise FileNotFoundError(f"run folder not found: {path}")
    metrics_path = path / "metrics.jsonl"
    if not metrics_path.is_file():
        raise FileNotFoundError(f"{metrics_path}: no metrics.jsonl in the run folder")
    metrics: list[Record] = []
    for lineno, line in enumerate(metrics_path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{metrics_path}:{lineno}: not valid JSON ({exc.msg})") from exc
        if not isinstance(row, dict) or not isinstance(row.get("round"), int):
            raise ValueError(f"{metrics_path}:{lineno}: a round record must be an object with an integer 'round'")
        metrics.append(row)
    if not metrics:
        raise ValueError(f"{metrics_path}: no round records")
    summary: dict[str, Any] = {}
    if (path / "summary.json").is_file():
        try:
            summary = json.loads((path / "summary.json").read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path / 'summary.json'}:{exc.lineno}: not valid JSON ({exc.msg})") from exc
    devices = _read_devices(path / "devices.csv") if (path / "devices.csv").is_file() else []
    return Run(path.resolve().name or str(path), path, metrics, summary, devices)


def _read_devices(path: Path) -> list[Record]:
    rows: list[Record] = []
    with path.open(newline="") as f:
        for lineno, row in enumerate(csv.DictReader(f), start=2):
            parsed: Record = {"phone": row.get("phone", "")}
            for key, value in row.items():
                try:
                    if key not in ("phone", None):
                        parsed[key] = float(value) if value not in ("", None) else None
                except ValueError:
                    raise ValueError(f"{path}:{lineno}: column {key!r} is not a number: {value!r}") from None
            rows.append(parsed)
    return rows


def load_runs(paths: list[Path]) -> list[Run]:
    runs = [load_run(p) for p in paths]
    if len({r.name for r in runs}) < len(runs):  # same folder name in different places
        for r in runs:
            r.name = str(r.path)
    return runs


# --- numbers -------------------------------------------------------------------------------
def _num(value: Any) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _values(run: Run, key: str) -> list[float]:
    return [float(r[key]) for r in run.metrics if _num(r.get(key))]


def _time(r: Record) -> float | None:
    t = r.get("virtual_time_s", r.get("time_s"))
    return float(t) if _num(t) else None


def _dense(r: Record) -> float | None:
    """Bytes the round's uploads would take as dense float32 (compression_ratio = dense / sent)."""
    dense, ratio, up = r.get("dense_bytes"), r.get("compression_ratio"), r.get("bytes_up")
    return float(dense) if _num(dense) else float(up) * float(ratio) if _num(ratio) and _num(up) else None


def summary_row(run: Run) -> dict[str, Any]:
    """The report's headline numbers, all computed from metrics.jsonl except the phone counts."""
    m, last = run.metrics, run.metrics[-1]
    accs, p50, p95 = _values(run, "accuracy"), _values(run, "latency_p50_s"), _values(run, "latency_p95_s")
    row: dict[str, Any] = {
        "run": run.name, "rounds": len(m), "final version": last.get("version"),
        "final accuracy": last.get("accuracy"), "best accuracy": max(accs) if accs else None,
        "final loss": last.get("loss"), "updates": sum(int(r.get("updates", 0)) for r in m),
        "bytes up": sum(int(r.get("bytes_up", 0)) for r in m),
        "bytes down": sum(int(r.get("bytes_down", 0)) for r in m),
        "median p50 latency s": statistics.median(p50) if p50 else None,
        "max p95 latency s": max(p95) if p95 else None, "time s": _time(last),
        "phones": run.summary.get("phones", len(run.devices) or None),
        "phones participated": run.summary.get("phones_participated"),
        # the user's task: its model and data specs, one example's shape, the trained weights' file
        "model": run.summary.get("config", {}).get("model"), "dataset": run.summary.get("config", {}).get("dataset"),
        "input shape": run.summary.get("task", {}).get("input_shape"),
        "final weights": (run.summary.get("final_weights") or {}).get("path"),
    }
    if any(_num(r.get("epsilon_max")) for r in m):
        row["final epsilon_max"] = last.get("epsilon_max")
    task = run.summary.get("task", {})
    if task.get("loss") not in (None, "cross_entropy"):
        row["training loss"] = task["loss"]
    row.update({f"final {name}": value for name, value in _task_metrics(last).items()})  # --metrics
    return row


def _task_metrics(r: Record) -> dict[str, Any]:
    """The task's own metrics (--metrics) a round recorded, by name."""
    found = r.get("metrics")
    return dict(found) if isinstance(found, dict) else {}


# --- plots (matplotlib's Agg canvas; no pyplot, no global state) ----------------------------
def _figure(rows: int, cols: int, height: float = 3.6) -> tuple[Figure, list[Axes]]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0 * cols, height * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, [ax for row in axes for ax in row]


def _line(ax: Axes, runs: list[Run], x: Callable[[Record], float | None], key: str | Callable[[Record], Any],
          style: str = "-", suffix: str = "", cumulative: bool = False) -> None:
    get = key if callable(key) else (lambda r: r.get(key))
    for i, run in enumerate(runs):
        pts = [(x(r), get(r)) for r in run.metrics]
        xs = [float(a) for a, b in pts if a is not None and _num(b)]
        ys = [float(b) for a, b in pts if a is not None and _num(b)]
        ys = list(accumulate(ys)) if cumulative else ys
        if xs:
            ax.plot(xs, ys, style, color=f"C{i}", marker="." if style == "-" else None, label=run.name + suffix)


def _finish(ax: Axes, title: str, xlabel: str, ylabel: str) -> None:
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    from matplotlib.ticker import MaxNLocator

    if xlabel in ("round", "phone"):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if ylabel in ("rounds", "phones", "rounds taken part in"):
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")


def _round(r: Record) -> float:
    return float(r["round"])


def plot_quality(runs: list[Run]) -> Figure | None:
    fig, axes = _figure(2, 2)
    for row, key in enumerate(("accuracy", "loss")):
        for col, (x, xlabel) in enumerate(((_round, "round"), (_time, "time (s; virtual where recorded)"))):
            ax = axes[2 * row + col]
            _line(ax, runs, x, key)
            _finish(ax, f"{key} vs {xlabel.split()[0]}", xlabel, key)
    return fig


def plot_bytes(runs: list[Run]) -> Figure | None:
    fig, (per_round, total) = _figure(1, 2)
    for ax, cumulative in ((per_round, False), (total, True)):
        _line(ax, runs, _round, "bytes_up", "-", " up", cumulative)
        _line(ax, runs, _round, "bytes_down", "--", " down", cumulative)
        _line(ax, runs, _round, _dense, ":", " up, dense float32", cumulative)
    _finish(per_round, "bytes per round", "round", "bytes")
    _finish(total, "cumulative bytes", "round", "bytes")
    return fig


def plot_latency(runs: list[Run]) -> Figure | None:
    fig, (ax,) = _figure(1, 1)
    for key, style in (("latency_p50_s", "-"), ("latency_p95_s", "--"), ("latency_max_s", ":")):
        _line(ax, runs, _round, key, style, " " + key.split("_")[1])
    _finish(ax, "round latency (task handed out → update accepted)", "round", "seconds")
    return fig


def _hist(ax: Axes, runs: list[Run], values: Callable[[Run], list[float]], style: str = "-", suffix: str = "") -> None:
    for i, run in enumerate(runs):
        if vs := values(run):
            ax.hist(vs, bins=20, histtype="step", linestyle=style, color=f"C{i}", label=run.name + suffix)


def plot_staleness(runs: list[Run]) -> Figure | None:
    if not any(_values(run, k) for run in runs for k in ("staleness_mean", "staleness_max")):
        return None
    fig, (trend, hist) = _figure(1, 2)
    _hist(hist, runs, lambda run: _values(run, "staleness_mean"), "-", " mean")
    _hist(hist, runs, lambda run: _values(run, "staleness_max"), "--", " max")
    _line(trend, runs, _round, "staleness_mean", "-", " mean")
    _line(trend, runs, _round, "staleness_max", "--", " max")
    _finish(trend, "staleness per round", "round", "versions behind")
    _finish(hist, "staleness over rounds", "versions behind", "rounds")
    return fig


def _epsilons(run: Run) -> list[float]:
    return [d["epsilon"] for d in run.devices if _num(d.get("epsilon"))]


def plot_privacy(runs: list[Run]) -> Figure | None:
    if not any(_epsilons(run) or _values(run, "epsilon_max") or _values(run, "epsilon_median") for run in runs):
        return None
    fig, (hist, trend) = _figure(1, 2)
    _hist(hist, runs, _epsilons)
    _line(trend, runs, _round, "epsilon_max", "-", " max")
    _line(trend, runs, _round, "epsilon_median", "--", " median")
    _finish(hist, "ε per phone (devices.csv)", "ε", "phones")
    _finish(trend, "ε over rounds", "round", "ε")
    return fig


def plot_participation(runs: list[Run]) -> Figure | None:
    if not any(run.devices for run in runs):
        return None
    fig, (ax,) = _figure(1, 1)
    width = 0.8 / len(runs)
    for i, run in enumerate(runs):
        counts = [d.get("participations") or 0.0 for d in run.devices]
        ax.bar([j + i * width for j in range(len(counts))], counts, width, color=f"C{i}", label=run.name)
    _finish(ax, "participations per phone (devices.csv order)", "phone", "rounds taken part in")
    return fig


def plot_device_latency(runs: list[Run]) -> Figure | None:
    runs = [r for r in runs if r.devices and any(k in r.devices[0] for k in (*STAGES, "latency_mean_s"))]
    if not runs:
        return None
    fig, axes = _figure(len(runs), 1, height=3.2)
    for ax, run in zip(axes, runs, strict=True):
        xs, bottom = list(range(len(run.devices))), [0.0] * len(run.devices)
        for j, stage in enumerate(s for s in STAGES if s in run.devices[0]):
            heights = [d.get(stage) or 0.0 for d in run.devices]
            ax.bar(xs, heights, 0.8, bottom=bottom, color=f"C{j}", label=stage.removesuffix("_mean_s"))
            bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
        if "latency_mean_s" in run.devices[0]:
            ys = [d.get("latency_mean_s") for d in run.devices]
            ax.plot([x for x, y in zip(xs, ys, strict=True) if y is not None], [y for y in ys if y is not None],
                    "k_", markersize=12, markeredgewidth=2, label="task → accepted (mean)")
        _finish(ax, f"per-phone latency: {run.name}", "phone", "seconds (mean per task)")
    return fig


PLOTS: list[tuple[str, str, Callable[[list[Run]], Figure | None]]] = [
    ("accuracy_loss", "Accuracy and loss", plot_quality),
    ("bytes", "Bytes up and down", plot_bytes),
    ("latency", "Round latency", plot_latency),
    ("staleness", "Staleness (asynchronous rounds)", plot_staleness),
    ("privacy", "Privacy budget", plot_privacy),
    ("participation", "Participation per phone", plot_participation),
    ("device_latency", "Per-phone latency breakdown", plot_device_latency),
    ("gossip", "Gossip: phones' spread, consensus, accuracy per byte", lambda runs: _plot_gossip(runs)),
]


def _plot_gossip(runs: list[Run]) -> Figure | None:
    from fedfleet.report_gossip import plot_gossip  # it draws with this module's helpers

    return plot_gossip(runs)


# --- HTML ----------------------------------------------------------------------------------
def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if math.isfinite(value) else "–"
    return "–" if value is None else html.escape(str(value))


def _table(rows: list[dict[str, Any]]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
    body = "".join("<tr>" + "".join(f"<td>{_cell(r.get(k))}</td>" for k in keys) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _rounds_table(run: Run) -> str:
    keys = [k for k in ROUND_COLUMNS if any(k in r for r in run.metrics)]
    return _table([{**{k: r.get(k) for k in keys}, **_task_metrics(r)} for r in run.metrics])


STYLE = """body{font:14px system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f3f3f3}img{max-width:100%}
.skipped{color:#777}"""


def render(runs: list[Run], out: Path) -> Path:
    """Write one PNG per plot that has data and ``report.html`` embedding them; return its path."""
    out.mkdir(parents=True, exist_ok=True)
    title = "fedfleet report: " + ", ".join(r.name for r in runs)
    parts = [f"<h1>{html.escape(title)}</h1>", "<h2>Summary</h2>", _table([summary_row(r) for r in runs])]
    skipped: list[str] = []
    for stem, heading, plot in PLOTS:
        fig = plot(runs)
        if fig is None:
            skipped.append(heading)
            continue
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        (out / f"{stem}.png").write_bytes(buf.getvalue())
        data = base64.b64encode(buf.getvalue()).decode()
        parts.append(f'<h2>{html.escape(heading)}</h2><img alt="{stem}" src="data:image/png;base64,{data}">')
    if skipped:
        parts.append(f'<p class="skipped">Not recorded in these runs: {html.escape(", ".join(skipped))}.</p>')
    for run in runs:
        parts.append(f"<details><summary>Rounds of {html.escape(run.name)}</summary>{_rounds_table(run)}</details>")
    page = (f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style></head><body>{''.join(parts)}</body></html>\n")
    path = out / "report.html"
    path.write_text(page)
    return path


# --- CLI -----------------------------------------------------------------------------------
def cmd_report(args: argparse.Namespace) -> int:
    from fedfleet.cli_errors import checking_input

    paths = [Path(p) for p in args.run_dirs]
    with checking_input():  # the run folders the user named, and where the report goes
        runs = load_runs(paths)
        out = check_out_dir(args.out if args.out else paths[0] / "report", "--out" if args.out else "report folder")
    print(f"wrote {render(runs, out)}", flush=True)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser("report", help="plots and a self-contained report.html of one or more runs")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="folders with metrics.jsonl (several: compared)")
    p.add_argument("--out", help="output folder (default RUN_DIR/report of the first run)")
    p.set_defaults(func=cmd_report)
