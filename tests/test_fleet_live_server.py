"""A fleet against a live ``fedfleet serve`` process (audit A1, A2, A11, B5; section C's meta.round):
it counts only the rounds merged after it joined; it rides out a kill -9 and restart of the server on
its data dir; when the server stays gone it ends with ServerGone carrying what it saw; names an
earlier fleet took are refused before any phone of the new one registers; ``hours`` on the wall
clock ends it on time even with check-ins held by the server; its summary has simulate's keys.
And the server refuses an update whose meta.round is not the round it handed out."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bench.bench_faults import ServerProcess
from fedfleet.device_runtime.data import Dataset, load_dataset
from fedfleet.device_runtime.fleet import run_fleet
from fedfleet.device_runtime.fleet_plan import FleetConfig
from fedfleet.device_runtime.fleet_result import FleetError, NamesTaken, ServerGone, fleet_summary
from fedfleet.device_runtime.runtimes.torch_runtime import torch_runtime_for_task
from tests.conftest import MakeClient, register, update_body

DATASET = "synthetic:400"
SIMULATE_KEYS = {"config", "dataset_sizes", "clock", "event_loop", "emulation", "privacy"}


@pytest.fixture(scope="module")
def data() -> Dataset:
    return load_dataset(DATASET, seed=0)


async def _server(tmp_path: Path, **settings: Any) -> ServerProcess:
    base = {"mode": "sync", "sample_fraction": 1.0, "round_timeout_s": 30.0}
    server = ServerProcess(tmp_path / "state", DATASET, {**base, **settings})
    await server.start()
    return server


@pytest.fixture
async def live(tmp_path: Path) -> AsyncIterator[list[ServerProcess]]:
    servers: list[ServerProcess] = []
    yield servers
    for s in servers:
        s.stop()


async def _status(url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, http.get(f"{url}/v1/status") as r:
        answer: dict[str, Any] = await r.json()
        return answer


async def test_a_fleet_counts_only_the_rounds_after_it_joined_and_names_taken_are_refused_cleanly(
        tmp_path: Path, data: Dataset, live: list[ServerProcess]) -> None:
    # round_timeout_s short: the first fleet's phones, gone, stay registered and may hold cohort slots
    server = await _server(tmp_path, rounds=0, sample_fraction=0.5, round_timeout_s=3.0)
    live.append(server)
    first = await run_fleet(server.url, data, FleetConfig(phones=4, name_prefix="a", max_rounds=2),
                            torch_runtime_for_task)
    assert [r["round"] for r in first.rounds] == [1, 2] and first.joined_after_round == 0
    before = await _status(server.url)
    table: list[int] = []
    t0 = time.perf_counter()
    second = await run_fleet(server.url, data, FleetConfig(phones=4, name_prefix="b", max_rounds=2),
                             torch_runtime_for_task, on_round=lambda r: table.append(r["round"]))
    wall_s = time.perf_counter() - t0
    # only rounds merged after it joined, and 2 of its own (not rounds 1-2 of the server's history, at once)
    assert second.joined_after_round == before["round"] - 1 >= 2
    assert table == [r["round"] for r in second.rounds] == list(range(before["round"], before["round"] + 2))
    assert sum(d.participations for d in second.devices) >= 1
    summary = fleet_summary(second, FleetConfig(phones=4, name_prefix="b", max_rounds=2), data, wall_s,
                            server=server.url)
    assert SIMULATE_KEYS <= set(summary) and summary["clock"] == "wall"
    assert summary["server"]["joined_after_round"] == second.joined_after_round
    assert summary["server"]["task"]["mode"] == "sync" and summary["config"]["dataset"] == DATASET
    assert summary["emulation"]["checkins"] == sum(d.checkins for d in second.devices) > 0
    json.dumps(summary)  # as summary.json

    phones = (await _status(server.url))["phones"]
    with pytest.raises(NamesTaken, match="pick another --name-prefix") as taken:
        await run_fleet(server.url, data, FleetConfig(phones=4, name_prefix="a", max_rounds=1), torch_runtime_for_task)
    assert isinstance(taken.value, FleetError) and "tokens" in str(taken.value)
    assert (await _status(server.url))["phones"] == phones  # none of that fleet registered


@pytest.mark.slow
async def test_a_fleet_rides_out_a_kill_9_and_restart_of_its_server(
        tmp_path: Path, data: Dataset, live: list[ServerProcess]) -> None:
    server = await _server(tmp_path, rounds=8, checkin_hold_s=5.0)
    live.append(server)
    seen: list[int] = []
    killed = asyncio.Event()

    def on_round(row: dict[str, Any]) -> None:
        seen.append(row["round"])
        if len(seen) == 2:
            killed.set()

    fleet = asyncio.ensure_future(run_fleet(server.url, data, FleetConfig(phones=4, name_prefix="k"),
                                            torch_runtime_for_task, on_round=on_round))
    await asyncio.wait_for(killed.wait(), 120)
    server.kill9()
    await asyncio.sleep(1.0)  # the phones and the monitor find it gone
    await server.start()
    result = await asyncio.wait_for(fleet, 180)  # the monitor rides out the restart (no ClientConnectorError)
    assert [r["round"] for r in result.rounds] == list(range(1, 9)) == seen, ([d.row() for d in result.devices], server.log_text()[-3000:])
    assert all(d.errors >= 1 for d in result.devices)  # each phone met the dead server ...
    assert all(d.participations >= 6 for d in result.devices)  # ... and kept taking part after it came back


async def test_a_fleet_whose_server_stays_gone_ends_with_what_it_saw(
        tmp_path: Path, data: Dataset, live: list[ServerProcess]) -> None:
    server = await _server(tmp_path, rounds=0, checkin_hold_s=5.0)
    live.append(server)
    seen: list[int] = []
    two = asyncio.Event()

    def on_round(row: dict[str, Any]) -> None:
        seen.append(row["round"])
        if len(seen) == 2:
            two.set()

    cfg = FleetConfig(phones=3, name_prefix="g", phone_max_errors=2)  # phones give up after ~0.6 s
    fleet = asyncio.ensure_future(run_fleet(server.url, data, cfg, torch_runtime_for_task, on_round=on_round))
    await asyncio.wait_for(two.wait(), 120)
    server.kill9()
    with pytest.raises(ServerGone, match="stopped answering") as gone:
        await asyncio.wait_for(fleet, 60)
    result = gone.value.result
    assert result is not None and [r["round"] for r in result.rounds] == seen and len(seen) >= 2
    assert len(result.devices) == 3 and all(d.participations >= 2 and d.errors >= 3 for d in result.devices)


async def test_hours_on_the_wall_clock_ends_the_fleet_on_time_despite_held_check_ins(
        tmp_path: Path, data: Dataset, live: list[ServerProcess]) -> None:
    # one phone per round: the others' check-ins are held (25 s) for work that does not come
    server = await _server(tmp_path, rounds=0, sample_fraction=0.1, over_selection=1.0, checkin_hold_s=25.0)
    live.append(server)
    hours_s = 4.0
    t0 = time.perf_counter()
    result = await run_fleet(server.url, data, FleetConfig(phones=6, name_prefix="h", hours=hours_s / 3600),
                             torch_runtime_for_task)
    took = time.perf_counter() - t0
    assert hours_s <= took < hours_s + 3.0, took  # it took ~25 s more before
    assert result.rounds and sum(d.checkins for d in result.devices) >= 6


# --- meta.round: the server refuses an update claiming a round it did not hand out ------------------

async def _task(client: Any, headers: dict[str, str]) -> dict[str, Any]:
    resp = await client.post("/v1/checkin", json={}, headers=headers)
    answer: dict[str, Any] = await resp.json()
    assert answer["action"] == "train", answer
    return answer


async def test_sync_refuses_an_update_whose_round_is_not_the_open_one(make_server: MakeClient) -> None:
    client = await make_server(sample_fraction=1.0, min_cohort=2)
    _, h1, task = await register(client, "r1")
    _, h2, _ = await register(client, "r2")
    work = await _task(client, h1)
    assert work["round"] == 1 and work["version"] == 0
    for claimed in (51, 2, 0):  # a round not begun, the next, a past one: all said of version 0
        resp = await client.post("/v1/update", data=update_body(task, update_id=f"x{claimed}", round=claimed),
                                 headers=h1)
        body = await resp.json()
        assert resp.status == 400 and body["error"] == "wrong_round", (claimed, body)
    resp = await client.post("/v1/update", data=update_body(task, update_id="bad", round="1"), headers=h1)
    assert resp.status == 400 and (await resp.json())["error"] == "bad_meta"
    status = await (await client.get("/v1/status")).json()
    assert status["updates_in_round"] == 0  # nothing of the refused ones was accepted
    resp = await client.post("/v1/update", data=update_body(task, update_id="ok", round=1), headers=h1)
    assert resp.status == 200 and (await resp.json())["accepted"] is True
    resp = await client.post("/v1/update", data=update_body(task, update_id="ok", round=1), headers=h1)
    assert resp.status == 200 and (await resp.json())["duplicate"] is True  # a retry is still a retry
    await _task(client, h2)
    resp = await client.post("/v1/update", data=update_body(task, update_id="two", round=1), headers=h2)
    assert resp.status == 200
    await asyncio.sleep(0.2)
    assert (await (await client.get("/v1/status")).json())["version"] == 1


async def test_async_refuses_a_round_not_begun_and_takes_a_stale_one_by_its_base(make_server: MakeClient) -> None:
    client = await make_server(mode="async", buffer_size=1, concurrency=4, max_staleness=5)
    _, h1, task = await register(client, "s1")
    _, h2, _ = await register(client, "s2")
    await _task(client, h1)
    await _task(client, h2)
    resp = await client.post("/v1/update", data=update_body(task, update_id="far", round=51), headers=h1)
    assert resp.status == 400 and (await resp.json())["error"] == "wrong_round"
    resp = await client.post("/v1/update", data=update_body(task, update_id="a", round=1), headers=h1)
    assert resp.status == 200
    for _ in range(50):
        if (await (await client.get("/v1/status")).json())["version"] == 1:
            break
        await asyncio.sleep(0.05)
    # phone 2's task was handed out in round 1 on version 0; the server is in round 2 now: accepted
    resp = await client.post("/v1/update", data=update_body(task, update_id="b", round=1), headers=h2)
    body = await resp.json()
    assert resp.status == 200 and body["accepted"] is True and body["staleness"] == 1, body


def test_fleet_config_checks_phone_max_errors() -> None:
    with pytest.raises(ValueError, match="phone_max_errors"):
        FleetConfig(phone_max_errors=-1)
    assert dataclasses.replace(FleetConfig(), phone_max_errors=0).phone_max_errors == 0
