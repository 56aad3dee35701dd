"""Seeded malformed traffic against the real server on loopback: every answer a 4xx with a message,
no 5xx, nothing accepted, nothing merged, state unchanged (the CI-sized bench/bench_attack.py)."""

from __future__ import annotations

import asyncio
import hashlib
from collections import Counter
from typing import Any

import aiohttp
import numpy as np
from aiohttp.test_utils import TestClient
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bench.bench_attack import (
    CATEGORIES,
    Attacker,
    Capture,
    Case,
    Fuzzer,
    make_bombs,
    public_b64,
    send,
    slow_loris,
)
from fedfleet.protocol.signing import PhoneKey
from tests.conftest import MakeClient, update_body

LIMIT = 256 << 10  # max_update_bytes: small, so "far over the limit" stays cheap


async def _snapshot(client: TestClient, auth: dict[str, str]) -> dict[str, Any]:
    status = await (await client.get("/v1/status")).json()
    status.pop("rejections")
    model = await (await client.get("/v1/model", headers=auth)).read()
    return {**status, "model_sha256": hashlib.sha256(model).hexdigest()}


async def _setup(make_server: MakeClient, **overrides: Any) -> tuple[TestClient, dict[str, str], dict[str, Any],
                                                                      PhoneKey, list[Attacker]]:
    # Sync rounds that need 3 updates: one accepted honest update waits, and anything the fuzzer
    # got accepted would show up as a second pending update (or a merge).
    client = await make_server(sample_fraction=1.0, min_cohort=3, max_update_bytes=LIMIT, request_timeout_s=0.5,
                               require_signatures=True, **overrides)
    key = PhoneKey()
    resp = await client.post("/v1/register", json={"name": "honest", "public_key": key.public_b64()})
    body = await resp.json()
    auth, task = {"Authorization": f"Bearer {body['token']}"}, body["task"]
    attackers = []
    for i in range(2):  # the attacker's own enrolled phones, holding tasks this round
        secret = Ed25519PrivateKey.generate()
        resp = await client.post("/v1/register", json={"name": f"mallory-{i}", "public_key": public_b64(secret)})
        token = (await resp.json())["token"]
        attackers.append(Attacker(f"mallory-{i}", token, secret))
        assert (await (await client.post("/v1/checkin", headers=attackers[-1].auth)).json())["action"] == "train"
    assert (await (await client.post("/v1/checkin", headers=auth)).json())["action"] == "train"
    return client, auth, task, key, attackers


async def test_thousand_fuzzed_requests_get_4xx_and_change_nothing(make_server: MakeClient) -> None:
    # Failure budgets off: every case must reach the check it targets (tests/test_ratelimit.py has them on).
    client, auth, task, key, attackers = await _setup(make_server, reject_burst=0)
    host, port = str(client.server.host), int(client.server.port or 0)
    honest_body = update_body(task, update_id="h1")
    signed = {**auth, **key.headers("honest", 0, "h1", honest_body)}
    assert (await client.post("/v1/update", data=honest_body, headers=signed)).status == 200
    before = await _snapshot(client, auth)
    assert before["updates_in_round"] == 1 and before["version"] == 0
    capture = Capture(signed, honest_body)  # what an eavesdropper saw: replaying it must fail
    fuzzer = Fuzzer(task, attackers, np.random.default_rng(7), LIMIT, make_bombs(LIMIT), lambda: capture)
    cases = fuzzer.cases(1050)
    sem = asyncio.Semaphore(8)
    async with aiohttp.ClientSession() as http:
        async def one(case: Case) -> Any:
            async with sem:
                return await send(http, host, port, case, timeout_s=30)

        outcomes = await asyncio.gather(*(one(c) for c in cases))
    per_category = Counter(o.case.category for o in outcomes)
    assert set(per_category) == set(CATEGORIES) and min(per_category.values()) >= 60
    wrong = [(o.case.category, o.case.name, o.status, o.error) for o in outcomes if not 400 <= o.status < 500]
    assert not wrong, (len(wrong), sorted(Counter(w[:2] + w[3:] for w in wrong).items())[:20])
    silent = [(o.case.category, o.case.name, o.status) for o in outcomes if not o.message]
    assert not silent, silent[:10]
    # Specific defects get their specific answers.
    tags = {(o.case.category, o.case.name): (o.status, o.error) for o in outcomes}
    assert tags[("signature", "replay")] == (401, "replay")
    assert tags[("huge_norm", "scale")] == (400, "huge_norm")
    assert tags[("http_bomb", "gzip")][0] == 415 and tags[("oversized", "streamed")][0] == 413
    assert tags[("non_finite", "nan")] == (400, "non_finite")
    after = await _snapshot(client, auth)
    assert after == before  # no merge, nothing pending beyond the honest update, same model bytes
    rejections = (await (await client.get("/v1/status")).json())["rejections"]
    assert sum(rejections.values()) >= sum(1 for o in outcomes if o.case.path == "/v1/update" and o.case.raw is None
                                           and o.error not in ("unauthenticated", "unknown_phone", ""))


async def test_slow_loris_is_cut_off_and_honest_uploads_still_work(make_server: MakeClient) -> None:
    client, auth, task, key, attackers = await _setup(make_server)
    host, port = str(client.server.host), int(client.server.port or 0)
    stop = asyncio.Event()
    loris = [asyncio.create_task(slow_loris(host, port, kind, attackers[0], stop, gap_s=0.1))
             for kind in ("body", "body", "headers", "idle")]
    await asyncio.sleep(1.5)  # a body trickled for longer than request_timeout_s (0.5 s) gets 408
    body = update_body(task, update_id="h1")
    resp = await client.post("/v1/update", data=body, headers={**auth, **key.headers("honest", 0, "h1", body)})
    assert resp.status == 200, await resp.text()  # the held connections took no upload slot for long
    stop.set()
    episodes = [e for ep in await asyncio.gather(*loris) for e in ep]
    bodies = [e for e in episodes if e["kind"] == "body"]
    assert bodies and all(e["status"] == 408 and e["held_s"] < 1.5 for e in bodies if e["end"] == "answered")
    assert sum(e["status"] == 408 for e in bodies) >= 2
    assert all(e["status"] == 0 or 400 <= e["status"] < 500 for e in episodes)
    assert (await client.get("/v1/status")).status == 200


async def test_compression_bombs_are_never_inflated(make_server: MakeClient) -> None:
    client, auth, task, _key, attackers = await _setup(make_server)
    bombs = make_bombs(LIMIT)  # 16 MiB of zeros in ~16 KiB
    for encoding, bomb in (("gzip", bombs["gzip"]), ("deflate", bombs["deflate"])):
        for path, headers in (("/v1/update", attackers[0].auth), ("/v1/register", {}), ("/v1/checkin", auth)):
            resp = await client.post(path, data=bomb, headers={**headers, "Content-Encoding": encoding})
            err = await resp.json()
            assert resp.status == 415 and err["error"] == "content_encoding" and err["message"], (path, err)
    fuzzer = Fuzzer(task, attackers, np.random.default_rng(1), LIMIT, bombs, lambda: None)
    for _ in range(5):  # the wire format's own zlib flag: inflation stops at the declared size
        case = fuzzer.case("wire_bomb")
        resp = await client.post("/v1/update", data=case.body, headers=case.headers)
        assert resp.status == 400 and (await resp.json())["error"] in ("malformed", "shape_mismatch"), case.name
