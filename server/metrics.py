"""The per-round metrics schema: one JSON object per published version (metrics.jsonl)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


@dataclass
class RoundRecord:
    round: int  # 1-based round that produced ``version``
    version: int  # model version published by this round
    accuracy: float | None  # server-side evaluation on the held-out split
    loss: float | None  # held-out loss
    train_loss: float | None  # mean local training loss reported by phones
    updates: int  # updates merged
    selected: int  # phones handed work this round (over-selection included)
    dropped: int  # selected phones whose update did not make it
    rejected: int  # uploads refused with a 4xx during the round
    bytes_up: int  # HTTP request bodies from phones during the round
    bytes_down: int  # HTTP response bodies to phones during the round
    latency_p50_s: float  # per phone: task handed out -> update accepted
    latency_p95_s: float
    wall_s: float  # round opened -> version published (server clock)
    aggregate_ms: float  # server processing time to merge and publish (wall time)
    time_s: float  # server clock at publication, relative to server start
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(d.pop("extra"))
        return d


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else 0.0
