"""Signed uploads, replays, admin endpoints and backpressure against the real server."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from fedfleet.protocol.signing import NONCE_HEADER, SIGNATURE_HEADER, PhoneKey
from fedfleet.server.state import UPLOADS
from tests.conftest import MakeClient, update_body


async def _enrol(client: Any, name: str, key: PhoneKey | None) -> tuple[dict[str, str], dict[str, Any]]:
    body: dict[str, Any] = {"name": name}
    if key is not None:
        body["public_key"] = key.public_b64()
    resp = await client.post("/v1/register", json=body)
    assert resp.status == 201, await resp.text()
    data = await resp.json()
    auth = {"Authorization": f"Bearer {data['token']}"}
    await client.post("/v1/checkin", headers=auth)
    return auth, data["task"]


async def test_signed_upload_accepted_and_replay_forgery_refused(make_server: MakeClient) -> None:
    client = await make_server(sample_fraction=1.0, min_cohort=3)
    key = PhoneKey()
    auth, task = await _enrol(client, "s", key)
    body = update_body(task)
    signed = key.headers("s", 0, "u1", body)
    ok = await client.post("/v1/update", data=body, headers={**auth, **signed})
    assert ok.status == 200
    replay = await client.post("/v1/update", data=body, headers={**auth, **signed})
    assert replay.status == 401 and (await replay.json())["error"] == "replay"
    # An honest retry signs again: idempotent success, merged once.
    retry = await client.post("/v1/update", data=body, headers={**auth, **key.headers("s", 0, "u1", body)})
    assert retry.status == 200 and (await retry.json())["duplicate"] is True
    # Someone else's key, with a nonce past the phone's last (two signatures within one millisecond put that
    # one ahead of the clock): it must fail on the signature, not as a replay.
    await asyncio.sleep(0.01)
    forged = PhoneKey().headers("s", 0, "u2", body)
    bad = await client.post("/v1/update", data=update_body(task, update_id="u2"), headers={**auth, **forged})
    assert bad.status == 401 and (await bad.json())["error"] == "bad_signature"
    tampered = key.headers("s", 0, "u3", body)  # signature over other bytes
    bad = await client.post("/v1/update", data=update_body(task, update_id="u3"), headers={**auth, **tampered})
    assert bad.status == 401
    unsigned = await client.post("/v1/update", data=update_body(task, update_id="u4"), headers=auth)
    assert unsigned.status == 401 and (await unsigned.json())["error"] == "unsigned"
    old = dict(key.headers("s", 0, "u5", body))
    old[NONCE_HEADER] = "1000"  # 1970: outside the skew window
    bad = await client.post("/v1/update", data=body, headers={**auth, **old, SIGNATURE_HEADER: old[SIGNATURE_HEADER]})
    assert bad.status == 401
    st = await (await client.get("/v1/status")).json()
    assert st["updates_in_round"] == 1


async def test_required_signatures_and_bad_keys(make_server: MakeClient) -> None:
    client = await make_server(require_signatures=True)
    assert (await client.post("/v1/register", json={"name": "a"})).status == 400
    assert (await client.post("/v1/register", json={"name": "a", "public_key": "AAAA"})).status == 400
    assert (await client.post("/v1/register", json={"name": "a", "public_key": PhoneKey().public_b64()})).status == 201


async def test_admin_endpoints_need_the_token(make_server: MakeClient) -> None:
    client = await make_server(admin_token="s3cret", sample_fraction=1.0)
    auth, _ = await _enrol(client, "p", None)
    assert (await client.post("/v1/admin/pause")).status == 403
    assert (await client.post("/v1/admin/pause", headers={"Authorization": "Bearer nope"})).status == 403
    admin = {"Authorization": "Bearer s3cret"}
    assert (await client.post("/v1/admin/pause", headers=admin)).status == 200
    assert (await (await client.post("/v1/checkin", headers=auth)).json())["action"] == "wait"
    resp = await client.post("/v1/admin/plan", json={"lr": 0.01}, headers=admin)
    assert resp.status == 200 and (await resp.json())["train"]["lr"] == 0.01
    assert (await client.post("/v1/admin/plan", json={"lr": -1}, headers=admin)).status == 400
    assert (await client.post("/v1/admin/plan", json={"model": "cnn"}, headers=admin)).status == 400
    await client.post("/v1/admin/resume", headers=admin)
    answer = await (await client.post("/v1/checkin", headers=auth)).json()
    assert answer["action"] == "train" and answer["train"]["lr"] == 0.01
    phones = await (await client.get("/v1/admin/phones", headers=admin)).json()
    assert phones["count"] == 1


async def test_admin_disabled_without_token(make_server: MakeClient) -> None:
    client = await make_server()
    assert (await client.post("/v1/admin/pause", headers={"Authorization": "Bearer x"})).status == 404


async def test_backpressure_503_with_retry_after(make_server: MakeClient) -> None:
    client = await make_server(max_concurrent_uploads=1, max_waiting_uploads=0, request_timeout_s=0.5,
                               sample_fraction=1.0, min_cohort=3)
    auth, task = await _enrol(client, "p", None)
    body = update_body(task)

    async def trickle() -> Any:  # a slow-loris body: holds the only upload slot, then times out
        async def gen() -> Any:
            yield body[:10]
            await asyncio.sleep(2.0)
            yield body[10:]

        return await client.post("/v1/update", data=gen(), headers={**auth, "Content-Length": str(len(body))})

    slow = asyncio.create_task(trickle())
    await asyncio.sleep(0.2)
    busy = await client.post("/v1/update", data=body, headers=auth)
    assert busy.status == 503 and busy.headers["Retry-After"]
    slow_resp = await slow
    assert slow_resp.status == 408
    assert (await client.post("/v1/update", data=body, headers=auth)).status == 200


async def _hold_the_slot(client: Any, auth: dict[str, str], body: bytes, hold_s: float) -> asyncio.Task[Any]:
    """A slow-loris upload that takes the only slot until the server times its body out."""
    async def gen() -> Any:
        yield body[:10]
        await asyncio.sleep(hold_s)
        yield body[10:]

    task = asyncio.create_task(client.post("/v1/update", data=gen(), headers={**auth, "Content-Length": str(len(body))}))
    await _until(lambda: client.server.app[UPLOADS].active == 1)
    return task


async def _until(condition: Any, timeout_s: float = 5.0) -> None:
    """Poll (a loaded machine may take a while to get a request to the server)."""
    for _ in range(int(timeout_s / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


async def test_uploads_beyond_the_slots_queue_in_order_and_the_queue_is_bounded(make_server: MakeClient) -> None:
    """With the only slot taken, the next uploads wait for it instead of a 503 storm: they are
    served in arrival order once it frees, one past ``max_waiting_uploads`` gets 503 at once."""
    client = await make_server(max_concurrent_uploads=1, max_waiting_uploads=2, request_timeout_s=2.0,
                               sample_fraction=1.0, min_cohort=3)
    phones = [await _enrol(client, f"q{i}", None) for i in range(3)]
    slow = await _hold_the_slot(client, phones[0][0], update_body(phones[0][1]), 4.0)
    gate = client.app[UPLOADS]
    done: list[str] = []

    async def upload(i: int) -> int:
        auth, task = phones[i]
        resp = await client.post("/v1/update", data=update_body(task, update_id=f"u-{i}"), headers=auth)
        done.append(f"q{i}")
        return resp.status

    queued = [asyncio.create_task(upload(1))]
    await _until(lambda: len(gate.waiting) == 1)
    queued.append(asyncio.create_task(upload(2)))
    await _until(lambda: len(gate.waiting) == 2)
    assert gate.active == 1
    full = await client.post("/v1/update", data=update_body(phones[0][1], update_id="u-late"), headers=phones[0][0])
    assert full.status == 503 and full.headers["Retry-After"]
    assert (await slow).status == 408  # the slot frees when the slow body times out...
    assert await asyncio.gather(*queued) == [200, 200]  # ...and the queued uploads go through, first come first
    assert done == ["q1", "q2"]
    assert gate.active == 0 and not gate.waiting


async def test_a_queued_upload_gives_up_after_upload_wait_s(make_server: MakeClient) -> None:
    client = await make_server(max_concurrent_uploads=1, upload_wait_s=0.2, request_timeout_s=3.0,
                               sample_fraction=1.0, min_cohort=3)
    (auth, task), (auth2, task2) = await _enrol(client, "w1", None), await _enrol(client, "w2", None)
    slow = await _hold_the_slot(client, auth, update_body(task), 5.0)
    gate = client.app[UPLOADS]
    t0 = asyncio.get_running_loop().time()
    waited = await client.post("/v1/update", data=update_body(task2, update_id="u-w"), headers=auth2)
    assert waited.status == 503 and (await waited.json())["error"] == "busy"
    assert 0.15 < asyncio.get_running_loop().time() - t0 < 2.5 and not gate.waiting
    assert (await slow).status == 408
    ok = await client.post("/v1/update", data=update_body(task2, update_id="u-y"), headers=auth2)
    assert ok.status == 200 and gate.active == 0  # no slot was lost on the way


async def test_a_phone_leaving_the_upload_queue_frees_its_place(make_server: MakeClient) -> None:
    client = await make_server(max_concurrent_uploads=1, request_timeout_s=3.0, sample_fraction=1.0, min_cohort=3)
    (auth, task), (auth2, task2) = await _enrol(client, "l1", None), await _enrol(client, "l2", None)
    slow = await _hold_the_slot(client, auth, update_body(task), 5.0)
    gate = client.app[UPLOADS]
    leaver = asyncio.create_task(client.post("/v1/update", data=update_body(task2, update_id="u-x"), headers=auth2))
    await _until(lambda: len(gate.waiting) == 1)
    leaver.cancel()  # the phone goes away while queued (it would otherwise wait upload_wait_s, 30 s)
    await _until(lambda: not gate.waiting)
    assert gate.active == 1
    assert (await slow).status == 408
    ok = await client.post("/v1/update", data=update_body(task2, update_id="u-y"), headers=auth2)
    assert ok.status == 200 and gate.active == 0  # no slot was lost on the way


@pytest.mark.parametrize("bad", [{"max_concurrent_uploads": 0}, {"max_waiting_uploads": -1},
                                 {"upload_wait_s": -1.0}, {"upload_wait_s": float("nan")}])
def test_upload_queue_settings_are_checked(bad: dict[str, Any]) -> None:
    from fedfleet.server.config import ServerConfig

    with pytest.raises(ValueError, match="max_concurrent_uploads must be >= 1"):
        ServerConfig(**bad)
