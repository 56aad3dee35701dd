"""Secure aggregation in sync rounds over the real aiohttp server on loopback: the phones'
client (device_runtime/secagg_client.py) against server/secagg_routes.py. The merged model
equals FedAvg of the same integer updates exactly, whoever drops; bad messages get a named
4xx and change nothing; an aborted group leaves the model and versions as they were."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import numpy as np
import pytest
from aiohttp.test_utils import TestClient
from nacl.public import PrivateKey

from fedfleet.device_runtime.secagg_client import SecureOutcome, SecureRoundAborted, secure_round
from fedfleet.protocol import decode_message
from fedfleet.protocol.secagg.coords import shared_coordinates
from fedfleet.protocol.secagg.integer import mean_from_sum
from fedfleet.protocol.secagg.params import params_from_json
from fedfleet.server.state import STORE
from tests.conftest import MakeClient, register

SECURE = {"secure_agg": True, "sample_fraction": 1.0, "secagg_threshold": 0.6, "secagg_step_timeout_s": 0.6,
          "checkin_retry_s": 0.02, "secagg_clip": 5.0}


class Refused(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status} {reason}")
        self.status, self.reason = status, reason


def sender(client: TestClient, auth: dict[str, str]) -> Any:
    async def send(method: str, path: str, body: Any, raw: bytes | None) -> dict[str, Any]:
        resp = await client.request(method, path, json=body if raw is None else None, data=raw, headers=auth)
        answer: dict[str, Any] = await resp.json()
        if resp.status >= 400:
            raise Refused(resp.status, answer["error"])
        return answer

    return send


async def _cohort(client: TestClient, n: int) -> tuple[list[tuple[str, dict[str, str]]], dict[str, Any]]:
    phones = []
    for i in range(n):
        name, auth, task = await register(client, f"p{i:02d}")
        answer = await (await client.post("/v1/checkin", headers=auth)).json()
        assert answer["action"] == "train" and answer["train"]["secure_agg"] is True
        phones.append((name, auth))
    return phones, task


def _deltas(task: dict[str, Any], n: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(42)
    return [{p["name"]: rng.normal(0, 0.05, p["shape"]).astype(np.float32) for p in task["params"]} for _ in range(n)]


async def _model(client: TestClient, auth: dict[str, str]) -> dict[str, np.ndarray]:
    return decode_message(await (await client.get("/v1/model", headers=auth)).read()).tensors


async def _status(client: TestClient) -> dict[str, Any]:
    status: dict[str, Any] = await (await client.get("/v1/status")).json()
    return status


async def _wait_version(client: TestClient, version: int) -> None:
    for _ in range(200):
        if (await _status(client))["version"] >= version:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"version {version} never published")


async def _round(client: TestClient, phones: list[tuple[str, dict[str, str]]], task: dict[str, Any],
                 drops: dict[int, str]) -> list[SecureOutcome | BaseException]:
    names = [p["name"] for p in task["params"]]
    deltas = _deltas(task, len(phones))
    runs = [
        secure_round(sender(client, auth), asyncio.sleep, 1, deltas[i], names, np.random.default_rng([7, i]),
                     drop_after=drops.get(i))
        for i, (_, auth) in enumerate(phones)
    ]
    return await asyncio.gather(*runs, return_exceptions=True)


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("when", ["share", "masked"])
async def test_merged_model_is_fedavg_of_the_integer_updates(make_server: MakeClient, fraction: float,
                                                             when: str) -> None:
    n = 10
    client = await make_server(min_cohort=n, secagg_degree=8 if fraction < 0.2 else 0, **SECURE)
    phones, task = await _cohort(client, n)
    before = await _model(client, phones[0][1])
    drops = {i: when for i in range(0, n, 3)[: int(fraction * n)]}
    outcomes = await _round(client, phones, task, drops)
    await _wait_version(client, 1)
    assert all(isinstance(o, SecureOutcome) for o in outcomes), outcomes
    summed = [o for o in outcomes if isinstance(o, SecureOutcome) and o.masked is not None]
    assert len(summed) == n - (len(drops) if when == "share" else 0)
    for o in summed:  # no upload equals the phone's integer update
        assert o.values is not None and o.masked is not None
        assert np.mean(o.masked.astype(np.int64) == o.values) < 0.01
    assert summed[0].params is not None
    mean = mean_from_sum(np.sum([_values(o) for o in summed], axis=0), summed[0].params, len(summed))
    after, at = await _model(client, phones[0][1]), 0
    for name, p in before.items():
        d = mean[at : at + p.size].reshape(p.shape)
        at += p.size
        np.testing.assert_array_equal(after[name], (p.astype(np.float64) + d).astype(p.dtype))
    assert (await _status(client))["version"] == 1


async def test_shared_random_k_sends_the_same_coordinates_and_merges_them_unbiased(make_server: MakeClient) -> None:
    n = 5
    client = await make_server(min_cohort=n, codec={"sparsify": "randk", "density": 0.25}, **SECURE)
    phones, task = await _cohort(client, n)
    before = await _model(client, phones[0][1])
    outcomes = await _round(client, phones, task, {})
    await _wait_version(client, 1)
    assert all(isinstance(o, SecureOutcome) and o.params is not None for o in outcomes), outcomes
    params = outcomes[0].params  # type: ignore[union-attr]
    total = sum(p.size for p in before.values())
    assert params is not None and params.model_dim == total and params.dim == int(0.25 * total + 0.5)
    for o in outcomes:  # each phone uploaded k coordinates (rotated), not all of the model's
        assert isinstance(o, SecureOutcome) and o.masked is not None and o.masked.size == params.rotated_dim
    coords = shared_coordinates(params.graph_seed, params.context, params.model_dim, params.dim)
    mean = np.zeros(total)
    mean[coords] = mean_from_sum(np.sum([_values(o) for o in outcomes if isinstance(o, SecureOutcome)], axis=0),
                                 params, n) * (total / params.dim)
    after, at = await _model(client, phones[0][1]), 0
    for name, p in before.items():
        np.testing.assert_array_equal(after[name], (p.astype(np.float64) + mean[at : at + p.size].reshape(p.shape))
                                      .astype(p.dtype))
        at += p.size


async def test_bad_messages_are_refused_by_name_and_change_nothing(make_server: MakeClient) -> None:
    n = 4
    client = await make_server(min_cohort=n, secagg_degree=0, **{**SECURE, "secagg_step_timeout_s": 30.0})
    phones, task = await _cohort(client, n)
    a0 = phones[0][1]

    async def post(auth: dict[str, str], path: str, body: Any = None, raw: bytes | None = None) -> tuple[int, str]:
        resp = await client.post(path, json=body if raw is None else None, data=raw, headers=auth)
        answer = await resp.json()
        return resp.status, answer.get("error", "")

    assert await post(a0, "/v1/secagg/advertise?round=1", raw=bytes(64)) == (
        400, "bad_share")  # a low-order point would make every neighbour's key agreement fail
    lost = await (await client.get("/v1/secagg/roster?round=1", headers=a0)).json()
    assert lost["state"] == "aborted" and "not in" in lost["message"]  # polls before it advertised
    keys = PrivateKey(b"\x01" * 32).public_key.encode() + PrivateKey(b"\x02" * 32).public_key.encode()
    assert await post(a0, "/v1/secagg/advertise?round=2", raw=keys) == (400, "wrong_step")
    assert await post(a0, "/v1/secagg/advertise?round=one", raw=keys) == (400, "malformed")
    assert await post(a0, "/v1/secagg/advertise?round=1", raw=keys[:-1]) == (400, "bad_share")  # 63 bytes
    assert await post(a0, "/v1/secagg/advertise?round=1", raw=keys + bytes(1)) == (400, "bad_share")
    assert await post(a0, "/v1/secagg/shares?round=1", raw=b"") == (400, "wrong_step")  # roster open
    assert (await post(a0, "/v1/secagg/advertise?round=1", raw=keys))[0] == 200
    assert await post(a0, "/v1/secagg/advertise?round=1", raw=keys) == (400, "wrong_step")
    a3 = phones[3][1]  # advertises, and shares only once phone 0's duplicate has been refused
    assert (await post(a3, "/v1/secagg/advertise?round=1", raw=keys))[0] == 200
    # phones 1 and 2 advertise real keys through the client, and stop after sharing
    names = [p["name"] for p in task["params"]]
    deltas = _deltas(task, n)
    runs = [asyncio.create_task(secure_round(sender(client, auth), asyncio.sleep, 1, deltas[i], names,
                                             np.random.default_rng(i), drop_after="share"))
            for i, (_, auth) in enumerate(phones) if i in (1, 2)]
    for _ in range(100):
        roster = await (await client.get("/v1/secagg/roster?round=1", headers=a0)).json()
        if roster["state"] == "ready":
            break
        await asyncio.sleep(0.02)
    params = params_from_json(roster["params"])
    me = roster["index"]
    others = sorted(set(range(1, n + 1)) - {me})
    sealed = b"\xab" * 48 * len(others)  # one per neighbour, in increasing order: no addresses
    assert await post(a0, "/v1/secagg/shares?round=1", raw=sealed + b"\xab" * 48) == (400, "bad_share")  # one too many
    assert await post(a0, "/v1/secagg/shares?round=1", raw=sealed[:-1]) == (400, "bad_share")
    assert await post(a0, "/v1/secagg/shares?round=2", raw=sealed) == (400, "wrong_step")  # another round
    assert await post(a0, "/v1/secagg/shares", raw=sealed) == (400, "malformed")  # no round
    assert (await post(a0, "/v1/secagg/shares?round=1", raw=sealed))[0] == 200
    assert await post(a0, "/v1/secagg/shares?round=1", raw=sealed) == (400, "duplicate_share")
    assert (await post(a3, "/v1/secagg/shares?round=1", raw=sealed))[0] == 200  # complete graph: n - 1 neighbours
    await asyncio.gather(*runs)
    body = bytes(params.upload_bytes)
    assert await post(a0, "/v1/secagg/masked?round=1", raw=body[:-1]) == (400, "bad_share")
    assert (await post(a0, "/v1/secagg/masked?round=1", raw=body))[0] == 200
    assert await post(a0, "/v1/secagg/masked?round=1", raw=body) == (400, "wrong_step")  # a second upload
    assert await post(a0, "/v1/secagg/masked?round=2", raw=body) == (400, "wrong_step")  # another round
    assert await post(a0, "/v1/secagg/unmask?round=1", raw=b"") == (400, "wrong_step")  # the upload step is open
    assert (await _status(client))["version"] == 0


async def test_shares_of_the_wrong_size_or_outside_the_field_are_refused_and_stored_nowhere(
        make_server: MakeClient) -> None:
    """Phone 0 first sends each share message malformed: sealed shares of the former 148 bytes,
    an unmask body of 66-byte shares, one 16-byte share that is no element of GF(2**127 - 1). Each
    is a 400 by name; the group stores none of them (the well-formed message that follows is
    accepted, not a duplicate) and merges."""
    n = 6
    client = await make_server(min_cohort=n, **SECURE)
    phones, task = await _cohort(client, n)
    before = await _model(client, phones[0][1])
    refused: list[tuple[int, str]] = []
    inner = sender(client, phones[0][1])

    async def send(method: str, path: str, body: Any, raw: bytes | None) -> dict[str, Any]:
        async def bad(changed: bytes) -> None:
            with pytest.raises(Refused) as e:
                await inner(method, path, None, changed)
            refused.append((e.value.status, e.value.reason))

        if method == "POST" and path.startswith("/v1/secagg/shares") and raw is not None:
            await bad(b"".join(raw[k : k + 48] + bytes(100) for k in range(0, len(raw), 48)))  # 148 bytes each
        if method == "POST" and path.startswith("/v1/secagg/unmask") and raw is not None:
            await bad(b"".join(bytes(50) + raw[k : k + 16] for k in range(0, len(raw), 16)))  # 66 bytes each
            await bad((2**127 - 1).to_bytes(16, "big") + raw[16:])
        return await inner(method, path, body, raw)

    names = [p["name"] for p in task["params"]]
    deltas = _deltas(task, n)
    outcomes = await asyncio.gather(*[
        secure_round(send if i == 0 else sender(client, auth), asyncio.sleep, 1, deltas[i], names,
                     np.random.default_rng([7, i]))
        for i, (_, auth) in enumerate(phones)])
    assert refused == [(400, "bad_share")] * 3
    await _wait_version(client, 1)
    summed = [o for o in outcomes if isinstance(o, SecureOutcome)]
    assert len(summed) == n and summed[0].params is not None
    mean = mean_from_sum(np.sum([_values(o) for o in summed], axis=0), summed[0].params, n)
    after, at = await _model(client, phones[0][1]), 0
    for name, p in before.items():  # FedAvg of all six phones' integer updates: nothing malformed went in
        np.testing.assert_array_equal(after[name], (p.astype(np.float64) + mean[at : at + p.size].reshape(p.shape))
                                      .astype(p.dtype))
        at += p.size


async def test_an_aborted_group_changes_no_model_no_version_and_no_ledger(make_server: MakeClient) -> None:
    n = 6
    client = await make_server(min_cohort=n, distributed_noise_multiplier=1.0, **SECURE)
    phones, task = await _cohort(client, n)
    before = await _model(client, phones[0][1])
    drops = {i: "share" for i in range(4)}  # 2 of 6 upload; 4 needed
    outcomes = await _round(client, phones, task, drops)
    aborted = [o for o in outcomes if isinstance(o, SecureRoundAborted)]
    assert len(aborted) == 2 and all("aborted" in str(o) for o in aborted), outcomes  # the two that uploaded
    # the unmask step never opened: shares sent anyway are refused by name, and unmask nothing
    late = await client.post("/v1/secagg/unmask?round=1", data=b"", headers=phones[5][1])
    assert late.status == 400 and (await late.json())["error"] == "below_threshold"
    await asyncio.sleep(0.5)
    st = await _status(client)
    assert st["version"] == 0 and st["round"] == 1
    after = await _model(client, phones[0][1])
    for name, p in before.items():
        np.testing.assert_array_equal(after[name], p)
    assert client.app[STORE].get_meta("ledger") is None  # nobody was charged


async def test_distributed_noise_is_recorded_with_its_epsilon(make_server: MakeClient) -> None:
    n = 6
    client = await make_server(min_cohort=n, distributed_noise_multiplier=1.0, **SECURE)
    phones, task = await _cohort(client, n)
    outcomes = await _round(client, phones, task, {5: "masked"})
    await _wait_version(client, 1)
    assert all(isinstance(o, SecureOutcome) for o in outcomes), outcomes
    for _ in range(100):  # the record follows the version once evaluated (here: at once)
        rows = (await (await client.get("/v1/rounds")).json())["rounds"]
        if rows:
            break
        await asyncio.sleep(0.05)
    row = rows[-1]
    assert row["updates"] == n and row["secagg_dropped"] == 0 and row["secagg_aborted"] == 0
    assert row["distributed_noise_sigma"] > 0
    # every survivor was charged one round in the ledger: each phone's noise makes the sum of the
    # fewest survivors (4 of 6) carry the central Gaussian's at z = 1; all 6 uploaded, so the sum
    # carries 6/4 of that variance: the central Gaussian's epsilon at z = sqrt(1.5)
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    z = np.sqrt(n / 4)
    central = RdpAccountant().compose(dp_accounting.GaussianDpEvent(z)).get_epsilon(row["delta"])
    assert row["distributed_epsilon_max"] == row["distributed_epsilon_median"] == pytest.approx(central, rel=0.01)
    ledger = client.app[STORE].get_meta("ledger")
    assert ledger is not None and len(json.loads(ledger)["phones"]) == n
    assert row["secagg_bytes_up"] > row["update_bytes"] > 0 and row["secagg_unmask_ms"] > 0
    assert row["bytes_up"] >= row["secagg_bytes_up"]  # the HTTP bodies of the steps count as phone traffic


def _values(outcome: SecureOutcome) -> np.ndarray:
    """The integer update a phone masked (kept by the test to check the sum)."""
    assert outcome.values is not None
    return outcome.values
