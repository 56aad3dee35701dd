"""Ctrl-C and SIGTERM on ``fedfleet simulate`` and ``fedfleet fleet``: real processes, real signals.
The first signal ends the run after the rounds done and still writes its outputs (exit 128 + signal);
a second exits at once; a ``--rounds 0`` ("forever") run is how a user gets outputs at all."""

from __future__ import annotations

import csv
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BASE = [sys.executable, "-m", "fedfleet.cli"]


def _start(*argv: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([*BASE, *argv], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)


def _wait_for_round(proc: subprocess.Popen[str], round_no: int, timeout_s: float = 180.0) -> list[str]:
    """Read the round table until round ``round_no`` is printed."""
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))[0]:
            break  # silent until the deadline: a hang must fail the test, not stall it
        line = proc.stdout.readline()
        assert line, f"exited early: {proc.wait()} {proc.stderr.read() if proc.stderr else ''}"
        lines.append(line)
        cells = line.split()
        if cells and cells[0].isdigit() and int(cells[0]) >= round_no:
            return lines
    raise AssertionError("no round in time")


def _outputs(out: Path) -> tuple[list[dict[str, object]], dict[str, object], list[dict[str, str]]]:
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    devices = list(csv.DictReader((out / "devices.csv").open())) if (out / "devices.csv").exists() else []
    return metrics, summary, devices


@pytest.mark.parametrize("sig, extra", [
    (signal.SIGINT, []),  # the server on the fleet's loop
    (signal.SIGTERM, ["--server-process", "yes"]),  # the server in a child process
    (signal.SIGINT, ["--devices", "default"]),  # a virtual clock
])
@pytest.mark.slow
def test_a_forever_simulation_stops_cleanly_and_writes_its_outputs(tmp_path: Path, sig: signal.Signals,
                                                                    extra: list[str]) -> None:
    out = tmp_path / "run"
    proc = _start("simulate", "--phones", "6", "--rounds", "0", "--model", "mlp", "--out", str(out), *extra)
    try:
        _wait_for_round(proc, 3)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + sig, err
    assert "Traceback" not in err and f"stopped by {sig.name}" in err
    metrics, summary, devices = _outputs(out)
    assert len(metrics) >= 3 and [m["round"] for m in metrics] == list(range(1, len(metrics) + 1))
    assert summary["rounds"] == len(metrics) and summary["interrupted"] == sig.name
    assert len(devices) == 6 and sum(int(d["participations"]) for d in devices) >= 3 * 3
    server_rounds = (out / "server" / "metrics.jsonl").read_text().splitlines()
    assert len(server_rounds) == len(metrics)  # the server recorded no round the outputs lack


@pytest.mark.slow
def test_a_second_signal_exits_at_once(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = _start("simulate", "--phones", "6", "--rounds", "0", "--model", "mlp", "--server-process", "yes",
                  "--out", str(out))
    try:
        _wait_for_round(proc, 1)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.2)  # the first is handled: the second must not wait for the fleet to stop
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "Traceback" not in err, err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_ctrl_c_on_a_fleet_writes_the_rounds_seen(tmp_path: Path) -> None:
    port = _free_port()
    server = _start("serve", "--port", str(port), "--model", "mlp", "--rounds", "0")
    try:
        assert server.stdout is not None and "listening" in server.stdout.readline()
        fleet = _start("fleet", "--server", f"http://127.0.0.1:{port}", "--phones", "4", "--out", str(tmp_path))
        try:
            _wait_for_round(fleet, 2)
            fleet.send_signal(signal.SIGINT)
            _, err = fleet.communicate(timeout=60)
        finally:
            fleet.kill()
    finally:
        server.terminate()
        server.wait(30)
    assert fleet.returncode == 130 and "Traceback" not in err, err
    metrics, summary, _ = _outputs(tmp_path)
    assert len(metrics) >= 2 and summary["rounds"] == len(metrics) and summary["interrupted"] == "SIGINT"
