"""The HTTP API against the real server on loopback: the happy path and every bad input."""

from __future__ import annotations

import asyncio
import struct
import zlib

import numpy as np
import pytest

from fedfleet.protocol import decode_message, encode_message
from tests.conftest import MakeClient, register, update_body, zero_delta


async def state(client) -> dict:  # type: ignore[no-untyped-def]
    return await (await client.get("/v1/status")).json()


async def test_round_trip_register_checkin_download_upload_merge(make_server: MakeClient) -> None:
    client = await make_server(sample_fraction=1.0)
    phones = [await register(client, f"p{i}") for i in range(2)]
    task = phones[0][2]
    assert task["model"] == "mlp" and [p["name"] for p in task["params"]] == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    for _i, (_, auth, _) in enumerate(phones):
        answer = await (await client.post("/v1/checkin", headers=auth)).json()
        assert answer["action"] == "train" and answer["version"] == 0 and answer["train"]["lr"] > 0
        resp = await client.get("/v1/model", headers=auth)
        model = decode_message(await resp.read())
        assert model.meta["version"] == 0
        # The ETag makes a repeated download free.
        again = await client.get("/v1/model", headers={**auth, "If-None-Match": resp.headers["ETag"]})
        assert again.status == 304
    deltas = [zero_delta(task, 0.1), zero_delta(task, 0.4)]
    for (_, auth, _), delta, n in zip(phones, deltas, (10, 30), strict=True):
        resp = await client.post("/v1/update", data=update_body(task, delta, num_examples=n), headers=auth)
        assert resp.status == 200, await resp.text()
    st = await state(client)
    assert st["version"] == 1 and st["round"] == 2
    after = decode_message(await (await client.get("/v1/model", headers=phones[0][1])).read()).tensors
    # FedAvg weighted by examples: (10*0.1 + 30*0.4)/40 = 0.325 added to every parameter.
    np.testing.assert_allclose(after["fc2.bias"] - model.tensors["fc2.bias"], 0.325, rtol=1e-5)


async def test_duplicate_upload_is_idempotent(make_server: MakeClient) -> None:
    client = await make_server(sample_fraction=1.0, min_cohort=2)
    (_, a, task), (_, _b, _) = await register(client, "a"), await register(client, "b")
    await client.post("/v1/checkin", headers=a)
    body = update_body(task)
    first = await (await client.post("/v1/update", data=body, headers=a)).json()
    second = await (await client.post("/v1/update", data=body, headers=a)).json()
    assert first["duplicate"] is False and second["duplicate"] is True
    assert (await state(client))["updates_in_round"] == 1
    other = update_body(task, update_id="u2")
    resp = await client.post("/v1/update", data=other, headers=a)
    assert resp.status == 409 and (await resp.json())["error"] == "duplicate"


def _corrupt_checksum(body: bytes) -> bytes:
    return body[:-4] + struct.pack("<I", zlib.crc32(body[:-4]) ^ 1)


BAD_BODIES = {
    "empty": (lambda task: b"", 400, "malformed"),
    "garbage": (lambda task: b"\x00" * 64, 400, "malformed"),
    "truncated": (lambda task: update_body(task)[:-20], 400, None),
    "checksum": (lambda task: _corrupt_checksum(update_body(task)), 400, "checksum"),
    "missing tensor": (lambda task: update_body(task, {k: v for k, v in zero_delta(task).items() if k != "fc2.bias"}),
                       400, "shape_mismatch"),
    "wrong shape": (lambda task: update_body(task, {**zero_delta(task), "fc2.bias": np.zeros(11, np.float32)}),
                    400, "shape_mismatch"),
    "wrong dtype": (lambda task: update_body(task, {**zero_delta(task), "fc2.bias": np.zeros(10, np.float64)}),
                    400, "shape_mismatch"),
    "extra tensor": (lambda task: update_body(task, {**zero_delta(task), "evil": np.zeros(1, np.float32)}),
                     400, "shape_mismatch"),
    "nan": (lambda task: update_body(task, {**zero_delta(task), "fc2.bias": np.full(10, np.nan, np.float32)}),
            400, "non_finite"),
    "inf": (lambda task: update_body(task, {**zero_delta(task), "fc1.bias": np.full(32, np.inf, np.float32)}),
            400, "non_finite"),
    "zero examples": (lambda task: update_body(task, num_examples=0), 400, "bad_examples"),
    "negative examples": (lambda task: update_body(task, num_examples=-5), 400, "bad_examples"),
    "absurd examples": (lambda task: update_body(task, num_examples=10**12), 400, "bad_examples"),
    "float examples": (lambda task: update_body(task, num_examples=1.5), 400, "bad_examples"),
    "no update id": (lambda task: update_body(task, update_id=""), 400, "bad_meta"),
    "model kind": (lambda task: encode_message("model", {"version": 0}, zero_delta(task)), 400, "malformed"),
    "future version": (lambda task: update_body(task, base_version=7), 400, "future_version"),
    "oversized": (lambda task: b"\x00" * (2 << 20), 413, "too_large"),
}


