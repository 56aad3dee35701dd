"""Gossip against FedAvg at the same bytes per phone (bench/bench_gossip.py): each run's curve of
accuracy against cumulative bytes, and what every run reached within another run's spend."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def curve(rows: Sequence[dict[str, Any]], phones: int) -> list[dict[str, Any]]:
    """Per round: the round, cumulative bytes per phone (up + down, as the server counted them:
    gossip's first round carries the initial model's download) and the average model's accuracy."""
    spent = 0
    out = []
    for row in rows:
        spent += row["bytes_up"] + row["bytes_down"]
        out.append({"round": row["round"], "bytes_per_phone": spent // phones, "accuracy": row.get("accuracy"),
                    "time_s": row.get("time_s")})
    return out


def within(points: Sequence[dict[str, Any]], budget: int) -> dict[str, Any] | None:
    """The last point of a curve whose cumulative bytes per phone are at most ``budget`` (None: its
    first round already spent more)."""
    inside = [p for p in points if p["bytes_per_phone"] <= budget]
    return inside[-1] if inside else None


def same_budget(rows: Sequence[dict[str, Any]], reference: str) -> list[dict[str, Any]]:
    """Every row at the reference row's total bytes per phone: its round and accuracy there, and
    the points it trails the reference's final accuracy by (negative: ahead)."""
    ref = next(r for r in rows if r["setting"] == reference)
    budget = ref["curve"][-1]["bytes_per_phone"]
    out = []
    for row in rows:
        point = within(row["curve"], budget)
        acc = point["accuracy"] if point is not None else None
        out.append({"setting": row["setting"], "budget_per_phone": budget,
                    "round": point["round"] if point is not None else None,
                    "bytes_per_phone": point["bytes_per_phone"] if point is not None else None,
                    "accuracy": acc,
                    "points_behind": round(100 * (ref["accuracy"] - acc), 1) if acc is not None else None})
    return out
