"""``fedfleet report``'s gossip figure: the spread of the phones' own models around the average
model, their consensus distance, and accuracy against the bytes each phone moved, which puts a
gossip run and a FedAvg run of the same fleet on one axis (docs/gossip.md)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedfleet.report import Run, _figure, _finish, _line, _num, _round

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _phones(run: Run) -> int:
    return int(run.summary.get("phones") or len(run.devices) or 1)


def plot_gossip(runs: list[Run]) -> Figure | None:
    gossiping = [r for r in runs if any(_num(m.get("consensus_distance")) for m in r.metrics)]
    if not gossiping:
        return None
    fig, (spread, consensus, per_byte) = _figure(1, 3)
    _line(spread, runs, _round, "accuracy", "-", " (average model)")
    for i, run in enumerate(runs):
        rows = [m for m in run.metrics if _num(m.get("accuracy_p10")) and _num(m.get("accuracy_p90"))]
        if rows:
            spread.fill_between([m["round"] for m in rows], [m["accuracy_p10"] for m in rows],
                                [m["accuracy_p90"] for m in rows], color=f"C{i}", alpha=0.2,
                                label=f"{run.name} (phones p10-p90)")
    _finish(spread, "accuracy: average model and phones' own", "round", "accuracy")
    _line(consensus, runs, _round, "consensus_distance")
    consensus.set_yscale("log")
    _finish(consensus, "consensus distance (1/n) sum ||x_i - x_bar||^2", "round", "consensus distance")
    for i, run in enumerate(runs):
        total, xs, ys = 0.0, [], []
        for m in run.metrics:
            total += float(m.get("bytes_up", 0)) + float(m.get("bytes_down", 0))
            if _num(m.get("accuracy")):
                xs.append(total / _phones(run))
                ys.append(float(m["accuracy"]))
        per_byte.plot(xs, ys, "-", marker=".", color=f"C{i}", label=run.name)
    per_byte.set_xscale("log")
    _finish(per_byte, "accuracy vs bytes per phone (up + down, cumulative)", "bytes per phone", "accuracy")
    return fig

