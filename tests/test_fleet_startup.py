"""A fleet's start-up and wrap-up: the server process started before the fleet's imports,
devices.csv's means computed without numpy round trips."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from device_runtime.client import _mean_cell
from device_runtime.data import load_dataset
from fedfleet.simulate import ServerProcess, SimulateConfig


def test_devices_csv_means_are_numpys_bit_for_bit() -> None:
    rng = np.random.default_rng(3)
    for _ in range(3000):
        n = int(rng.integers(1, 13))  # both sides of numpy's 8-value switch to pairwise sums
        xs = (rng.random(n) * 10.0 ** rng.integers(-5, 3, n)).tolist()
        assert _mean_cell(xs) == round(float(np.mean(xs)), 4)
        assert repr(_mean_cell(xs)) == repr(round(float(np.mean(xs)), 4))
    assert _mean_cell([]) == ""
    assert repr(_mean_cell([0.0, 0.0])) == repr(round(float(np.mean([0.0, 0.0])), 4))


def test_the_simulate_module_leaves_torch_to_the_fleet() -> None:
    """The server process is started before the fleet imports torch (~2.5 s), which only works
    while importing fedfleet.simulate does not bring torch with it."""
    code = "import sys, fedfleet.simulate; print(json.dumps(sorted(m for m in ('torch', 'aiohttp') if m in sys.modules)))"
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