@pytest.mark.parametrize("case", sorted(BAD_BODIES))
async def test_bad_update_gets_4xx_and_changes_nothing(make_server: MakeClient, case: str) -> None:
    client = await make_server(sample_fraction=1.0, min_cohort=2, max_update_bytes=1 << 20)
    _, auth, task = await register(client, "p")
    await client.post("/v1/checkin", headers=auth)
    before = await state(client)
    make_body, status, reason = BAD_BODIES[case]
    resp = await client.post("/v1/update", data=make_body(task), headers=auth)
    assert resp.status == status, await resp.text()
    err = await resp.json()
    assert err["message"] and (reason is None or err["error"] == reason)
    after = await state(client)
    assert after.pop("rejections") == {err["error"]: 1}  # counted by reason, nothing else moved
    before.pop("rejections")
    assert after == before
    # The phone can still upload a good update afterwards.
    good = await client.post("/v1/update", data=update_body(task), headers=auth)
    assert good.status == 200


async def test_auth_and_registration_errors(make_server: MakeClient) -> None:
    client = await make_server()
    _, auth, task = await register(client, "p")
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic abc"}):
        for path in ("/v1/checkin", "/v1/update"):
            resp = await client.post(path, data=update_body(task), headers=headers)
            assert resp.status == 401 and (await resp.json())["error"] in ("unauthenticated", "unknown_phone")
    assert (await client.post("/v1/register", json={"name": "p"})).status == 409
    assert (await client.post("/v1/register", json={"name": "bad name!"})).status == 400
    assert (await client.post("/v1/register", data=b"{not json")).status == 400
    assert (await client.post("/v1/register", data=b"x" * 100_000)).status == 413
    assert (await client.get("/v1/rounds?since=abc")).status == 400


async def test_upload_without_task_is_refused(make_server: MakeClient) -> None:
    client = await make_server(sample_fraction=0.5, min_cohort=1, over_selection=1.0)
    _, a, task = await register(client, "a")
    _, b, _ = await register(client, "b")
    assert (await (await client.post("/v1/checkin", headers=a)).json())["action"] == "train"
    # The cohort (1 phone) is full: b waits and may not upload.
    assert (await (await client.post("/v1/checkin", headers=b)).json())["action"] == "wait"
    resp = await client.post("/v1/update", data=update_body(task), headers=b)
    assert resp.status == 409 and (await resp.json())["error"] == "not_selected"


async def test_round_closes_at_deadline_with_partial_cohort(make_server: MakeClient) -> None:
    client = await make_server(sample_fraction=1.0, round_timeout_s=0.3)
    (_, a, task), (_, b, _) = await register(client, "a"), await register(client, "b")
    await client.post("/v1/checkin", headers=a)
    await client.post("/v1/checkin", headers=b)
    assert (await client.post("/v1/update", data=update_body(task), headers=a)).status == 200
    import asyncio

    await asyncio.sleep(0.8)  # b never reports: the ticker closes the round at its deadline
    st = await state(client)
    assert st["version"] == 1
    rounds = (await (await client.get("/v1/rounds")).json())["rounds"]
    assert rounds[0]["updates"] == 1 and rounds[0]["dropped"] == 1
    late = await client.post("/v1/update", data=update_body(task, update_id="late"), headers=b)
    assert late.status == 409


