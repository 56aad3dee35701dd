"""What one phone saw, from its side of the wire: counts, bytes and step times, as a row of a
fleet's devices.csv."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class PhoneStats:
    """What one phone saw, from its side of the wire."""

    phone: str
    examples: int
    participations: int = 0
    checkins: int = 0
    rejected: int = 0
    errors: int = 0
    drops: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    latencies_s: list[float] = field(default_factory=list)  # task handed out -> upload acknowledged
    download_s: list[float] = field(default_factory=list)
    train_s: list[float] = field(default_factory=list)
    upload_s: list[float] = field(default_factory=list)
    epsilon: float | None = None  # local-DP epsilon this phone spent (its own ledger)

    def row(self) -> dict[str, Any]:
        mean = _mean_cell
        return {
            "phone": self.phone,
            "examples": self.examples,
            "participations": self.participations,
            "checkins": self.checkins,
            "rejected": self.rejected,
            "drops": self.drops,
            "errors": self.errors,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "latency_mean_s": mean(self.latencies_s),
            "download_mean_s": mean(self.download_s),
            "train_mean_s": mean(self.train_s),
            "upload_mean_s": mean(self.upload_s),
            "epsilon": "" if self.epsilon is None else round(self.epsilon, 4),
        }


def _mean_cell(xs: list[float]) -> float | str:
    """``round(np.mean(xs), 4)``, or "" for no values, bit for bit. A fleet's devices.csv takes four of
    these per phone, mostly over one to three values, where np.mean's array round trip cost ~10 us
    each (~0.4 s at 10,000 phones). numpy adds fewer than 8 float64s one after another from 0.0
    (from 8 on, with 8 partial sums), so the short lists are summed here in that same order."""
    if not xs:
        return ""
    if len(xs) >= 8:
        return round(float(np.mean(xs)), 4)
    total = 0.0
    for x in xs:
        total += x
    return round(float(total) / len(xs), 4)
