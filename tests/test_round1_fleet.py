"""A fleet's per-phone draws (shards, seeded generators, profiles, start times) and keys made ahead of
time (FleetPlan): the same draws as before, and the same run when made before the server opens; and
the phones' connections kept open from registration to their first check-in."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import numpy as np
import pytest

from device_runtime import fleet
from device_runtime.data import partition
from device_runtime.fleet_plan import FleetConfig, FleetPlan, fleet_profiles, plan_fleet
from device_runtime.runtimes.torch_runtime import torch_runtime_for_task
from fedfleet.simulate import simulate
from fedfleet.simulate_config import SimulateConfig


@pytest.mark.parametrize("virtual", [False, True])
def test_a_plan_draws_what_the_fleet_drew(digits: Any, virtual: bool) -> None:
    """The same shards, phone generators (rng.spawn's streams), profiles and start times as drawing
    them in the fleet's old order from its seed, whether the phones are made early or late."""
    cfg = FleetConfig(phones=40, seed=11, devices="default", partition="dirichlet:0.5", shard_index=1, shard_count=2)
    rng = np.random.default_rng(cfg.seed)
    parts = partition(digits.y_train, cfg.phones, cfg.partition, rng, cfg.quantity_skew)
    streams = [r.integers(0, 1 << 62, 16) for r in rng.spawn(cfg.phones)]
    profiles = fleet_profiles(cfg, rng)
    starts = rng.uniform(0.0, cfg.start_spread_s, cfg.phones) if virtual else np.zeros(cfg.phones)
    late, early = plan_fleet(digits, cfg, virtual), plan_fleet(digits, cfg, virtual).make_phones()
    assert late.shard == early.shard == range(20, 40)
    assert late.profiles == profiles and np.array_equal(late.starts, starts)
    for i in early.shard:
        for plan in (late, early):
            (x, y), phone_rng, _ = plan.phone(i)
            assert np.array_equal(x, digits.x_train[parts[i]]) and np.array_equal(y, digits.y_train[parts[i]])
            assert np.array_equal(phone_rng.integers(0, 1 << 62, 16), streams[i])
    assert not early.made  # each made phone handed out once
    keys = {early.phone(i)[2].public_b64() for i in range(20, 30)}
    assert len(keys) == 10  # every phone its own key


async def test_a_plan_made_before_the_server_gives_the_same_run(tmp_path: Any, monkeypatch: Any) -> None:
    """A fleet handed its plan (phones made before the server opened) ends with the same metrics and
    devices.csv as one drawing it itself, on a virtual clock (every float reproducible)."""
    made: list[FleetPlan] = []
    run_fleet = fleet.run_fleet

    async def with_plan(server: str, data: Any, cfg: FleetConfig, *args: Any, **kwargs: Any) -> Any:
        plan = plan_fleet(data, cfg, virtual=True).make_phones()
        made.append(plan)
        return await run_fleet(server, data, cfg, *args, plan=plan, **kwargs)

    outputs = []
    for planned in (False, True):
        if planned:
            monkeypatch.setattr(fleet, "run_fleet", with_plan)
        out = tmp_path / f"run{planned}"
        await simulate(SimulateConfig(phones=12, rounds=2, dataset="digits", model="mlp", local_epochs=1, seed=4,
                                      devices="default", clock="virtual", out=str(out)))
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        for r in rows:
            r.pop("aggregate_ms")
        outputs.append((rows, (out / "devices.csv").read_text()))
    assert made and not made[0].made  # every prepared phone was used
    assert outputs[0] == outputs[1]


async def test_a_plan_for_another_fleet_is_refused(digits: Any) -> None:
    plan = plan_fleet(digits, FleetConfig(phones=4, seed=1))
    with pytest.raises(ValueError, match="another configuration"):
        await fleet.run_fleet("http://127.0.0.1:9", digits, FleetConfig(phones=4, seed=2), lambda t: None,  # type: ignore[arg-type,return-value]
                              plan=plan)


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
