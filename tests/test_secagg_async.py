"""Secure aggregation in async mode (FedBuff) over the real aiohttp server on loopback: phones are
handed a secure group of K at check-in, every member trains from the group's base version, and the
group's unmasked sum merges as one buffer with the staleness weight of that version. The merged
model equals FedBuff's merge of the same integer updates exactly, whoever drops; an aborted group
changes nothing; bad messages get a named 4xx."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
from aiohttp.test_utils import TestClient
from nacl.public import PrivateKey

from fedfleet.device_runtime.secagg_client import (
    SecureOutcome,
    SecureRoundAborted,
    SecureSession,
    secure_round,
)
from fedfleet.protocol.secagg.integer import mean_from_sum
from fedfleet.server.staleness import parse_staleness
from fedfleet.server.state import STORE
from tests.conftest import MakeClient, register, update_body
from tests.test_secagg_server import SECURE, _deltas, _model, _status, _wait_version, sender

ASYNC = {**SECURE, "mode": "async", "buffer_size": 5, "concurrency": 12, "staleness": "poly:0.5"}
Phones = list[tuple[str, dict[str, str]]]


async def _register(client: TestClient, n: int) -> tuple[Phones, dict[str, Any]]:
    phones: Phones = []
    task: dict[str, Any] = {}
    for i in range(n):
        name, auth, task = await register(client, f"p{i:02d}")
        phones.append((name, auth))
    return phones, task


async def _checkin(client: TestClient, auth: dict[str, str]) -> dict[str, Any]:
    answer: dict[str, Any] = await (await client.post("/v1/checkin", headers=auth)).json()
    return answer


async def _group(client: TestClient, phones: Phones, number: int, task: dict[str, Any], seed: int,
                 drops: dict[int, str | None]) -> tuple[list[SecureOutcome | BaseException], list[np.ndarray]]:
    """The four steps of group ``number`` for ``phones``; the integer updates that were summed."""
    names = [p["name"] for p in task["params"]]
    deltas = _deltas(task, len(phones) + seed)[seed:]
    outcomes = await asyncio.gather(*[
        secure_round(sender(client, auth), asyncio.sleep, number, deltas[i], names, np.random.default_rng([seed, i]),
                     drop_after=drops.get(i)) for i, (_, auth) in enumerate(phones)], return_exceptions=True)
    summed = [o.values for o in outcomes if isinstance(o, SecureOutcome) and o.masked is not None]
    return outcomes, [v for v in summed if v is not None]


def _fedbuff(before: dict[str, np.ndarray], outcomes: Sequence[SecureOutcome | BaseException],
             values: list[np.ndarray], staleness: int) -> dict[str, np.ndarray]:
    """FedBuff's merge (Nguyen et al. 2022) of a buffer of equally weighted integer updates, all
    from one base version: the model plus the staleness weight times their mean (scaled and
    rotated back with the group's parameters)."""
    w = parse_staleness("poly:0.5")(staleness)
    params = next(o.params for o in outcomes if isinstance(o, SecureOutcome) and o.params is not None)
    mean = mean_from_sum(np.sum(values, axis=0), params, len(values))
    out, at = {}, 0
    for name, p in before.items():
        out[name] = (p.astype(np.float64) + w * mean[at : at + p.size].reshape(p.shape)).astype(p.dtype)
        at += p.size
    return out


@pytest.mark.parametrize("when", [None, "share", "masked"])
async def test_each_group_merges_as_one_fedbuff_buffer_with_its_base_versions_staleness(
        make_server: MakeClient, when: str | None) -> None:
    client = await make_server(**ASYNC)
    phones, task = await _register(client, 9)
    tasks = [await _checkin(client, auth) for _, auth in phones[:8]]
    assert [t["round"] for t in tasks] == [1] * 5 + [2] * 3  # group 1 full at K = 5; group 2 fills
    assert all(t["action"] == "train" and t["version"] == 0 and t["train"]["secure_agg"] for t in tasks)
    v0 = await _model(client, phones[0][1])

    outcomes, summed = await _group(client, phones[:5], 1, task, 0, {0: when})
    assert all(isinstance(o, SecureOutcome) for o in outcomes), outcomes
    assert len(summed) == (4 if when == "share" else 5)
    await _wait_version(client, 1)
    v1 = await _model(client, phones[0][1])
    for name, p in _fedbuff(v0, outcomes, summed, 0).items():
        np.testing.assert_array_equal(v1[name], p)

    # the model moved on: the next phone opens group 3 on version 1; group 2 keeps its 3 phones, on version 0
    late = await _checkin(client, phones[8][1])
    assert late["round"] == 3 and late["version"] == 1
    again = await _checkin(client, phones[5][1])  # a member asking again before it advertised
    assert (again["action"], again["round"], again["version"]) == ("train", 2, 0)  # its group's base version
    outcomes, summed = await _group(client, phones[5:8], 2, task, 5, {})
    assert all(isinstance(o, SecureOutcome) for o in outcomes) and len(summed) == 3, outcomes
    await _wait_version(client, 2)
    v2 = await _model(client, phones[0][1])
    for name, p in _fedbuff(v1, outcomes, summed, 1).items():  # staleness 1: weight 2 ** -0.5
        np.testing.assert_array_equal(v2[name], p)
    for _ in range(100):
        rows = (await (await client.get("/v1/rounds")).json())["rounds"]
        if len(rows) == 2:
            break
        await asyncio.sleep(0.05)
    assert [(r["secagg_group"], r["staleness_max"], r["updates"]) for r in rows] == [
        (1, 0, 4 if when == "share" else 5), (2, 1, 3)]


async def test_an_aborted_group_changes_nothing_and_frees_its_phones(make_server: MakeClient) -> None:
    client = await make_server(**{**ASYNC, "buffer_size": 4, "distributed_noise_multiplier": 1.0})
    phones, task = await _register(client, 4)
    assert [(await _checkin(client, a))["round"] for _, a in phones] == [1] * 4
    before = await _model(client, phones[0][1])
    outcomes, _ = await _group(client, phones, 1, task, 0, {0: "share", 1: "share", 2: "share"})
    assert isinstance(outcomes[3], SecureRoundAborted), outcomes  # 1 of 4 uploaded; 3 needed
    late = await client.post("/v1/secagg/unmask?round=1", data=b"", headers=phones[3][1])
    assert late.status == 400 and (await late.json())["error"] == "below_threshold"
    polled = await (await client.get("/v1/secagg/unmask?round=1", headers=phones[3][1])).json()
    assert polled["state"] == "aborted"
    await asyncio.sleep(0.3)
    st = await _status(client)
    assert st["version"] == 0 and st["in_flight"] == 0  # its phones are free to train again
    after = await _model(client, phones[0][1])
    for name, p in before.items():
        np.testing.assert_array_equal(after[name], p)
    assert client.app[STORE].get_meta("ledger") is None  # nobody was charged
    again = await _checkin(client, phones[0][1])
    assert again["action"] == "train" and again["round"] == 2  # a new group; number 1 is never reused


async def test_bad_messages_are_refused_by_name_and_change_nothing(make_server: MakeClient) -> None:
    client = await make_server(**{**ASYNC, "buffer_size": 2, "secagg_step_timeout_s": 30.0})
    phones, task = await _register(client, 3)
    a0, a1, a2 = (auth for _, auth in phones)
    assert [(await _checkin(client, a))["round"] for a in (a0, a1, a2)] == [1, 1, 2]
    keys = PrivateKey(b"\x01" * 32).public_key.encode() + PrivateKey(b"\x02" * 32).public_key.encode()

    async def post(auth: dict[str, str], path: str, body: Any = None, raw: bytes | None = None) -> tuple[int, str]:
        resp = await client.post(path, json=body if raw is None else None, data=raw, headers=auth)
        return resp.status, (await resp.json()).get("error", "")

    plain = await client.post("/v1/update", data=update_body(task), headers={
        **a0, "Content-Type": "application/octet-stream"})
    assert plain.status == 409 and (await plain.json())["error"] == "secure_round"  # no update in the clear
    assert await post(a0, "/v1/secagg/advertise?round=7", raw=keys) == (400, "wrong_step")  # no such group
    assert await post(a0, "/v1/secagg/advertise?round=-1", raw=keys) == (400, "malformed")
    assert await post(a2, "/v1/secagg/advertise?round=1", raw=keys) == (400, "wrong_step")  # not its group
    assert (await post(a0, "/v1/secagg/advertise?round=1", raw=keys))[0] == 200
    assert await post(a0, "/v1/secagg/advertise?round=1", raw=keys) == (400, "wrong_step")  # twice
    assert await post(a0, "/v1/secagg/shares?round=1", raw=b"") == (400, "wrong_step")  # roster open
    gone = await (await client.get("/v1/secagg/roster?round=9", headers=a0)).json()
    assert gone["state"] == "aborted"  # a group the server does not know (e.g. lost in a restart): check in again
    assert await post(a1, "/v1/secagg/masked?round=1", raw=b"\x00" * 8) == (400, "wrong_step")
    assert (await _checkin(client, a0))["action"] == "wait"  # it advertised: its group is under way
    again = await _checkin(client, a1)
    assert again["action"] == "train" and again["round"] == 1  # not yet: the same group's task again
    st = await _status(client)
    assert st["version"] == 0 and st["in_flight"] == 3
    assert client.app[STORE].get_meta("ledger") is None


async def test_a_group_that_grew_too_stale_while_it_ran_merges_nothing(make_server: MakeClient) -> None:
    client = await make_server(**{**ASYNC, "buffer_size": 3, "max_staleness": 0})
    phones, task = await _register(client, 6)
    assert [(await _checkin(client, a))["round"] for _, a in phones] == [1, 1, 1, 2, 2, 2]
    outcomes, _ = await _group(client, phones[:3], 1, task, 0, {})
    assert all(isinstance(o, SecureOutcome) for o in outcomes), outcomes
    await _wait_version(client, 1)
    v1 = await _model(client, phones[0][1])
    outcomes, _ = await _group(client, phones[3:], 2, task, 3, {})  # trained on version 0: staleness 1 > 0
    assert all(isinstance(o, SecureOutcome) for o in outcomes), outcomes
    await asyncio.sleep(0.3)
    st = await _status(client)
    assert st["version"] == 1 and st["in_flight"] == 0
    after = await _model(client, phones[0][1])
    for name, p in v1.items():
        np.testing.assert_array_equal(after[name], p)


async def test_phones_exchange_keys_while_they_train(make_server: MakeClient) -> None:
    """Keys first, then training that outlasts the step deadline (0.6 s), then the masked upload:
    the group waits for the uploads until the task's deadline and merges all of them."""
    client = await make_server(**{**ASYNC, "buffer_size": 4})
    phones, task = await _register(client, 4)
    assert [(await _checkin(client, a))["round"] for _, a in phones] == [1] * 4
    v0 = await _model(client, phones[0][1])
    names = [p["name"] for p in task["params"]]
    deltas = _deltas(task, 4)

    async def phone(i: int, auth: dict[str, str]) -> SecureOutcome:
        session = SecureSession(sender(client, auth), asyncio.sleep, 1, names, np.random.default_rng([9, i]))
        await session.keys()
        await asyncio.sleep(1.5)  # training, after the keys are shared
        return await session.upload(deltas[i])

    outcomes = await asyncio.gather(*[phone(i, a) for i, (_, a) in enumerate(phones)])
    await _wait_version(client, 1)
    v1 = await _model(client, phones[0][1])
    for name, p in _fedbuff(v0, outcomes, [o.values for o in outcomes if o.values is not None], 0).items():
        np.testing.assert_array_equal(v1[name], p)
