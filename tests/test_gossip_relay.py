"""The gossip relay (server/relay.py) on the real server over loopback: signed messages go only
along the topology's edges, once, in their round; everything else gets a named 4xx."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from fedfleet.protocol import encode_message
from fedfleet.protocol.signing import PhoneKey
from fedfleet.server.app import make_app
from fedfleet.server.config import ServerConfig
from tests.conftest import MakeClient, zero_delta

RING4: dict[str, Any] = {"topology": "ring", "gossip_phones": 4}  # phone-00000 .. phone-00003, each linked to i +- 1


class Phone:
    def __init__(self, client: Any, name: str, key: PhoneKey | None) -> None:
        self.client, self.name, self.key = client, name, key
        self.auth: dict[str, str] = {}
        self.task: dict[str, Any] = {}

    async def enrol(self) -> Phone:
        body: dict[str, Any] = {"name": self.name}
        if self.key is not None:
            body["public_key"] = self.key.public_b64()
        resp = await self.client.post("/v1/register", json=body)
        assert resp.status == 201, await resp.text()
        data = await resp.json()
        self.auth, self.task = {"Authorization": f"Bearer {data['token']}"}, data["task"]
        return self

    def body(self, round_: int, value: float = 0.5, **meta: Any) -> bytes:
        m = {"algorithm": "dpsgd", "from": self.name, "round": round_, **meta}
        return encode_message("update", m, zero_delta(self.task, value))

    def signed(self, round_: int, to: str, body: bytes, key: PhoneKey | None = None) -> dict[str, str]:
        key = key or self.key
        assert key is not None
        return {**self.auth, **key.headers(self.name, round_, f"gossip:{to}", body)}

    async def send(self, round_: int, to: str, body: bytes | None = None,
                   headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
        body = body if body is not None else self.body(round_)
        headers = headers if headers is not None else self.signed(round_, to, body)
        resp = await self.client.post(f"/v1/gossip/send?round={round_}&to={to}", data=body, headers=headers)
        return resp.status, await resp.json()

    async def recv(self, round_: int, sender: str) -> tuple[int, bytes]:
        resp = await self.client.get(f"/v1/gossip/recv?round={round_}&from={sender}", headers=self.auth)
        return resp.status, await resp.read()


async def _fleet(make_server: MakeClient, n: int = 4, **overrides: Any) -> tuple[Any, list[Phone]]:
    client = await make_server(**{**RING4, "gossip_phones": n, **overrides})
    phones = [await Phone(client, f"phone-{i:05d}", PhoneKey()).enrol() for i in range(n)]
    return client, phones


async def _status(client: Any) -> dict[str, Any]:
    return dict(await (await client.get("/v1/gossip/status")).json())


async def test_a_message_goes_to_a_neighbour_once(make_server: MakeClient) -> None:
    client, (a, b, _, _) = await _fleet(make_server)
    body = a.body(1)
    assert await a.send(1, b.name, body) == (202, {"queued": True, "round": 1})
    status, got = await b.recv(1, a.name)
    assert status == 200 and got == body  # the bytes as sent: the relay does not average or re-encode
    assert await b.recv(1, a.name) == (204, b"")  # handed over once, then deleted
    for _ in range(40):  # a neighbour away is no error of the phone's: never throttled for asking
        assert (await b.recv(1, "phone-00002"))[0] == 204
    traffic = (await _status(client))["rounds"]["1"]
    assert traffic["messages"] == 1 and traffic["delivered"] == 1
    assert traffic["bytes_up"] == len(body) and traffic["bytes_down"] > len(body)


async def test_non_neighbours_replays_and_forgeries_are_refused(make_server: MakeClient) -> None:
    client, (a, b, c, _) = await _fleet(make_server)
    status, err = await a.send(1, c.name)  # 0 and 2 are not linked on a ring of 4
    assert (status, err["error"]) == (403, "not_a_neighbour")
    status, err = await a.send(1, "phone-00009")
    assert (status, err["error"]) == (404, "unknown_phone")
    body = a.body(1)
    headers = a.signed(1, b.name, body)
    assert (await a.send(1, b.name, body, headers))[0] == 202
    status, err = await a.send(1, b.name, body, headers)  # the same request again
    assert (status, err["error"]) == (401, "replay")
    await asyncio.sleep(0.002)
    status, err = await a.send(1, b.name, body)  # signed afresh: still one message per edge and round
    assert (status, err["error"]) == (409, "duplicate")
    await asyncio.sleep(0.002)
    other = a.body(1, value=9.0)
    status, err = await a.send(1, "phone-00003", other, a.signed(1, "phone-00003", other, key=PhoneKey()))
    assert (status, err["error"]) == (401, "bad_signature")
    status, err = await a.send(1, "phone-00003", other, a.auth)
    assert (status, err["error"]) == (401, "unsigned")
    status, err = await a.send(1, "phone-00003", other, {**a.signed(1, c.name, other)})  # signed for another recipient
    assert (status, err["error"]) == (401, "bad_signature")
    traffic = (await _status(client))["rounds"]["1"]
    assert traffic["messages"] == 1  # nothing refused was kept
    assert (await c.recv(1, a.name))[0] == 204 and (await b.recv(1, a.name))[0] == 200


async def test_phones_without_keys_or_outside_the_topology(make_server: MakeClient) -> None:
    client, _ = await _fleet(make_server)
    keyless = await Phone(client, "phone-00001x", None).enrol()
    status, err = await keyless.send(1, "phone-00002", keyless.body(1), keyless.auth)
    assert (status, err["error"]) == (401, "unsigned")
    stranger = await Phone(client, "visitor", PhoneKey()).enrol()
    status, err = await stranger.send(1, "phone-00000")
    assert (status, err["error"]) == (403, "not_in_topology")
    resp = await client.post("/v1/gossip/send?round=1&to=phone-00001", data=b"x")
    assert resp.status == 401


async def test_rounds(make_server: MakeClient) -> None:
    client, (a, b, c, d) = await _fleet(make_server)
    status, err = await a.send(2, b.name)  # round 1 has not begun
    assert (status, err["error"]) == (409, "wrong_round")
    assert (await a.send(1, b.name))[0] == 202
    assert (await b.send(1, a.name))[0] == 202
    assert (await a.recv(1, b.name))[0] == 200
    assert (await c.send(2, d.name))[0] == 202  # opens round 2: a's message to b was never fetched
    status, err = await b.send(1, c.name)
    assert (status, err["error"]) == (409, "wrong_round")
    status, _ = await b.recv(1, a.name)
    assert status == 409
    for bad in ("x", "\u00b2", "0", "-1", ""):  # a superscript two passes str.isdigit but is no round
        resp = await client.get(f"/v1/gossip/recv?round={bad}&from=phone-00000", headers=a.auth)
        assert resp.status == 400 and (await resp.json())["error"] == "bad_query", bad
    st = await _status(client)
    assert st["round"] == 2
    assert st["rounds"]["1"] == {"messages": 2, "delivered": 1, "undelivered": 1,
                                 "bytes_up": st["rounds"]["1"]["bytes_up"], "bytes_down": st["rounds"]["1"]["bytes_down"]}


async def test_bad_bodies(make_server: MakeClient) -> None:
    client, (a, b, _, _) = await _fleet(make_server)
    model_bytes = len(a.body(1))
    small, (s, t, _, _) = await _fleet(make_server, max_update_bytes=model_bytes - 1)
    status, err = await s.send(1, t.name)
    assert (status, err["error"]) == (413, "too_large")
    assert (await _status(small))["rounds"] == {}
    status, err = await a.send(1, b.name, b"not a wire message")
    assert status == 400
    status, err = await a.send(1, b.name, a.body(1, **{"from": "phone-00003"}))  # type: ignore[arg-type]  # claims another sender
    assert (status, err["error"]) == (400, "bad_meta")
    status, err = await a.send(1, b.name, a.body(2))  # meta says round 2, the request round 1
    assert (status, err["error"]) == (400, "bad_meta")
    wrong_shape = encode_message("update", {"from": a.name, "round": 1}, {"w": np.zeros(3, dtype=np.float32)})
    status, err = await a.send(1, b.name, wrong_shape)
    assert status == 400
    assert (await _status(client))["rounds"] == {}


@pytest.mark.parametrize("spec", ["matching"])
async def test_time_varying_edges(make_server: MakeClient, spec: str) -> None:
    client, phones = await _fleet(make_server, n=6, topology=spec, seed=4)
    topo = ServerConfig(model="mlp", topology=spec, gossip_phones=6, seed=4).gossip_topology()
    assert (await client.get("/v1/gossip/topology?round=1")).status == 401  # phones learn it, once enrolled
    for r in (1, 2):
        graph = await (await client.get(f"/v1/gossip/topology?round={r}", headers=phones[0].auth)).json()
        assert graph["phones"] == [p.name for p in phones] and graph["topology"] == spec
        assert {tuple(e) for e in graph["edges"]} == set(topo.edges(r))
        assert graph["keys"] == [p.key.public_b64() for p in phones if p.key is not None]
        for i, js in enumerate(topo.neighbours(r)):
            others = [k for k in range(6) if k != i and k not in js]
            assert (await phones[i].send(r, phones[others[0]].name))[0] == 403
            for j in js:
                await asyncio.sleep(0.002)
                assert (await phones[i].send(r, phones[j].name))[0] == 202


def test_a_bad_topology_stops_the_server_before_it_starts() -> None:
    with pytest.raises(ValueError, match="unknown topology 'star'"):
        make_app(ServerConfig(model="mlp", topology="star", gossip_phones=4))
    with pytest.raises(ValueError, match="at least 2 phones"):
        ServerConfig(model="mlp", topology="ring", gossip_phones=1)


def test_recipients_check_the_senders_own_signature() -> None:
    """What the relay forwards is checked end to end: a body, recipient or round other than the sender
    signed, or a sender whose key the phone was not given, is refused by the recipient itself."""
    import base64

    from fedfleet.device_runtime.emulated_device import PhoneClient
    from fedfleet.device_runtime.gossip import GossipPhone

    sender = PhoneKey()
    client = PhoneClient(None, "http://unused", "phone-00001", (np.zeros((1, 1, 8, 8)), np.zeros(1)), None,  # type: ignore[arg-type]
                         np.random.default_rng(0))
    phone = GossipPhone(client, "dpsgd", {"w": np.zeros(3, dtype=np.float32)})
    phone.peer_keys = {"phone-00000": base64.b64decode(sender.public_b64())}
    body = encode_message("update", {"from": "phone-00000", "round": 2}, {"w": np.ones(3, dtype=np.float32)})
    headers = sender.headers("phone-00000", 2, "gossip:phone-00001", body)
    assert phone.signed_by("phone-00000", 2, body, headers)
    assert not phone.signed_by("phone-00000", 2, body[:-1] + b"\x00", headers)  # altered on the way
    assert not phone.signed_by("phone-00000", 3, body, headers)  # another round
    assert not phone.signed_by("phone-00002", 2, body, headers)  # a sender whose key it was not given
    other = sender.headers("phone-00000", 2, "gossip:phone-00009", body)  # signed for another recipient
    assert not phone.signed_by("phone-00000", 2, body, other)
    assert not phone.signed_by("phone-00000", 2, body, {})
    forged = PhoneKey().headers("phone-00000", 2, "gossip:phone-00001", body)
    assert not phone.signed_by("phone-00000", 2, body, forged)


def test_the_relay_keeps_a_bounded_history(monkeypatch: pytest.MonkeyPatch) -> None:
    from fedfleet.server import relay as relay_module
    from fedfleet.server.security import NonceBook

    monkeypatch.setattr(relay_module, "TRAFFIC_ROUNDS", 5)
    relay = relay_module.Relay(ServerConfig(model="mlp", **RING4).gossip_topology(), NonceBook())
    for r in range(1, 21):
        relay.open(r)
        relay.of(r).messages += 1
        relay.boxes[("phone-00000", "phone-00001")] = (b"m", "", "", "phone-00001")
    assert sorted(relay.traffic) == [16, 17, 18, 19, 20] and len(relay.boxes) == 1
    assert relay.traffic[19].undelivered == 1
