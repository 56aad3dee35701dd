"""The fleet emulator: virtual-clock ordering, run-to-run determinism, phones vanishing
mid-upload, and pace steering of check-ins — all through the real server on loopback."""

from __future__ import annotations

import asyncio
import csv
import json
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from fedfleet.device_runtime import aio
from fedfleet.device_runtime.emulated_device import PhoneClient
from fedfleet.device_runtime.fleet import run_fleet
from fedfleet.device_runtime.fleet_plan import FleetConfig
from fedfleet.device_runtime.protocol_client import ModelMemo, ServerError
from fedfleet.device_runtime.runtimes.torch_runtime import torch_runtime_for_task
from fedfleet.device_runtime.vclock import VirtualClock
from fedfleet.protocol import ChecksumMismatch, ShapeMismatch, TensorSpec, decode_message, encode_message
from fedfleet.server.app import make_app
from fedfleet.server.config import ServerConfig
from fedfleet.server.pacing import PaceSteering
from fedfleet.server.state import COORD
from fedfleet.simulate import simulate
from fedfleet.simulate_config import SimulateConfig
from tests.conftest import register, request_counts, update_body

WALL_CLOCK_FIELDS = ("aggregate_ms",)  # measured in wall time on purpose (server processing time)


async def test_virtual_clock_wakes_in_time_order_and_waits_for_the_busy() -> None:
    clock = VirtualClock()
    woke: list[tuple[str, float]] = []
    advances: list[float] = []
    clock.before_advance.append(lambda: advances.append(clock.now()))

    async def phone(name: str, naps: list[float], busy_s: float = 0.0) -> None:
        clock.join()
        try:
            for nap in naps:
                if busy_s:
                    await asyncio.sleep(busy_s)  # real work: virtual time must not move meanwhile
                await clock.sleep(nap)
                woke.append((name, clock.now()))
        finally:
            clock.leave()

    await asyncio.gather(phone("a", [3.0, 1.0]), phone("b", [1.0, 1.0, 1.0]), phone("c", [2.0], busy_s=0.05),
                         phone("d", [2.0]))
    times = [t for _, t in woke]
    assert times == sorted(times)
    assert woke[0] == ("b", 1.0)
    # equal wake-up times keep the order the sleeps were taken in (c slept after d: it was busy)
    at_two = [n for n, t in woke if t == 2.0]
    assert at_two.index("d") < at_two.index("c")
    assert ("a", 4.0) in woke and ("b", 3.0) in woke
    assert advances and all(x <= y for x, y in zip(advances, advances[1:], strict=False))