async def test_update_on_an_old_version_is_stale(make_server: MakeClient) -> None:
    client = await make_server(sample_fraction=1.0, min_cohort=1)
    _, a, task = await register(client, "a")
    await client.post("/v1/checkin", headers=a)
    assert (await client.post("/v1/update", data=update_body(task), headers=a)).status == 200
    await client.post("/v1/checkin", headers=a)  # round 2 on version 1
    resp = await client.post("/v1/update", data=update_body(task, update_id="u2", base_version=0), headers=a)
    assert resp.status == 409 and (await resp.json())["error"] == "stale"
    old = await client.get("/v1/model?version=0", headers=a)
    assert old.status == 200 and old.headers["X-Fedfleet-Version"] == "0"
    assert (await client.get("/v1/model?version=99", headers=a)).status == 404


async def test_checkin_can_carry_the_model_inline(make_server: MakeClient) -> None:
    """A phone that asks gets its "train" task inside the model's wire message (one round trip
    instead of two); a "wait" answer, a phone that does not ask, and a model over the inline
    limit all get the plain JSON answer; a malformed flag is a 400."""
    client = await make_server(sample_fraction=0.5, min_cohort=1, over_selection=1.0)
    (_, a, task), (_, b, _) = await register(client, "a"), await register(client, "b")
    resp = await client.post("/v1/checkin", json={"inline_model": True}, headers=a)
    assert resp.status == 200 and resp.content_type == "application/octet-stream"
    assert resp.headers["X-Fedfleet-Version"] == "0"
    msg = decode_message(await resp.read())
    assert msg.kind == "model" and msg.meta["version"] == 0
    assert msg.meta["task"]["action"] == "train" and msg.meta["task"]["version"] == 0
    assert msg.meta["task"]["train"] == task["train"]
    served = decode_message(await (await client.get("/v1/model", headers=a)).read())
    for name, value in served.tensors.items():
        np.testing.assert_array_equal(msg.tensors[name], value)
    waiting = await client.post("/v1/checkin", json={"inline_model": True}, headers=b)  # the cohort of 1 is full
    assert waiting.content_type == "application/json" and (await waiting.json())["action"] == "wait"
    bad = await client.post("/v1/checkin", json={"inline_model": "yes"}, headers=b)
    assert bad.status == 400 and (await bad.json())["error"] == "bad_checkin"

    small = await make_server(sample_fraction=1.0, inline_model_max_bytes=1024)  # the MLP's model is ~10 KB
    (_, c, _) = await register(small, "c")
    plain = await small.post("/v1/checkin", json={"inline_model": True}, headers=c)
    assert plain.content_type == "application/json" and (await plain.json())["action"] == "train"
    (_, d, _) = await register(small, "d")
    unasked = await small.post("/v1/checkin", json={}, headers=d)
    assert unasked.content_type == "application/json"


async def test_the_first_round_opens_when_the_server_starts_serving(aiohttp_client, digits) -> None:  # type: ignore[no-untyped-def]
    """Building the server (store, model, evaluator) is not part of round 1: its figures and its
    deadline count from when the server starts serving."""
    from fedfleet.server.app import make_app
    from fedfleet.server.config import ServerConfig

    now = [0.0]
    cfg = ServerConfig(model="mlp", input_shape=(1, 8, 8), num_classes=10, round_timeout_s=30.0, sample_fraction=1.0)
    app = make_app(cfg, clock=lambda: now[0])
    now[0] = 100.0  # a slow start: 100 s between building the server and serving
    client = await aiohttp_client(app)
    now[0] = 110.0
    _, auth, task = await register(client, "a")
    assert (await (await client.post("/v1/checkin", headers=auth)).json())["action"] == "train"  # not past a deadline
    now[0] = 111.0
    assert (await client.post("/v1/update", data=update_body(task), headers=auth)).status == 200
    for _ in range(50):
        rounds = (await (await client.get("/v1/rounds")).json())["rounds"]
        if rounds:
            break
        await asyncio.sleep(0.02)
    assert rounds[0]["updates"] == 1 and rounds[0]["wall_s"] == 11.0 and rounds[0]["time_s"] == 11.0
