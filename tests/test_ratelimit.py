"""Failure budgets (server/ratelimit.py) against the real server on loopback: a phone that keeps
sending bad requests gets 429 from its headers alone, an honest phone next to it (same address)
is unaffected, and budgets refill with time."""

from __future__ import annotations

import asyncio
import time

from aiohttp.test_utils import TestClient

from fedfleet.protocol.signing import PhoneKey
from fedfleet.server.ratelimit import TokenBuckets
from tests.conftest import MakeClient, update_body


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_bucket_allows_burst_then_refills_at_rate() -> None:
    clock = FakeClock()
    b = TokenBuckets(burst=3, rate_per_s=2.0, clock=clock)
    for _ in range(3):
        assert b.retry_after("p") == 0
        b.charge("p")
    assert b.retry_after("p") == 0.5  # one token at 2/s
    assert b.retry_after("other") == 0  # buckets are per key
    clock.t = 0.5
    assert b.retry_after("p") == 0
    b.charge("p")
    assert b.retry_after("p") > 0
    clock.t = 100.0
    for _ in range(3):  # refilled to the burst, never beyond it
        assert b.retry_after("p") == 0
        b.charge("p")
    assert b.retry_after("p") > 0


def test_buckets_stay_bounded_under_many_keys() -> None:
    clock = FakeClock()
    b = TokenBuckets(burst=2, rate_per_s=1.0, max_keys=100, clock=clock)
    for i in range(10_000):
        b.charge(f"k{i}")
    assert len(b) <= 100
    b.charge("recent")
    b.charge("recent")
    assert b.retry_after("recent") > 0  # the most recently charged are the ones kept


async def _phone(client: TestClient, name: str) -> tuple[dict[str, str], PhoneKey, dict[str, object]]:
    key = PhoneKey()
    resp = await client.post("/v1/register", json={"name": name, "public_key": key.public_b64()})
    body = await resp.json()
    auth = {"Authorization": f"Bearer {body['token']}"}
    assert (await (await client.post("/v1/checkin", headers=auth)).json())["action"] == "train"
    return auth, key, body["task"]


async def test_misbehaving_phone_gets_429_and_honest_phone_does_not(make_server: MakeClient) -> None:
    client = await make_server(sample_fraction=1.0, min_cohort=3, require_signatures=True, reject_burst=5,
                               reject_rate_per_s=1.0)
    bad_auth, bad_key, task = await _phone(client, "mallory")
    auth, key, _ = await _phone(client, "honest")
    garbage = b"FFLT not an update"
    statuses = []
    for i in range(8):  # signed correctly, so only the body is wrong: each costs a decode, then a 400
        resp = await client.post("/v1/update", data=garbage, headers={**bad_auth, **bad_key.headers("mallory", 0, f"x{i}", garbage)})
        statuses.append(resp.status)
        if resp.status == 429:
            err = await resp.json()
            assert err["error"] == "rate_limited" and err["message"]
            assert 1 <= int(resp.headers["Retry-After"]) <= 2
    assert statuses[:5] == [400] * 5 and set(statuses[5:]) == {429}
    # A correct upload from the throttled phone is refused too: its budget, not its request, decides.
    body = update_body(task, update_id="m1")
    resp = await client.post("/v1/update", data=body, headers={**bad_auth, **bad_key.headers("mallory", 0, "m1", body)})
    assert resp.status == 429
    # The honest phone, from the same loopback address, is not affected.
    body = update_body(task, update_id="h1")
    resp = await client.post("/v1/update", data=body, headers={**auth, **key.headers("honest", 0, "h1", body)})
    assert resp.status == 200, await resp.text()
    assert (await client.post("/v1/checkin", headers=auth)).status == 200
    status = await (await client.get("/v1/status")).json()
    assert status["rejections"].get("rate_limited", 0) >= 3 and status["updates_in_round"] == 1
    # The budget refills: at 1/s, a second later one more request is judged on its merits.
    await asyncio.sleep(1.0)
    resp = await client.post("/v1/update", data=garbage, headers={**bad_auth, **bad_key.headers("mallory", 0, "x9", garbage)})
    assert resp.status == 400
    assert (await client.post("/v1/update", data=garbage, headers=bad_auth)).status == 429


