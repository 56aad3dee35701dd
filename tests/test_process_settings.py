"""Process-wide settings (the GC's thresholds and frozen objects, torch's threads, the open-file
limit) change only through fedfleet.tuning, which the command line calls: an app served or a fleet
run inside someone's process leaves that process as it was, while it runs and after."""

from __future__ import annotations

import asyncio
import gc
import json
import resource
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from fedfleet.server.app import make_app
from fedfleet.server.config import ServerConfig
from fedfleet.simulate import simulate
from fedfleet.simulate_config import SimulateConfig
from tests.conftest import register

Settings = tuple[tuple[int, int, int], int, int]  # GC thresholds, torch threads, open-file soft limit


def _settings() -> Settings:
    return gc.get_threshold(), torch.get_num_threads(), resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _frozen() -> int:
    """Objects in the GC's permanent generation: gc.freeze adds to them, and they only leave it as
    they die (or by gc.unfreeze)."""
    return gc.get_freeze_count()


@pytest.fixture
def untuned() -> Iterator[Settings]:
    """Settings unlike the command line's: the GC's defaults, 2 torch threads, and an open-file soft
    limit below the hard one (where it can be raised); this process's own are put back after."""
    threshold, threads, limits = gc.get_threshold(), torch.get_num_threads(), resource.getrlimit(resource.RLIMIT_NOFILE)
    soft, hard = limits
    lowered = min(soft, hard) - 1 if hard != resource.RLIM_INFINITY else soft
    try:
        gc.set_threshold(700, 10, 10)
        torch.set_num_threads(2)
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowered, hard))
        yield _settings()
    finally:
        gc.set_threshold(*threshold)
        torch.set_num_threads(threads)
        resource.setrlimit(resource.RLIMIT_NOFILE, limits)


async def _watch(seen: list[Settings], stop: asyncio.Event) -> None:
    # Not the freeze count: CPython counts the permanent generation by walking it, and a test process
    # that ran the command line in-process has most of its heap there (seconds per walk at 100 Hz).
    while not stop.is_set():
        seen.append(_settings())
        await asyncio.sleep(0.01)


async def test_an_app_served_in_process_changes_no_process_setting(untuned: Settings, aiohttp_client: Any) -> None:
    frozen = _frozen()
    client = await aiohttp_client(make_app(ServerConfig(model="mlp", input_shape=(1, 8, 8), num_classes=10)))
    await register(client, "p")
    assert _settings() == untuned and _frozen() <= frozen  # while it serves
    await client.close()
    assert _settings() == untuned and _frozen() <= frozen


@pytest.mark.slow
async def test_a_fleet_run_in_process_changes_no_process_setting(untuned: Settings, tmp_path: Path) -> None:
    seen: list[Settings] = []
    frozen = _frozen()
    stop = asyncio.Event()
    watcher = asyncio.create_task(_watch(seen, stop))
    cfg = SimulateConfig(phones=4, rounds=2, sample=1.0, model="mlp", out=str(tmp_path), workers=1)
    result, _ = await simulate(cfg)
    stop.set()
    await watcher
    assert len(result.rounds) == 2 and len(seen) > 2
    assert set(seen) == {untuned} and _settings() == untuned
    assert _frozen() <= frozen  # nothing was frozen while it ran (frozen objects leave only as they die)


def test_the_command_lines_call_sets_them() -> None:
    """tune_process, in a process of its own (what the command line does before serving or a fleet)."""
    code = ("import gc, json, resource, torch\n"
            "from fedfleet.tuning import GC_THRESHOLDS, tune_process\n"
            "gc.set_threshold(700, 10, 10); torch.set_num_threads(2)\n"
            "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
            "resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, hard) - 1, hard))\n"
            "tune_process(torch_threads=1)\n"
            "print(json.dumps([gc.get_threshold() == GC_THRESHOLDS, gc.get_freeze_count() > 0,\n"
            "                  torch.get_num_threads(), resource.getrlimit(resource.RLIMIT_NOFILE)[0] == hard]))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [True, True, 1, True]
