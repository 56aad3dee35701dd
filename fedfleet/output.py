"""What a run leaves behind: the live round table, metrics.jsonl, summary.json, devices.csv."""

from __future__ import annotations

import csv
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from fedfleet.device_runtime.phone_stats import PhoneStats

COLUMNS = [
    ("round", "{:>5}", 5),
    ("accuracy", "{:>8.4f}", 8),
    ("loss", "{:>7.4f}", 7),
    ("updates", "{:>7}", 7),
    ("bytes_up", "{:>10}", 10),
    ("bytes_down", "{:>10}", 10),
    ("latency_p50_s", "{:>7.3f}", 7),
    ("latency_p95_s", "{:>7.3f}", 7),
    ("wall_s", "{:>7.2f}", 7),
]
HEADINGS = {"latency_p50_s": "p50 s", "latency_p95_s": "p95 s", "updates": "phones", "bytes_up": "bytes up",
            "bytes_down": "bytes dn", "accuracy": "acc", "wall_s": "wall s"}


class RoundTable:
    """Prints one line per published round as it arrives; on a terminal, a progress bar
    (tqdm) below the table shows rounds done, server time, updates/s and accuracy."""

    def __init__(self, stream: TextIO | None = None, total: int = 0, progress: bool | None = None) -> None:
        stream = stream if stream is not None else sys.stdout  # looked up now: tests swap sys.stdout
        self.stream = stream
        self.printed_header = False
        self.bar: Any = None
        self.updates = 0
        self.t0 = time.perf_counter()
        if progress if progress is not None else stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total or None, unit="round", file=stream, dynamic_ncols=True, leave=False)

    def _line(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    def __call__(self, row: dict[str, Any]) -> None:
        if not self.printed_header:
            self._line(" ".join(f"{HEADINGS.get(k, k):>{w}}" for k, _, w in COLUMNS))
            self.printed_header = True
        cells = []
        for key, fmt, width in COLUMNS:
            value = row.get(key)
            cells.append(fmt.format(value) if value is not None else f"{'-':>{width}}")
        self._line(" ".join(cells))
        self.updates += int(row.get("updates", 0))
        if self.bar is not None:
            rate = self.updates / max(time.perf_counter() - self.t0, 1e-9)
            self.bar.set_postfix(server_t=f"{row.get('time_s', 0):.0f}s", upd_per_s=f"{rate:.1f}",
                                 acc=row.get("accuracy"), refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def check_out_dir(path: str | Path, flag: str = "--out", create: bool = True) -> Path:
    """Make sure ``path`` is a folder this process can write into (``create``: creating it and its
    parents now; else only that it could be), before any work whose results would go there;
    ValueError naming ``flag`` otherwise."""
    out = Path(path)
    if not create:
        existing = out
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if existing.exists() and not existing.is_dir():
            raise ValueError(f"{flag} {path}: {existing} exists and is not a folder")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ValueError(f"{flag} {path}: {existing} is not writable")
        return out
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ValueError(f"{flag} {path}: exists and is not a folder") from None
    except OSError as exc:
        raise ValueError(f"{flag} {path}: cannot create it ({exc.strerror or exc})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: the folder is not writable")
    return out


def write_run(out: Path, rounds: Sequence[dict[str, Any]], devices: Sequence[PhoneStats], summary: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with (out / "metrics.jsonl").open("w") as f:
        for row in rounds:
            f.write(json.dumps(row) + "\n")
    rows = [d.row() for d in devices]
    if rows:
        with (out / "devices.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def summarize(rounds: Sequence[dict[str, Any]], devices: Sequence[PhoneStats], wall_s: float) -> dict[str, Any]:
    last = rounds[-1] if rounds else {}
    accs = [r["accuracy"] for r in rounds if r.get("accuracy") is not None]
    return {
        "rounds": len(rounds),
        "final_version": last.get("version"),
        "final_accuracy": last.get("accuracy"),
        "best_accuracy": max(accs) if accs else None,
        "final_loss": last.get("loss"),
        # the task's own metrics (--metrics) of the last evaluated version, by name
        "final_metrics": next((r["metrics"] for r in reversed(rounds) if r.get("metrics")), None),
        "updates": sum(r["updates"] for r in rounds),
        "bytes_up": sum(r["bytes_up"] for r in rounds),
        "bytes_down": sum(r["bytes_down"] for r in rounds),
        "phones": len(devices),
        "phones_participated": sum(1 for d in devices if d.participations),
        "wall_s": round(wall_s, 3),
    }
