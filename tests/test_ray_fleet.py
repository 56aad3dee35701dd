"""The fleet sharded over processes: shards rebuild the same phones, and a real Ray-backed run.

The Ray run starts a real local Ray cluster from ``fedfleet fleet --backend ray`` in a
subprocess, against the real server on a loopback port, and checks that the cluster is gone
afterwards. Ray keeps its sessions in a private temporary folder that the test deletes.
"""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp import web

from fedfleet.cli import main
from fedfleet.device_runtime.data import Dataset, load_dataset, partition
from fedfleet.device_runtime.fleet import run_fleet
from fedfleet.device_runtime.fleet_plan import FleetConfig, shard_phones
from fedfleet.device_runtime.runtimes.torch_runtime import torch_runtime_for_task
from fedfleet.server.app import make_app
from fedfleet.server.config import ServerConfig
from fedfleet.server.state import COORD, STORE

PHONES = 8


def test_shards_are_contiguous_blocks_covering_every_phone_once() -> None:
    for phones in (1, 7, 8, 50):
        for count in range(1, min(phones, 6) + 1):
            blocks = [shard_phones(phones, i, count) for i in range(count)]
            assert [i for b in blocks for i in b] == list(range(phones))
            assert max(map(len, blocks)) - min(map(len, blocks)) <= 1
    with pytest.raises(ValueError, match="not a shard"):
        FleetConfig(phones=4, shard_index=2, shard_count=2)
    with pytest.raises(ValueError, match="not a shard"):
        FleetConfig(phones=2, shard_index=0, shard_count=3)


async def test_two_shards_run_exactly_the_phones_of_one_fleet(make_server: Any, digits: Dataset) -> None:
    """Two shards in one event loop (as Ray runs them in two processes) against the real server:
    every phone registered once, with the name and data it has in an unsharded fleet."""
    client = await make_server(rounds=2, sample_fraction=1.0, checkin_retry_s=0.1)
    url = str(client.make_url("")).rstrip("/")
    cfg = FleetConfig(phones=PHONES, partition="dirichlet:0.5", seed=3, trainer="pool", workers=1)
    barrier = asyncio.Barrier(2)
    results = await asyncio.gather(*(
        run_fleet(url, digits, dataclasses.replace(cfg, shard_index=i, shard_count=2),
                  torch_runtime_for_task, train_overrides={"local_epochs": 1}, registered=barrier.wait)
        for i in range(2)))
    names = [[d.phone for d in r.devices] for r in results]
    assert names == [[f"phone-{i:05d}" for i in range(4)], [f"phone-{i:05d}" for i in range(4, 8)]]
    expected = partition(digits.y_train, PHONES, cfg.partition, np.random.default_rng(cfg.seed))
    assert [d.examples for r in results for d in r.devices] == [len(p) for p in expected]
    assert client.server.app[STORE].phone_count() == PHONES
    history = client.server.app[COORD].history
    # The barrier lets the server size even its first round on the whole fleet.
    assert [r["updates"] for r in history] == [PHONES, PHONES]


@pytest.fixture
def ray_tmpdir() -> Iterator[Path]:
    """A private RAY_TMPDIR (short: Ray's socket paths must fit in 107 bytes), removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="ffray-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _serve_in_thread(config: ServerConfig, data: Dataset) -> tuple[str, web.Application, Any]:
    """The real app on a loopback port, in its own event loop and thread."""
    loop = asyncio.new_event_loop()
    app = make_app(config, test_data=(data.x_test, data.y_test))
    runner = web.AppRunner(app, access_log=None)

    async def start() -> int:
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return int(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    port = asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=30)

    def stop() -> None:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)

    return f"http://127.0.0.1:{port}", app, stop


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if text.encode() in (proc / "cmdline").read_bytes() and int(proc.name) != os.getpid():
                found.append(int(proc.name))
        except OSError:
            continue
    return found


@pytest.mark.slow  # ~35 s on an idle 2-core machine, most of it Ray and torch starting; ~75 s when shared
def test_cli_fleet_on_a_local_ray_cluster(tmp_path: Path, ray_tmpdir: Path) -> None:
    data = load_dataset("digits", seed=0)
    config = ServerConfig(model="mlp", input_shape=data.input_shape, num_classes=data.num_classes, rounds=2,
                          sample_fraction=1.0, checkin_retry_s=0.2)
    url, app, stop = _serve_in_thread(config, data)
    out = tmp_path / "run"
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmpdir), "OMP_NUM_THREADS": "1"}
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "fedfleet.cli", "fleet", "--server", url, "--backend", "ray", "--shards", "2",
             "--phones", str(PHONES), "--dataset", "digits", "--model", "mlp", "--rounds", "2",
             "--local-epochs", "1", "--seed", "0", "--out", str(out)],
            capture_output=True, text=True, timeout=240, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        history = list(app[COORD].history)
        phones_on_server = app[STORE].phone_count()
    finally:
        stop()
    # Ray's processes (GCS, raylet, workers) left with the driver; wait a moment for stragglers.
    deadline = time.monotonic() + 15
    while _processes_mentioning(str(ray_tmpdir)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _processes_mentioning(str(ray_tmpdir)) == []
    assert "shard 0: 4 phones" in proc.stdout and "shard 1: 4 phones" in proc.stdout
    assert len(history) == 2 and all(r["updates"] == PHONES for r in history)
    assert phones_on_server == PHONES  # each shard registered only its own phones
    rows = list(csv.DictReader((out / "devices.csv").open()))
    assert [r["phone"] for r in rows] == [f"phone-{i:05d}" for i in range(PHONES)]
    expected = partition(data.y_train, PHONES, "iid", np.random.default_rng(0))
    assert [int(r["examples"]) for r in rows] == [len(p) for p in expected]
    contributed = {i for i, r in enumerate(rows) if int(r["participations"]) > 0}
    assert contributed & set(range(4)) and contributed & set(range(4, 8))  # both shards' phones
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == [1, 2]


def _fleet_cli(capsys: Any, *extra: str) -> tuple[int, str]:
    rc = main(["fleet", "--server", "http://127.0.0.1:9", "--phones", "4", *extra])
    return rc, capsys.readouterr().err


def test_ray_backend_refuses_a_virtual_clock_and_stray_flags(capsys: Any) -> None:
    rc, err = _fleet_cli(capsys, "--backend", "ray", "--clock", "virtual")
    assert rc == 2 and "virtual clock cannot be shared" in err
    rc, err = _fleet_cli(capsys, "--shards", "2")
    assert rc == 2 and "go with --backend ray" in err
    rc, err = _fleet_cli(capsys, "--backend", "ray", "--shards", "5")
    assert rc == 2 and "--shards must be between 1 and the number of phones (4)" in err


def test_missing_ray_names_the_extra(capsys: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` meets when Ray is not installed
    rc, err = _fleet_cli(capsys, "--backend", "ray")
    assert rc == 2 and "pip install 'fedfleet[ray]'" in err
