"""Asynchronous FedBuff merging: pure parts against hand-computed oracles, then the real server."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from fedfleet.server.app import make_app
from fedfleet.server.async_coordinator import AsyncCoordinator
from fedfleet.server.config import ServerConfig
from fedfleet.server.optimizers import ServerOptimizer
from fedfleet.server.staleness import parse_staleness
from fedfleet.server.state import COORD
from fedfleet.simulate import simulate
from fedfleet.simulate_config import SimulateConfig
from tests.conftest import MakeClient, register, update_body, zero_delta


@pytest.mark.parametrize(
    ("rule", "s", "expected"),
    [("constant", 7, 1.0), ("inverse", 3, 0.25), ("poly:0.5", 3, 0.5), ("poly:1", 4, 0.2),
     ("hinge:0.5:2", 2, 1.0), ("hinge:0.5:2", 6, 1 / 3)],
)
def test_staleness_rules(rule: str, s: int, expected: float) -> None:
    assert parse_staleness(rule)(s) == pytest.approx(expected)


@pytest.mark.parametrize("bad", ["poly:-1", "hinge:1", "cubic", "poly:x"])
def test_bad_staleness_rules(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_staleness(bad)


def test_optimizers_against_hand_computed_steps() -> None:
    p = {"w": np.array([1.0, -2.0], dtype=np.float32)}
    d = {"w": np.array([0.5, 0.1])}
    new, _ = ServerOptimizer("fedavg", lr=2.0).step(p, d, {})
    np.testing.assert_allclose(new["w"], [2.0, -1.8], rtol=1e-6)
    opt = ServerOptimizer("fedavgm", lr=1.0, momentum=0.5)
    p1, s1 = opt.step(p, d, {})
    p2, _ = opt.step(p1, d, s1)  # m2 = 0.5 * 0.5 + 0.5 = 0.75 (first coordinate)
    np.testing.assert_allclose(p2["w"], [1.0 + 0.5 + 0.75, -2.0 + 0.1 + 0.15], rtol=1e-6)
    b1, b2, tau, lr = 0.9, 0.99, 1e-3, 0.1
    adam = ServerOptimizer("fedadam", lr=lr, beta1=b1, beta2=b2, tau=tau)
    out, state = adam.step(p, d, {})
    m = (1 - b1) * d["w"]
    v = b2 * tau**2 + (1 - b2) * d["w"] ** 2
    np.testing.assert_allclose(out["w"], p["w"] + lr * m / (np.sqrt(v) + tau), rtol=1e-6)
    yogi = ServerOptimizer("fedyogi", lr=lr, beta1=b1, beta2=b2, tau=tau)
    out, _ = yogi.step(p, d, {})
    vy = tau**2 - (1 - b2) * d["w"] ** 2 * np.sign(tau**2 - d["w"] ** 2)
    np.testing.assert_allclose(out["w"], p["w"] + lr * m / (np.sqrt(vy) + tau), rtol=1e-6)
    np.testing.assert_allclose(state["m/w"], m)


def _contribute(coord, phone: str, delta: dict, n: int, base: int, uid: str = "u") -> dict:  # type: ignore[no-untyped-def]
    coord.checkin(phone)
    return coord.add_update(phone, {"update_id": uid, "base_version": base, "num_examples": n}, delta)  # type: ignore[no-any-return]


def test_async_with_constant_staleness_reproduces_sync_fedavg(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    base = ServerConfig(model="mlp", sample_fraction=1.0, min_cohort=3)
    sync = make_app(base)[COORD]
    asyn = make_app(base.replace(mode="async", buffer_size=3, staleness="constant", concurrency=3))[COORD]
    for c in (sync, asyn):
        for i in range(3):
            c.store.add_phone(f"p{i}", f"t{i}", {})
    for _ in range(3):  # three rounds of three phones
        deltas = [{n: rng.normal(size=p.shape).astype(np.float32) for n, p in sync.params.items()} for _ in range(3)]
        for c in (sync, asyn):
            for i, d in enumerate(deltas):
                _contribute(c, f"p{i}", d, n=10 * (i + 1), base=c.version, uid=f"{c.version}-{i}")
            assert c.ready()
            c.merge()
    for name in sync.params:
        np.testing.assert_array_equal(sync.params[name], asyn.params[name])


def test_async_staleness_window_future_and_idempotence() -> None:
    coord = make_app(ServerConfig(model="mlp", mode="async", buffer_size=1, max_staleness=2,
                                  staleness="poly:0.5"))[COORD]
    assert isinstance(coord, AsyncCoordinator)
    delta = {n: np.ones(p.shape, dtype=np.float32) for n, p in coord.params.items()}
    before = {n: p.copy() for n, p in coord.params.items()}
    for v in range(3):
        assert _contribute(coord, "a", delta, 5, base=v, uid=f"a{v}")["accepted"]
        coord.merge()
    assert coord.version == 3
    # Staleness 2 is still inside the window and is down-weighted by (1 + 2) ** -0.5.
    ans = _contribute(coord, "b", delta, 5, base=1, uid="b1")
    assert ans["staleness"] == 2
    pub = coord.merge()
    assert pub.record.extra["staleness_max"] == 2
    np.testing.assert_allclose(coord.params["fc2.bias"] - before["fc2.bias"], 3 + 3**-0.5, rtol=1e-5)
    from fedfleet.server.updates import UpdateRejected

    with pytest.raises(UpdateRejected) as stale:
        _contribute(coord, "c", delta, 5, base=0, uid="c0")
    assert stale.value.status == 409 and stale.value.reason == "stale"
    with pytest.raises(UpdateRejected) as future:
        _contribute(coord, "c", delta, 5, base=99, uid="c99")
    assert future.value.status == 400
    # A retry of an update that was already merged: same answer, merged once.
    again = coord.add_update("b", {"update_id": "b1", "base_version": 1, "num_examples": 5}, delta)
    assert again["duplicate"] and again["merged_into"] == 4 and coord.version == 4 and not coord.buffer


async def test_concurrent_uploads_merge_each_update_exactly_once(make_server: MakeClient) -> None:
    client = await make_server(mode="async", buffer_size=4, concurrency=64, max_staleness=50,
                               staleness="constant")
    phones = await asyncio.gather(*(register(client, f"p{i}") for i in range(24)))
    task = phones[0][2]

    async def one(i: int, auth: dict[str, str]) -> list[int]:
        await client.post("/v1/checkin", headers=auth)
        body = update_body(task, zero_delta(task, 1.0), update_id=f"u{i}")
        # Every phone sends its update three times at once: retries racing merges.
        resps = await asyncio.gather(*(client.post("/v1/update", data=body, headers=auth) for _ in range(3)))
        return [r.status for r in resps]

    statuses = await asyncio.gather(*(one(i, auth) for i, (_, auth, _) in enumerate(phones)))
    assert all(s == 200 for row in statuses for s in row)
    st = await (await client.get("/v1/status")).json()
    assert st["version"] == 6 and st["buffered"] == 0  # 24 distinct updates / K=4
    from fedfleet.protocol import decode_message

    model = decode_message(await (await client.get("/v1/model", headers=phones[0][1])).read()).tensors
    # Each merge adds the mean delta (1.0): six merges, each update counted exactly once.
    assert np.allclose(model["fc2.bias"] - decode_message(
        await (await client.get("/v1/model?version=0", headers=phones[0][1])).read()).tensors["fc2.bias"], 6.0)


async def test_async_end_to_end_accuracy_rises(tmp_path: Path) -> None:
    cfg = SimulateConfig(phones=12, rounds=6, model="mlp", mode="async", concurrency=6, buffer=3,
                         devices="default", out=str(tmp_path), workers=1)
    result, summary = await simulate(cfg)
    rows = result.rounds
    assert len(rows) == 6 and rows[-1]["accuracy"] > 0.5 and rows[-1]["accuracy"] > rows[0]["accuracy"]
    assert all(r["mode"] == "async" and "staleness_mean" in r for r in rows)
    assert any(r["staleness_max"] > 0 for r in rows)  # heterogeneous phones really are stale
    assert summary["clock"] == "virtual"