def _run(tmp: Path, name: str, **kw: Any) -> tuple[list[dict[str, Any]], list[dict[str, str]], dict[str, Any]]:
    # 30 phones, 2 virtual minutes, each phone resting 20 s after it contributed: ~100 updates
    cfg = SimulateConfig(phones=30, dataset="digits", model="mlp", local_epochs=1, mode="async", concurrency=6,
                         buffer=3, rounds=0, hours=2 / 60, devices="default", dropout=0.3, seed=7,
                         out=str(tmp / name), server={"rest_after_update_s": 20.0}, **kw)
    result, summary = asyncio.run(simulate(cfg))
    lines = (tmp / name / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    with (tmp / name / "devices.csv").open() as f:
        devices = list(csv.DictReader(f))
    return rows, devices, summary


def _without_wall(rows: list[dict[str, Any]]) -> str:
    return "\n".join(json.dumps({k: v for k, v in r.items() if k not in WALL_CLOCK_FIELDS}, sort_keys=True)
                     for r in rows)


def test_same_seed_same_metrics_and_devices_byte_for_byte(tmp_path: Path) -> None:
    first, dev1, s1 = _run(tmp_path, "one")
    second, dev2, _ = _run(tmp_path, "two")
    assert len(first) >= 5, "the run should publish several versions"
    assert _without_wall(first) == _without_wall(second)
    assert (tmp_path / "one" / "devices.csv").read_bytes() == (tmp_path / "two" / "devices.csv").read_bytes()
    assert s1["clock"] == "virtual"
    assert sum(int(d["drops"]) for d in dev1) > 0, "dropout 0.3 should drop some phones"


@pytest.mark.slow
def test_a_crowd_is_deterministic_too(tmp_path: Path) -> None:
    """300 phones for 10 slots: had they all first checked in at one virtual instant, which
    of them took the slots would depend on socket timing (two runs differed, tried with
    start_spread_s=0); with seeded first check-ins they are ordered by virtual time. So the
    event loop does not matter either: one run on uvloop (fedfleet's own), one on asyncio's."""
    def crowd(name: str, loop: str) -> tuple[str, bytes]:
        cfg = SimulateConfig(phones=300, dataset="digits", model="mlp", local_epochs=1, mode="async", concurrency=10,
                             buffer=5, rounds=0, hours=2 / 60, devices="default", dropout=0.1, seed=7,
                             out=str(tmp_path / name), server={"rest_after_update_s": 60.0})
        _, summary = aio.run(simulate(cfg)) if loop == "uvloop" else asyncio.run(simulate(cfg))
        assert summary["event_loop"] == loop
        rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        assert len(rows) >= 5, "the run should publish several versions"
        return _without_wall(rows), (tmp_path / name / "devices.csv").read_bytes()

    assert crowd("one", "uvloop") == crowd("two", "asyncio")


def test_phones_vanishing_mid_upload_leave_the_server_consistent(tmp_path: Path) -> None:
    rows, devices, summary = _run(tmp_path, "drops")
    assert summary["updates"] == sum(r["updates"] for r in rows)
    with sqlite3.connect(tmp_path / "drops" / "server" / "server.sqlite") as db:
        merged = db.execute("SELECT COUNT(*) FROM merged").fetchone()[0]
        pending = db.execute("SELECT COUNT(*) FROM pending").fetchone()[0]
    participations = sum(int(d["participations"]) for d in devices)
    # every acknowledged upload is merged exactly once or still buffered; truncated ones are not
    assert merged == summary["updates"]
    assert merged + pending == participations
    assert sum(int(d["errors"]) for d in devices) == 0  # no 5xx, no crash: a drop is not an error
    metrics = (tmp_path / "drops" / "server" / "metrics.jsonl").read_text()
    assert metrics  # the server kept publishing while phones vanished


def test_pace_steering_window_follows_supply_and_demand() -> None:
    now = [0.0]
    pace = PaceSteering(base_s=10.0, max_s=1000.0, pace=4.0, seed=0, clock=lambda: now[0])
    for _ in range(100):  # 95% of check-ins find no work: too many phones come back too soon
        for got in [True] + [False] * 19:
            pace.observe(got)
        now[0] += pace.window_s
    assert pace.window_s > 100.0
    grown = pace.window_s
    draws = [pace.retry_after() for _ in range(200)]
    assert all(max(10.0, grown / 2) <= d <= min(1000.0, grown * 1.5) for d in draws) and len(set(draws)) > 50
    for _ in range(5):  # now every check-in finds work: phones stay away too long
        for _ in range(20):
            pace.observe(True)
        now[0] += pace.window_s
    assert pace.window_s < grown / 10
    assert pace.window_s >= 10.0  # never below the configured floor
    again = PaceSteering(base_s=10.0, max_s=1000.0, pace=0.0, seed=0, clock=lambda: now[0])
    for _ in range(500):
        again.observe(False)
    assert again.retry_after() == 10.0  # pace 0: fixed retry


async def test_server_paces_a_crowd_of_idle_phones(aiohttp_client: Any) -> None:
    now = [0.0]
    cfg = ServerConfig(model="mlp", input_shape=(1, 8, 8), num_classes=10, mode="async", concurrency=2, buffer_size=2,
                       checkin_retry_s=5.0, checkin_pace=4.0, max_checkin_retry_s=3600.0)
    client = await aiohttp_client(make_app(cfg, clock=lambda: now[0]))
    phones = [await register(client, f"p{i}") for i in range(40)]
    retries: list[float] = []
    for _ in range(6):
        for _, auth, _ in phones:
            resp = await client.post("/v1/checkin", headers=auth, json={})
            assert resp.status == 200
            answer = await resp.json()
            if answer["action"] == "wait":
                retries.append(answer["retry_after_s"])
        now[0] += max(retries[-1], 5.0)
    assert min(retries) >= 5.0 and max(retries) > 20.0, "a crowd should be told to stay away longer"
    assert max(retries) <= 3600.0


@pytest.mark.parametrize("bad", [{"checkin_pace": -1.0}, {"sqlite_sync": "sometimes"}])
def test_bad_pacing_or_sync_settings_are_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        ServerConfig(**bad)


async def _fleet_requests(make_server: Any, digits: Any, inline: bool,
                          chain: bool = False) -> tuple[dict[str, int], list[Any]]:
    client = await make_server(rounds=2, sample_fraction=1.0, checkin_hold_s=5.0)
    url = str(client.make_url("")).rstrip("/")
    cfg = FleetConfig(phones=4, seed=0, trainer="pool", workers=1, inline_model=inline, chain_checkin=chain)
    result = await run_fleet(url, digits, cfg, torch_runtime_for_task, train_overrides={"local_epochs": 1})
    counts = request_counts(await (await client.get("/metrics")).text(), status="200")
    params = client.server.app[COORD].params
    return counts, [params[n] for n in sorted(params)] + [len(result.rounds)]


async def test_phones_take_the_model_with_the_checkin(make_server: Any, digits: Any) -> None:
    """With inline models a task costs two requests (check-in, upload), not three; the run
    is otherwise the same: same rounds, same final model up to float summation order."""
    inline, model_a = await _fleet_requests(make_server, digits, inline=True)
    plain, model_b = await _fleet_requests(make_server, digits, inline=False)
    assert inline.get("GET /v1/model", 0) == 0 and inline["POST /v1/update"] == 8
    assert plain["GET /v1/model"] == 8 and plain["POST /v1/update"] == 8
    assert model_a[-1] == model_b[-1] == 2
    for a, b in zip(model_a[:-1], model_b[:-1], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


async def test_phones_check_in_again_with_their_upload(make_server: Any, digits: Any) -> None:
    """Chained check-ins: after the first check-in, a task costs one request (the upload,
    whose answer is the next task or "done"); the run ends with the same model."""
    chained, model_a = await _fleet_requests(make_server, digits, inline=True, chain=True)
    single, model_b = await _fleet_requests(make_server, digits, inline=True, chain=False)
    assert chained["POST /v1/checkin"] == 4 and chained["POST /v1/update"] == 8
    assert single["POST /v1/checkin"] >= 12 and single["POST /v1/update"] == 8
    assert model_a[-1] == model_b[-1] == 2
    for a, b in zip(model_a[:-1], model_b[:-1], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


async def test_chained_check_ins_do_not_take_the_seats_of_waiting_phones(make_server: Any, digits: Any,
                                                                          tmp_path: Path) -> None:
    """Half of 16 phones per round: the phones that just uploaded check in again with their
    upload, and the merge's commit releases them all before the others' held check-ins have
    run. Without letting those go first, the same 8 phones took every round (the other 8
    never trained); now each phone gets its turn."""
    client = await make_server(rounds=6, sample_fraction=0.5, over_selection=1.0, checkin_hold_s=10.0,
                               data_dir=str(tmp_path), sqlite_sync="normal")
    url = str(client.make_url("")).rstrip("/")
    cfg = FleetConfig(phones=16, seed=0, chain_checkin=True)
    result = await run_fleet(url, digits, cfg, torch_runtime_for_task, train_overrides={"local_epochs": 1})
    turns = sorted(d.participations for d in result.devices)
    assert sum(turns) == 48 and turns[0] >= 2, turns


async def test_an_upload_with_a_check_in(make_server: Any) -> None:
    """?checkin=inline: the answer is the next check-in's (here the next round's task with its
    model), the upload's own answer in a header; a bad value is refused before anything is
    read; a server asking phones to rest after an update answers the upload alone."""
    for rest in (0.0, 30.0):
        client = await make_server(sample_fraction=1.0, min_cohort=1, rest_after_update_s=rest)
        phone, auth, task = await register(client, "solo")
        assert (await (await client.post("/v1/checkin", json={}, headers=auth)).json())["action"] == "train"
        body = update_body(task, update_id="a1")
        bad = await client.post("/v1/update?checkin=maybe", data=body, headers=auth)
        assert bad.status == 400 and (await bad.json())["error"] == "bad_query"
        assert (await (await client.get("/v1/status")).json())["version"] == 0  # nothing was taken
        resp = await client.post("/v1/update?checkin=inline", data=body, headers=auth)
        assert resp.status == 200
        if rest:
            assert "X-Fedfleet-Checkin" not in resp.headers and (await resp.json())["next_checkin_s"] == rest
            continue
        assert resp.headers["X-Fedfleet-Checkin"] == "1" and resp.headers["Content-Type"] == "application/octet-stream"
        ack = json.loads(resp.headers["X-Fedfleet-Update"])
        assert ack["accepted"] is True and ack["duplicate"] is False
        msg = decode_message(await resp.read())
        assert msg.meta["version"] == 1 and msg.meta["task"]["action"] == "train" and msg.meta["task"]["version"] == 1
        again = await client.post("/v1/update?checkin=json", data=body, headers=auth)  # a retry: same update
        assert json.loads(again.headers["X-Fedfleet-Update"])["duplicate"] is True
        assert (await again.json())["action"] == "train"  # JSON check-in answer: already in this round's cohort


def test_model_memo_decodes_identical_bytes_once_and_checks_the_rest() -> None:
    specs = {"w": TensorSpec((2, 3)), "b": TensorSpec((3,))}
    tensors = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, np.float32)}
    blob = encode_message("model", {"version": 4}, tensors)
    memo = ModelMemo(size=2)
    first, again = memo.decode(blob, specs), memo.decode(bytes(blob), specs)  # equal bytes, another object
    assert again is first and memo.hits == 1
    np.testing.assert_array_equal(first.tensors["w"], tensors["w"])
    with pytest.raises(ShapeMismatch):  # the same bytes against other expectations are checked again
        memo.decode(blob, {"w": TensorSpec((3, 2)), "b": TensorSpec((3,))})
    with pytest.raises(ChecksumMismatch):  # one byte off is another message: decoded, and refused
        memo.decode(blob[:-5] + bytes([blob[-5] ^ 1]) + blob[-4:], specs)
    for v in (5, 6):  # older entries fall out
        memo.decode(encode_message("model", {"version": v}, tensors), specs)
    assert memo.decode(blob, specs) is not first and memo.hits == 1


async def test_a_model_the_phone_must_refuse_is_a_bad_answer_not_a_crash(make_server: Any, digits: Any) -> None:
    """A corrupt or wrong-shape model from the server is counted as the server's fault (502, which
    the phone's run loop retries and counts), not an exception that would stop the whole fleet."""
    client = await make_server(sample_fraction=1.0)
    url = str(client.make_url("")).rstrip("/")
    async with aiohttp.ClientSession() as session:
        phone = PhoneClient(session, url, "p0", (digits.x_train[:10], digits.y_train[:10]), None,
                            np.random.default_rng(0), models=ModelMemo())
        task = await phone.register()
        good = encode_message("model", {"version": 0}, {p["name"]: np.zeros(p["shape"], np.float32)
                                                        for p in task["params"]})
        assert phone._decode_model(good).meta["version"] == 0
        for bad, reason in ((good[:-5] + bytes([good[-5] ^ 1]) + good[-4:], "checksum"),
                            (encode_message("model", {"version": 0}, {"w": np.zeros(2, np.float32)}), "shape_mismatch")):
            with pytest.raises(ServerError) as err:
                phone._decode_model(bad)
            assert err.value.status == 502 and reason in str(err.value)


def test_a_finished_run_ends_the_same_however_fast_the_fleet_polls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a virtual clock a run of N rounds ends when each phone's own check-in hears "done", not
    when the fleet's wall-clock poll of the round records sees the server finish: stopped by that
    poll, how many phones had checked in after the last merge depended on the machine's speed."""
    import dataclasses

    fleet_config = SimulateConfig.fleet_config

    def run(name: str, poll_s: float) -> bytes:
        monkeypatch.setattr(SimulateConfig, "fleet_config", lambda self: dataclasses.replace(fleet_config(self), poll_s=poll_s))
        cfg = SimulateConfig(phones=30, dataset="digits", model="mlp", rounds=3, devices="default", seed=5,
                             out=str(tmp_path / name))
        asyncio.run(simulate(cfg))
        return (tmp_path / name / "devices.csv").read_bytes()

    assert run("eager", 0.001) == run("lazy", 0.5)
