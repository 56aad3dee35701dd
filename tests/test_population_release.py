"""A bulk-registered fleet (FleetConfig.register_in_bulk): its phones built when active and released
back to the columns while they sleep (fleet_release, fleet_parked, fleet_population). A released phone
comes back equal to the phone that slept; the seeded run is the eager fleet's; an idle registered
phone costs a row of columns on either side of the wire (tracemalloc, not a timer)."""

from __future__ import annotations

import csv
import gc
import json
import sqlite3
import tracemalloc
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from fedfleet.device_runtime import aio
from fedfleet.device_runtime.data import Dataset, load_dataset
from fedfleet.device_runtime.fleet_bulk import public_keys, register_in_bulk
from fedfleet.device_runtime.fleet_parked import ParkedPhones
from fedfleet.device_runtime.fleet_plan import FleetConfig, plan_fleet
from fedfleet.device_runtime.fleet_population import PhoneNames
from fedfleet.device_runtime.fleet_release import ReleasablePhone, Released, ReleasingClock
from fedfleet.device_runtime.vclock import VirtualClock
from fedfleet.protocol.signing import PhoneKey
from fedfleet.simulate import simulate
from fedfleet.simulate_config import SimulateConfig

WALL_CLOCK_FIELDS = ("aggregate_ms",)  # measured in wall time on purpose (server processing time)


def _phone(session: aiohttp.ClientSession, plan: Any, i: int, clock: Any,
           rng: np.random.Generator | None = None) -> ReleasablePhone:
    shard, fresh, key = plan.phone(i)
    return ReleasablePhone(session, "http://unused", f"phone-{i:05d}", shard, None, rng if rng is not None else fresh,
                           profile=plan.profile(i), clock=clock, key=key)


async def test_a_released_phone_comes_back_equal_to_the_phone_that_slept(digits: Dataset) -> None:
    plan = plan_fleet(digits, FleetConfig(phones=6, devices="default"), virtual=True)
    clock = VirtualClock()
    session = aiohttp.ClientSession()
    slept = _phone(session, plan, 4, clock)
    # what a phone learns in its run: draws, an encoder (the default codec), counters, updates, a nonce
    slept.rng.random(7)
    slept.rng.integers(0, 10, size=3)
    slept.rng.random(dtype=np.float32)  # leaves a buffered 32-bit draw
    encoder = slept._encoder({})
    slept.rng.spawn(1)  # another child after the encoder's
    slept.stats.checkins, slept.stats.participations, slept.stats.bytes_up = 5, 2, 12_345
    slept.stats.latencies_s += [1.5, 2.25, 0.125]
    slept.stats.train_s.append(0.75)
    slept._updates_sent = 2
    assert slept.key is not None
    slept.key.headers(slept.name, 0, "u", b"body")
    parked = ParkedPhones(6)
    assert slept.may_release()
    parked.save(4, slept)
    back = _phone(session, plan, 4, clock, rng=parked.generator(4, plan.phone(4)[1]))
    parked.restore(4, back)
    assert back.stats.row() == slept.stats.row()
    assert back._updates_sent == 2 and back.key is not None and back.key._last == slept.key._last
    assert back.encoder is not None and back._codec == {}
    np.testing.assert_array_equal(back.encoder.rng.random(5), encoder.rng.random(5))
    np.testing.assert_array_equal(back.rng.random(9), slept.rng.random(9))
    assert back.rng.random(dtype=np.float32) == slept.rng.random(dtype=np.float32)
    assert back.rng.spawn(1)[0].random() == slept.rng.spawn(1)[0].random()  # the next child too
    # a phone never released comes back as the columns make it
    fresh = _phone(session, plan, 2, clock, rng=parked.generator(2, plan.phone(2)[1]))
    parked.restore(2, fresh)
    assert fresh.rng.random() == plan.phone(2)[1].random() and fresh.stats.checkins == 0
    await session.close()


async def test_a_phone_is_released_only_between_tasks_and_without_state_the_columns_lose(digits: Dataset) -> None:
    plan = plan_fleet(digits, FleetConfig(phones=2), virtual=True)
    own = ReleasingClock(VirtualClock(), 60.0)
    session = aiohttp.ClientSession()
    p = _phone(session, plan, 0, own)
    own.phone = p
    assert p.may_release()
    for blocked in ("in_task", "own_state", "_next"):
        setattr(p, blocked, {"x": np.zeros(1)} if blocked != "in_task" else True)
        assert not p.may_release(), blocked
        setattr(p, blocked, {} if blocked == "own_state" else None if blocked == "_next" else False)
    p._encoder({"error_feedback": True, "sparsify": "topk", "density": 0.1})
    assert not p.may_release()  # its residual would be lost
    own.clock.join()
    p.encoder = None
    await own.sleep(59.0)  # shorter than release_after_s: a sleep
    with pytest.raises(Released) as released:
        await own.sleep(600.0)
    assert released.value.wake == 59.0 + 600.0
    await session.close()