async def test_throttled_upload_is_refused_before_its_body_is_read(make_server: MakeClient) -> None:
    client = await make_server(require_signatures=True, reject_burst=2, reject_rate_per_s=0.01,
                               request_timeout_s=5.0)
    bad_auth, _key, _task = await _phone(client, "mallory")
    for _ in range(2):
        assert (await client.post("/v1/update", data=b"x", headers=bad_auth)).status == 401  # unsigned
    host, port = str(client.server.host), int(client.server.port or 0)
    reader, writer = await asyncio.open_connection(host, port)
    t0 = time.monotonic()
    head = (f"POST /v1/update HTTP/1.1\r\nHost: x\r\nAuthorization: {bad_auth['Authorization']}\r\n"
            "Content-Length: 100000\r\n\r\n")
    writer.write(head.encode() + b"F")  # a body that would take forever to arrive
    answer = await asyncio.wait_for(reader.read(4096), 2.0)
    assert answer.startswith(b"HTTP/1.1 429") and b"rate_limited" in answer
    assert b"Connection: close" in answer or b"connection: close" in answer.lower()
    assert time.monotonic() - t0 < 1.0  # not the 5 s body timeout: nothing was waited for
    writer.close()


async def test_a_captured_token_used_elsewhere_does_not_throttle_its_phone(make_server: MakeClient) -> None:
    # Behind a proxy that reports client addresses: the thief replays from 10.0.0.66, the phone is at 10.0.0.1.
    client = await make_server(sample_fraction=1.0, min_cohort=3, require_signatures=True, reject_burst=3,
                               reject_rate_per_s=0.01, ratelimit_peer_header="X-Forwarded-For")
    auth, key, task = await _phone(client, "honest")
    body = update_body(task, update_id="h1")
    signed = {**auth, **key.headers("honest", 0, "h1", body)}
    here, there = {"X-Forwarded-For": "10.0.0.1"}, {"X-Forwarded-For": "192.0.2.7, 10.0.0.66"}
    assert (await client.post("/v1/update", data=body, headers={**signed, **here})).status == 200
    replays = [(await client.post("/v1/update", data=body, headers={**signed, **there})).status for _ in range(5)]
    assert replays == [401] * 3 + [429] * 2
    assert (await client.post("/v1/checkin", headers={**auth, **here})).status == 200
    body = update_body(task, update_id="h2")  # judged on its merits (one update a round), not refused unread
    resp = await client.post("/v1/update", data=body, headers={**auth, **key.headers("honest", 0, "h2", body), **here})
    assert resp.status == 409 and (await resp.json())["error"] == "duplicate"


async def test_unknown_tokens_are_metered_per_address_not_per_phone(make_server: MakeClient) -> None:
    client = await make_server(peer_reject_burst=4, peer_reject_rate_per_s=0.01)
    resp = await client.post("/v1/register", json={"name": "honest"})
    auth = {"Authorization": f"Bearer {(await resp.json())['token']}"}
    statuses = [(await client.post("/v1/checkin", headers={"Authorization": f"Bearer forged{i}"})).status
                for i in range(6)]
    assert statuses == [401] * 4 + [429] * 2
    assert (await client.post("/v1/register", json={"name": "late"})).status == 429  # same address, unauthenticated
    assert (await client.post("/v1/checkin", headers=auth)).status == 200  # the phone has its own budget


async def test_budgets_can_be_turned_off(make_server: MakeClient) -> None:
    client = await make_server(reject_burst=0, peer_reject_burst=1)
    statuses = {(await client.post("/v1/checkin", headers={"Authorization": "Bearer nobody"})).status
                for _ in range(5)}
    assert statuses == {401}
