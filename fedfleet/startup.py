"""A run's start-up timeline: when each stage from the command to the first merged round was reached.

Each mark is (stage, seconds since the process started, CPU seconds this process had used). The
process's start is read from ``/proc/self/stat`` (Linux), so the first mark covers the interpreter's
own start and the imports before ``fedfleet`` ran any code; elsewhere seconds count from the
Timeline's creation and ``since`` says which. summary.json carries it as ``startup``; CPU seconds
beside wall seconds tell a stage that waited (loaded cores) from one that worked.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any


def process_age_s() -> float | None:
    """Seconds since this process started, from /proc (None where there is no /proc)."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of stat: start time in clock ticks after boot
    return max(uptime - started, 0.0)


@dataclass
class Timeline:
    """Marks in the order they were made; ``mark`` is cheap enough for any stage boundary."""

    origin: float = field(default_factory=time.perf_counter)  # perf_counter() at the process's start
    since: str = "process start"
    marks: list[tuple[str, float, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        age = process_age_s()
        if age is None:
            self.since = "timeline creation"
        else:
            self.origin -= age

    def mark(self, stage: str) -> None:
        self.marks.append((stage, time.perf_counter() - self.origin, time.process_time()))

    def to_dict(self) -> dict[str, Any]:
        """{"since": ..., "stages": [{"stage", "at_s", "cpu_s"}, ...]} for summary.json."""
        return {"since": self.since, "stages": [{"stage": s, "at_s": round(t, 4), "cpu_s": round(c, 4)}
                                                for s, t, c in self.marks]}
