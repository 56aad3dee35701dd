"""Registering many phones in one admin request (POST /v1/admin/phones, server/bulk_registration.py),
through the real server on loopback and its SQLite file: the phones get working tokens and their
keys are enrolled; every kind of bad request is a 4xx with a named error and inserts nothing."""

from __future__ import annotations

import base64
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.test_utils import TestClient

from fedfleet.protocol.signing import PhoneKey
from fedfleet.server.app import make_app
from fedfleet.server.bulk_registration import BULK_MAX_PHONES
from fedfleet.server.config import ServerConfig
from fedfleet.server.state import MODEL_FINGERPRINT
from tests.conftest import update_body

ADMIN = {"Authorization": "Bearer admin-secret"}


def _config(tmp_path: Path, **overrides: Any) -> ServerConfig:
    return ServerConfig(model="mlp", input_shape=(1, 8, 8), num_classes=10, rounds=2, sample_fraction=1.0,
                        data_dir=str(tmp_path / "state"), admin_token="admin-secret", require_signatures=True,
                        **overrides)


def _phones(n: int, start: int = 0) -> tuple[list[dict[str, Any]], list[PhoneKey]]:
    keys = [PhoneKey(bytes([i % 256, i // 256]) * 16) for i in range(start, start + n)]
    return [{"name": f"bulk-{i:05d}", "public_key": k.public_b64(), "platform": "emulated"}
            for i, k in zip(range(start, start + n), keys, strict=True)], keys


def _count(tmp_path: Path) -> int:
    with sqlite3.connect(tmp_path / "state" / "server.sqlite") as db:
        return int(db.execute("SELECT COUNT(*) FROM phones").fetchone()[0])


async def test_many_phones_register_in_one_request_and_each_token_works(aiohttp_client: Any, tmp_path: Path) -> None:
    client: TestClient = await aiohttp_client(make_app(_config(tmp_path)))
    phones, keys = _phones(300)
    resp = await client.post("/v1/admin/phones", json={"phones": phones}, headers=ADMIN)
    assert resp.status == 201, await resp.text()
    answer = await resp.json()
    assert answer["phone_ids"] == [p["name"] for p in phones]
    assert len(set(answer["tokens"])) == 300 and answer["task"]["params"]
    assert _count(tmp_path) == 300  # committed to the file
    with sqlite3.connect(tmp_path / "state" / "server.sqlite") as db:
        info = db.execute("SELECT info FROM phones WHERE phone_id = 'bulk-00007'").fetchone()[0]
    assert keys[7].public_b64() in info and '"platform": "emulated"' in info
    # a bulk-registered phone checks in and uploads, signed with its enrolled key
    token, name = answer["tokens"][7], answer["phone_ids"][7]
    auth = {"Authorization": f"Bearer {token}"}
    resp = await client.post("/v1/checkin", json={}, headers=auth)
    assert resp.status == 200 and (await resp.json())["action"] == "train"
    body = update_body(answer["task"])
    resp = await client.post("/v1/update", data=body, headers={**auth, **keys[7].headers(name, 0, "u1", body)})
    assert resp.status == 200, await resp.text()
    body2 = update_body(answer["task"], update_id="u2")
    resp = await client.post("/v1/update", data=body2, headers={**auth, **keys[8].headers(name, 0, "u2", body2)})
    assert (resp.status, (await resp.json())["error"]) == (401, "bad_signature")  # another phone's key
    # single registration is unchanged beside it
    resp = await client.post("/v1/register", json={"name": "single", "public_key": PhoneKey().public_b64()})
    assert resp.status == 201
    resp = await client.get("/v1/admin/phones", headers=ADMIN)
    assert (await resp.json())["count"] == 301


async def test_a_bad_bulk_request_is_refused_whole_and_inserts_nothing(aiohttp_client: Any, tmp_path: Path) -> None:
    client: TestClient = await aiohttp_client(make_app(_config(tmp_path)))
    phones, _ = _phones(20)
    resp = await client.post("/v1/admin/phones", json={"phones": phones[:5]}, headers=ADMIN)
    assert resp.status == 201

    async def refused(body: Any, headers: dict[str, str] | None = ADMIN, **kw: Any) -> tuple[int, str]:
        resp = await client.post("/v1/admin/phones", json=body, headers=headers, **kw) if body is not None \
            else await client.post("/v1/admin/phones", headers=headers, **kw)
        return resp.status, (await resp.json())["error"]

    bad_key = [*phones[5:10], {**phones[10], "public_key": base64.b64encode(b"\x01" * 31).decode()}]
    not_a_point = [*phones[5:10], {**phones[10], "public_key": base64.b64encode(b"\x02" * 32).decode()}]
    twice_key = [*phones[5:10], {**phones[10], "public_key": phones[6]["public_key"]}]
    twice_name = [*phones[5:10], {**phones[11], "name": phones[6]["name"]}]
    no_key = [*phones[5:10], {"name": "keyless"}]
    taken = [*phones[5:10], phones[2]]  # registered by the first request
    too_many = [{"name": f"n{i}"} for i in range(BULK_MAX_PHONES + 1)]
    cases = [
        (refused({"phones": phones[5:10]}, headers=None), (403, "forbidden")),
        (refused({"phones": phones[5:10]}, headers={"Authorization": "Bearer wrong"}), (403, "forbidden")),
        (refused({"phones": bad_key}), (400, "bad_public_key")),
        (refused({"phones": not_a_point}), (400, "bad_public_key")),
        (refused({"phones": twice_key}), (400, "duplicate_key")),
        (refused({"phones": twice_name}), (400, "duplicate_name")),
        (refused({"phones": no_key}), (400, "key_required")),
        (refused({"phones": [*phones[5:10], {**phones[11], "name": "bad name!"}]}), (400, "bad_name")),
        (refused({"phones": []}), (400, "malformed")),
        (refused({"phones": [*phones[5:10], "x"]}), (400, "malformed")),
        (refused({"phones": taken}), (409, "name_taken")),
        (refused({"phones": too_many}), (413, "too_many_phones")),
        (refused(None, data=b"{" + b" " * (8 << 20) + b"}"), (413, "too_large")),
        (refused(None, data=b"{not json"), (400, "malformed")),
    ]
    for outcome, expected in cases:
        assert await outcome == expected
    assert _count(tmp_path) == 5  # nothing of any refused request was inserted
    resp = await client.post("/v1/admin/phones", json={"phones": phones[5:20]}, headers=ADMIN)  # the names stay free
    assert resp.status == 201 and _count(tmp_path) == 20


async def test_bulk_registration_needs_admin_endpoints_on_and_the_tasks_model(aiohttp_client: Any,
                                                                            tmp_path: Path) -> None:
    client: TestClient = await aiohttp_client(make_app(_config(tmp_path).replace(admin_token=None)))
    phones, _ = _phones(3)
    resp = await client.post("/v1/admin/phones", json={"phones": phones})
    assert (resp.status, (await resp.json())["error"]) == (404, "no_admin")
    app = make_app(_config(tmp_path / "b"))
    app[MODEL_FINGERPRINT] = "f" * 64
    client = await aiohttp_client(app)
    resp = await client.post("/v1/admin/phones", json={"phones": phones, "model_fingerprint": "e" * 64},
                             headers=ADMIN)
    assert (resp.status, (await resp.json())["error"]) == (409, "model_mismatch")
    assert _count(tmp_path / "b") == 0


async def test_a_server_that_requires_enrolment_codes_takes_the_admins_bulk_registration(
        aiohttp_client: Any, tmp_path: Path) -> None:
    codes = tmp_path / "codes.txt"
    codes.write_text("alpha-0001-xyz\n")
    client: TestClient = await aiohttp_client(make_app(_config(tmp_path, enrolment_codes=str(codes))))
    phones, _ = _phones(4)
    resp = await client.post("/v1/register", json=phones[0])
    assert (resp.status, (await resp.json())["error"]) == (403, "enrolment_code_required")
    resp = await client.post("/v1/admin/phones", json={"phones": phones}, headers=ADMIN)
    assert resp.status == 201 and _count(tmp_path) == 4


async def test_bulk_registration_over_a_real_client_session(aiohttp_client: Any, tmp_path: Path) -> None:
    """The fleet's client (device_runtime.fleet_bulk) against the real server: tokens in a column."""
    from fedfleet.device_runtime.fleet_bulk import public_keys, register_in_bulk

    client: TestClient = await aiohttp_client(make_app(_config(tmp_path)))
    secret = b"s" * 32
    names = [f"col-{i:05d}" for i in range(2500)]
    async with aiohttp.ClientSession() as session:
        tokens, task = await register_in_bulk(session, str(client.make_url("/")), "admin-secret", names,
                                              public_keys(secret, range(2500)), chunk=1000)
    assert tokens.shape == (2500,) and len(set(tokens.tolist())) == 2500 and task["params"]
    assert _count(tmp_path) == 2500
    resp = await client.post("/v1/checkin", json={}, headers={"Authorization": f"Bearer {tokens[1234].decode()}"})
    assert resp.status == 200
