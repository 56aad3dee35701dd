"""A fleet's per-phone draws (shards, seeded generators, profiles, start times) made lazily
(FleetPlan): the same draws as before; and the phones' connections kept open from registration to
their first check-in."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import numpy as np
import pytest

from fedfleet.device_runtime import fleet
from fedfleet.device_runtime.data import partition
from fedfleet.device_runtime.fleet_plan import FleetConfig, fleet_profiles, plan_fleet
from fedfleet.device_runtime.runtimes.torch_runtime import torch_runtime_for_task


@pytest.mark.parametrize("virtual", [False, True])
def test_a_plan_draws_what_the_fleet_drew(digits: Any, virtual: bool) -> None:
    """The same shards, phone generators (rng.spawn's streams), profiles and start times as drawing
    them in the fleet's old order from its seed."""
    cfg = FleetConfig(phones=40, seed=11, devices="default", partition="dirichlet:0.5", shard_index=1, shard_count=2)
    rng = np.random.default_rng(cfg.seed)
    parts = partition(digits.y_train, cfg.phones, cfg.partition, rng, cfg.quantity_skew)
    streams = [r.integers(0, 1 << 62, 16) for r in rng.spawn(cfg.phones)]
    profiles = fleet_profiles(cfg, rng)
    starts = rng.uniform(0.0, cfg.start_spread_s, cfg.phones) if virtual else np.zeros(cfg.phones)
    plan = plan_fleet(digits, cfg, virtual)
    assert plan.shard == range(20, 40)
    assert plan.profiles == profiles and np.array_equal(plan.starts, starts)
    for i in plan.shard:
        (x, y), phone_rng, _ = plan.phone(i)
        assert np.array_equal(x, digits.x_train[parts[i]]) and np.array_equal(y, digits.y_train[parts[i]])
        assert np.array_equal(phone_rng.integers(0, 1 << 62, 16), streams[i])
    keys = {plan.phone(i)[2].public_b64() for i in range(20, 30)}
    assert len(keys) == 10  # every phone its own key


async def _poll_connections(make_server: Any, digits: Any, monkeypatch: Any, keepalive_s: float) -> int:
    """Connections the phones' check-in session opened in a 1-round run whose phones sit idle 0.3 s
    between registering and their first check-in."""
    opened: list[int] = []

    class Counting(aiohttp.TCPConnector):
        async def _create_connection(self, *args: Any, **kwargs: Any) -> Any:
            if self._keepalive_timeout == keepalive_s:  # the check-ins' connector (the other keeps 15 s)
                opened.append(1)
            return await super()._create_connection(*args, **kwargs)

    monkeypatch.setattr(fleet, "POLL_KEEPALIVE_S", keepalive_s)
    monkeypatch.setattr(fleet.aiohttp, "TCPConnector", Counting)
    client = await make_server(rounds=1, sample_fraction=1.0, checkin_hold_s=1.0)
    url = str(client.make_url("")).rstrip("/")
    result = await fleet.run_fleet(url, digits, FleetConfig(phones=4, seed=0, trainer="pool", workers=1),
                                   torch_runtime_for_task, train_overrides={"local_epochs": 1},
                                   registered=lambda: asyncio.sleep(0.3))
    assert len(result.rounds) == 1 and all(d.errors == 0 for d in result.devices)
    return len(opened)


async def test_phones_keep_their_connection_until_their_first_checkin(make_server: Any, digits: Any,
                                                                      monkeypatch: Any) -> None:
    """Each phone registers on the connection its check-ins then use: still open after an idle wait
    (a 10,000-phone fleet waits seconds for the others to register), not set up a second time."""
    assert fleet.POLL_KEEPALIVE_S >= 300  # aiohttp's client default, 15 s, closed them in round 1
    assert await _poll_connections(make_server, digits, monkeypatch, fleet.POLL_KEEPALIVE_S) == 4
    assert await _poll_connections(make_server, digits, monkeypatch, 0.1) > 4  # what a short keep-alive costs
