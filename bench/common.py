"""Helpers shared by the federated-run benchmarks: run simulations, print a table, write JSON."""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedfleet.device_runtime import aio
from fedfleet.simulate import simulate
from fedfleet.simulate_config import SimulateConfig
from fedfleet.tuning import tune_process

RESULTS = Path(__file__).parent / "results"


def run_sim(cfg: SimulateConfig) -> tuple[list[dict[str, Any]], dict[str, Any], float]:
    tune_process()  # as the command line's simulate (see fedfleet.tuning)
    t0 = time.perf_counter()
    result, summary = aio.run(simulate(cfg, torch_threads=1))
    return result.rounds, summary, time.perf_counter() - t0


def first_reaching(rows: Sequence[dict[str, Any]], target: float) -> dict[str, Any] | None:
    """The first round record whose accuracy reaches ``target``, with cumulative totals."""
    updates = up = 0
    for row in rows:
        updates += row["updates"]
        up += row["bytes_up"]
        if row.get("accuracy") is not None and row["accuracy"] >= target:
            return {"round": row["round"], "time_s": row["time_s"], "updates": updates, "bytes_up": up}
    return None


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(_fmt(r.get(c)).rjust(w) for c, w in zip(columns, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    return str(v)


def provenance() -> dict[str, Any]:
    """What a result needs to be read later: the command that produced it, when (UTC), and on what."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    program = f"python -m {spec.name}" if spec is not None else f"python {sys.argv[0]}"
    return {
        "command": " ".join([program, *map(shlex.quote, sys.argv[1:])]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {"python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
                    "cores": os.cpu_count()},
    }


def write(name: str, payload: dict[str, Any], directory: Path = RESULTS) -> Path:
    """bench/results/NAME.json: the payload after its provenance (command, date, machine)."""
    directory.mkdir(parents=True, exist_ok=True)
    payload = {**provenance(), **payload}
    path = directory / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def wait_listening(proc: Any, port: int, log: Path | None = None, timeout_s: float = 120.0) -> None:
    """Return once a server subprocess accepts connections on ``port``; raise (with its log) if it dies."""
    import socket

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(log.read_text() if log is not None else "server died") from None
            time.sleep(0.2)
    raise TimeoutError("server did not start")
