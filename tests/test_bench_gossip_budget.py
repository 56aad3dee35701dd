"""The gossip benchmark's same-budget view (bench/gossip_budget.py) on hand-made round records."""

from __future__ import annotations

from bench.gossip_budget import curve, same_budget, within


def _rows(per_round: int, accuracies: list[float]) -> list[dict[str, object]]:
    return [{"round": r, "bytes_up": per_round // 2, "bytes_down": per_round - per_round // 2, "accuracy": a,
             "time_s": float(r)} for r, a in enumerate(accuracies, start=1)]


def test_each_row_is_held_to_the_references_bytes() -> None:
    fedavg_curve = curve(_rows(1000, [0.5, 0.7, 0.8, 0.9]), phones=10)
    cheap_curve = curve(_rows(500, [0.3, 0.6, 0.7, 0.8, 0.86, 0.87, 0.88, 0.89, 0.95]), phones=10)
    dear_curve = curve(_rows(5000, [0.9, 0.99]), phones=10)
    fedavg = {"setting": "fedavg", "accuracy": 0.9, "curve": fedavg_curve}
    cheap = {"setting": "cheap", "accuracy": 0.95, "curve": cheap_curve}
    dear = {"setting": "dear", "accuracy": 0.99, "curve": dear_curve}
    assert fedavg_curve[-1] == {"round": 4, "bytes_per_phone": 400, "accuracy": 0.9, "time_s": 4.0}
    found = within(cheap_curve, 400)
    assert found is not None and found["round"] == 8
    assert within(dear_curve, 400) is None
    by = {r["setting"]: r for r in same_budget([fedavg, cheap, dear], "fedavg")}
    assert by["fedavg"]["points_behind"] == 0.0 and by["fedavg"]["round"] == 4
    assert by["cheap"]["round"] == 8 and by["cheap"]["accuracy"] == 0.89 and by["cheap"]["points_behind"] == 1.0
    assert by["dear"]["round"] is None and by["dear"]["accuracy"] is None
