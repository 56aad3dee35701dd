"""A fleet's start-up and wrap-up: the server process started before the fleet's imports, phones
registered and started in waves, devices.csv's means computed without numpy round trips."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from fedfleet.device_runtime import fleet
from fedfleet.device_runtime.data import load_dataset
from fedfleet.device_runtime.phone_stats import _mean_cell
from fedfleet.serving import ServerProcess
from fedfleet.simulate import simulate
from fedfleet.simulate_config import SimulateConfig


def test_devices_csv_means_are_numpys_bit_for_bit() -> None:
    rng = np.random.default_rng(3)
    for _ in range(3000):
        n = int(rng.integers(1, 13))  # both sides of numpy's 8-value switch to pairwise sums
        xs = (rng.random(n) * 10.0 ** rng.integers(-5, 3, n)).tolist()
        assert _mean_cell(xs) == round(float(np.mean(xs)), 4)
        assert repr(_mean_cell(xs)) == repr(round(float(np.mean(xs)), 4))
    assert _mean_cell([]) == ""
    assert repr(_mean_cell([0.0, 0.0])) == repr(round(float(np.mean([0.0, 0.0])), 4))


async def test_waves_let_the_started_ones_run_before_the_next_wave() -> None:
    ran: list[int] = []
    created_after: list[int] = []

    async def phone(i: int) -> None:
        ran.append(i)

    def phones(wave_log: list[int]) -> Iterator[Any]:
        for i in range(6):
            wave_log.append(len(ran))  # how many had run when this one was created
            yield phone(i)

    await fleet._in_waves(phones(created_after), 2)
    assert created_after == [0, 0, 2, 2, 4, 4]
    assert sorted(ran) == list(range(6))

    ran.clear()
    in_one_pass: list[int] = []
    await fleet._in_waves(phones(in_one_pass), 0)
    assert in_one_pass == [0] * 6
    assert sorted(ran) == list(range(6))


async def test_waves_cancel_what_they_started_when_the_source_fails() -> None:
    cancelled: list[int] = []

    async def waiting(i: int) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(i)
            raise

    def source() -> Iterator[Any]:
        yield from (waiting(i) for i in range(3))
        raise ValueError("phone 3 could not be built")

    before = asyncio.all_tasks()
    with pytest.raises(ValueError, match="could not be built"):
        await fleet._in_waves(source(), 2)
    await asyncio.sleep(0)
    assert cancelled == [0, 1]  # the third was cancelled before it ever ran
    assert not [t for t in asyncio.all_tasks() - before if not t.done()]


@pytest.mark.parametrize("module", ["fedfleet.simulate", "fedfleet.serving"])
def test_the_simulate_modules_leave_torch_to_the_fleet(module: str) -> None:
    """The server process is started before the fleet imports torch (~2.5 s), which only works
    while importing fedfleet.simulate (and fedfleet.serving, which it imports) does not bring
    torch with it."""
    code = f"import sys, {module}; print(json.dumps(sorted(m for m in ('torch', 'aiohttp') if m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", "import json; " + code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert json.loads(out.stdout) == []


async def test_a_server_process_started_early_serves_the_configuration_sent_later(tmp_path: Path) -> None:
    child = ServerProcess()  # starts importing now, without a configuration
    try:
        data = load_dataset("digits", seed=0)
        cfg = SimulateConfig(phones=4, dataset="digits", model="mlp", rounds=1, out=str(tmp_path))
        url = await child.serve(cfg.server_config(data, str(tmp_path / "server")), data)
        async with aiohttp.ClientSession() as s, s.get(url + "/v1/task") as resp:
            task = await resp.json()
        assert resp.status == 200 and tuple(task["input_shape"]) == data.input_shape
        child.check_alive()
    finally:
        await child.stop()
    with pytest.raises(RuntimeError, match="died during the run"):
        child.check_alive()
    assert (tmp_path / "server" / "server.sqlite").exists()


async def test_a_server_process_never_configured_stops_promptly() -> None:
    child = ServerProcess()
    t0 = time.monotonic()
    await child.stop()
    assert time.monotonic() - t0 < 25  # not the 30 s join timeout: it left (or was terminated) at once
    with pytest.raises(RuntimeError):
        child.check_alive()


def test_registering_in_waves_changes_nothing_on_a_virtual_clock(tmp_path: Path, monkeypatch: Any) -> None:
    """Phones registered 3 at a time (each built just before) and all at once: the same run."""

    def run(name: str, wave: int) -> tuple[str, bytes]:
        monkeypatch.setattr(fleet, "WAVE", wave)
        cfg = SimulateConfig(phones=20, dataset="digits", model="mlp", local_epochs=1, mode="async", concurrency=5,
                             buffer=3, rounds=0, hours=1 / 60, devices="default", seed=11, out=str(tmp_path / name),
                             server={"rest_after_update_s": 20.0})
        result, _ = asyncio.run(simulate(cfg))
        assert [d.phone for d in result.devices] == [f"phone-{i:05d}" for i in range(20)]
        rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        assert len(rows) >= 3, "the run should publish several versions"
        metrics = "\n".join(json.dumps({k: v for k, v in r.items() if k != "aggregate_ms"}, sort_keys=True)
                            for r in rows)
        return metrics, (tmp_path / name / "devices.csv").read_bytes()

    assert run("waves", 3) == run("one-pass", 0)