def test_a_bulk_registered_population_is_estimated_at_its_columns_cost() -> None:
    from fedfleet.population import BULK_BYTES_PER_PHONE, check_population

    check_population(3_000_000, available=8_000_000_000, per_phone=BULK_BYTES_PER_PHONE)  # ~7 GB: fits
    with pytest.raises(ValueError, match=r"3,000,000 phones need about 25\.0 GB .*~8 KB a phone"):
        check_population(3_000_000, available=8_000_000_000)  # built and registered one by one: it does not


def test_bulk_and_when_active_registration_exclude_each_other() -> None:
    with pytest.raises(ValueError, match="register_in_bulk registers every phone up front; register_when_active"):
        SimulateConfig(phones=10, dataset="digits", register_in_bulk=True, register_when_active=True)


def _run(tmp_path: Path, name: str, bulk: bool) -> tuple[Any, list[dict[str, Any]], list[dict[str, str]]]:
    cfg = SimulateConfig(phones=120, dataset="digits", model="mlp", local_epochs=1, mode="async", concurrency=8,
                         buffer=4, rounds=0, hours=2 / 60, devices="default", dropout=0.1, diurnal=0.5, seed=3,
                         out=str(tmp_path / name), server={"rest_after_update_s": 60.0}, register_in_bulk=bulk)
    result, _ = aio.run(simulate(cfg))
    rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    with open(tmp_path / name / "devices.csv") as f:
        devices = list(csv.DictReader(f))
    return result, rows, devices


def test_a_bulk_registered_fleet_releasing_its_phones_runs_as_the_eager_fleet(tmp_path: Path) -> None:
    """The same seeded run whether every phone is built and registered over HTTP up front and stays
    built, or all are registered in bulk, built when active and released while they rest; only the
    registrations' bytes differ (the bulk ones are the fleet's, not a phone's)."""
    _, eager, eager_devices = _run(tmp_path, "eager", bulk=False)
    result, bulk, bulk_devices = _run(tmp_path, "bulk", bulk=True)
    assert result.population["releases"] > 100  # phones were released and came back, many times
    assert result.population["peak_built"] <= 10  # of 120
    skip = {*WALL_CLOCK_FIELDS, "bytes_up", "bytes_down"}
    assert len(eager) >= 5
    assert [{k: v for k, v in r.items() if k not in skip} for r in bulk] == \
        [{k: v for k, v in r.items() if k not in skip} for r in eager]
    assert [{k: v for k, v in d.items() if not k.startswith("bytes")} for d in bulk_devices] == \
        [{k: v for k, v in d.items() if not k.startswith("bytes")} for d in eager_devices]
    with sqlite3.connect(tmp_path / "bulk" / "server" / "server.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM phones").fetchone()[0] == 120


def _traced(snapshot: tracemalloc.Snapshot, before: tracemalloc.Snapshot, where: str | None) -> int:
    stats = snapshot.compare_to(before, "filename")
    return sum(s.size_diff for s in stats if where is None or where in s.traceback[0].filename)


async def test_a_bulk_registered_idle_phone_is_a_row_of_columns_on_either_side(make_server: Any) -> None:
    """4,000 phones registered in bulk with the real server, then idle (none built): what each holds,
    fleet side (its plan's columns, its token, its parked row) and server side, by tracemalloc."""
    n = 4000
    data = load_dataset(f"synthetic:{5 * n}", seed=0)
    client = await make_server(admin_token="admin-secret", require_signatures=True)
    url = str(client.make_url("/")).rstrip("/")
    cfg = FleetConfig(phones=n, devices="default")
    gc.collect()
    tracemalloc.start(1)
    try:
        before = tracemalloc.take_snapshot()
        plan = plan_fleet(data, cfg, virtual=True)
        async with aiohttp.ClientSession() as session:
            tokens, task = await register_in_bulk(session, url, "admin-secret", PhoneNames(cfg, plan.shard),
                                                  secret=plan.key_secret, indices=plan.shard, chunk=1000)
        parked = ParkedPhones(n)
        del task
        gc.collect()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    assert tokens.shape == (n,) and parked.saved.shape == (n,)
    assert public_keys(plan.key_secret, [17]) == [PhoneKey(_seed(plan.key_secret, 17)).public_b64()]
    fleet = _traced(after, before, "/device_runtime/") / n
    server = _traced(after, before, "/server/") / n
    total = _traced(after, before, None) / n
    # measured 281 B a phone on the fleet's side (its profile row, shard index, start, token and parked
    # row), 14 B on the server's (its row is SQLite's, outside Python's heap) and 312 B in all; a phone
    # built and registered over HTTP holds ~2.1 KB (test_population_scale)
    assert fleet < 400, f"{fleet:.0f} B a phone on the fleet's side"
    assert server < 50, f"{server:.0f} B a phone on the server's side"
    assert total < 500, f"{total:.0f} B a phone in all"


def _seed(secret: bytes, i: int) -> bytes:
    from fedfleet.device_runtime.fleet_columns import key_seed

    return key_seed(secret, i)
