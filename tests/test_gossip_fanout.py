"""A phone's message to all its neighbours is uploaded once and fanned out by the relay
(``POST /v1/gossip/post``), and the ring's edges taken as alternating matchings (``ring-matchings``)."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from fedfleet.protocol import encode_message
from fedfleet.protocol.signing import PhoneKey
from fedfleet.protocol.topology import EVERY_NEIGHBOUR, TO_HEADER, parse_topology, ring_edges, ring_matchings
from tests.conftest import MakeClient
from tests.test_gossip_relay import Phone, _fleet, _status


async def _post(phone: Phone, round_: int, body: bytes, to: str = EVERY_NEIGHBOUR) -> tuple[int, dict[str, object]]:
    headers = phone.signed(round_, to, body)
    resp = await phone.client.post(f"/v1/gossip/post?round={round_}", data=body, headers=headers)
    return resp.status, await resp.json()


async def test_a_posted_message_goes_up_once_and_to_every_neighbour(make_server: MakeClient) -> None:
    client, (a, b, c, d) = await _fleet(make_server)
    body = a.body(1)
    assert await _post(a, 1, body) == (202, {"queued": True, "round": 1, "recipients": 2})
    for neighbour in (b, d):  # phone-00000's neighbours on a ring of 4
        resp = await neighbour.client.get(f"/v1/gossip/recv?round=1&from={a.name}", headers=neighbour.auth)
        assert resp.status == 200 and await resp.read() == body and resp.headers[TO_HEADER] == EVERY_NEIGHBOUR
    assert await c.recv(1, a.name) == (204, b"")  # not a neighbour: nothing was left for it
    traffic = (await _status(client))["rounds"]["1"]
    assert traffic["messages"] == 2 and traffic["delivered"] == 2
    assert traffic["bytes_up"] == len(body)  # one upload, two deliveries
    assert 2 * len(body) < traffic["bytes_down"] < 2 * len(body) + 200

    status, err = await _post(a, 1, body)
    assert status == 409 and err["error"] == "duplicate"
    status, err = await a.send(1, b.name)  # b already has a's message of the round
    assert status == 409 and err["error"] == "duplicate"
    status, err = await _post(b, 1, b.body(1), to=a.name)  # signed for one recipient, posted to all
    assert status == 401 and err["error"] == "bad_signature"


def test_recipients_take_a_message_signed_for_every_neighbour() -> None:
    from fedfleet.device_runtime.emulated_device import PhoneClient
    from fedfleet.device_runtime.gossip import GossipPhone

    sender = PhoneKey()
    client = PhoneClient(None, "http://unused", "phone-00001", (np.zeros((1, 1, 8, 8)), np.zeros(1)), None,  # type: ignore[arg-type]
                         np.random.default_rng(0), key=PhoneKey())
    phone = GossipPhone(client, "dpsgd", {"w": np.zeros(3, dtype=np.float32)})
    phone.peer_keys = {"phone-00000": base64.b64decode(sender.public_b64())}
    body = encode_message("update", {"from": "phone-00000", "round": 2}, {"w": np.ones(3, dtype=np.float32)})
    everyone = {**sender.headers("phone-00000", 2, f"gossip:{EVERY_NEIGHBOUR}", body), TO_HEADER: EVERY_NEIGHBOUR}
    assert phone.signed_by("phone-00000", 2, body, everyone)
    assert not phone.signed_by("phone-00000", 2, body, {**everyone, TO_HEADER: "phone-00001"})
    aimed = {**sender.headers("phone-00000", 2, "gossip:phone-00007", body), TO_HEADER: "phone-00007"}
    assert not phone.signed_by("phone-00000", 2, body, aimed)  # signed for another phone, said so by the relay


@pytest.mark.parametrize("n", [2, 3, 4, 5, 8, 9, 50])
def test_ring_matchings_cover_the_ring_one_neighbour_at_a_time(n: int) -> None:
    cycle = ring_matchings(n)
    assert len(cycle) == (1 if n == 2 else 2 + n % 2)
    assert frozenset().union(*cycle) == ring_edges(n)
    topo = parse_topology("ring-matchings", [f"p{i}" for i in range(n)])
    for r in range(1, 2 * len(cycle) + 1):
        assert topo.edges(r) == cycle[(r - 1) % len(cycle)] == topo.edges(r + len(cycle))
        assert max(len(nb) for nb in topo.neighbours(r)) == 1  # a matching: each phone one neighbour at most
        w = topo.weights(r)
        np.testing.assert_allclose(w, w.T)
        np.testing.assert_allclose(w.sum(axis=1), 1.0)
        assert all(w[i, j] == 0.5 for i, j in topo.edges(r))  # each pair averages exactly


def test_dpsgd_sends_its_model_through_the_codecs_quantization() -> None:
    """D-PSGD with --quant-bits 8: the message is the model quantized (about a quarter of its float32
    bytes, each value within a quantization step), the phone's own model untouched; sparsifying a
    whole model is refused."""
    from fedfleet.device_runtime.emulated_device import PhoneClient
    from fedfleet.device_runtime.gossip import GossipPhone, check_codec
    from fedfleet.protocol import EncoderConfig, UpdateEncoder, decode_message

    rng = np.random.default_rng(0)
    model = {"w": rng.normal(0, 0.1, (64, 32)).astype(np.float32), "b": rng.normal(0, 0.1, 32).astype(np.float32)}
    client = PhoneClient(None, "http://unused", "phone-00001", (np.zeros((1, 1, 8, 8)), np.zeros(1)), None,  # type: ignore[arg-type]
                         np.random.default_rng(0), key=PhoneKey())
    plain = GossipPhone(client, "dpsgd", model).message(1)
    encoder = UpdateEncoder(EncoderConfig.from_mapping({"quant_bits": 8}), np.random.default_rng(1))
    phone = GossipPhone(client, "dpsgd", model, encoder=encoder)
    body = phone.message(1)
    assert len(body) < len(plain) / 3
    got = decode_message(body).tensors
    for name, value in model.items():
        step = 2 * np.abs(value).max() / 255
        assert np.abs(got[name] - value).max() <= step + 1e-7
        np.testing.assert_array_equal(phone.x[name], value)
    check_codec("dpsgd", {"quant_bits": 4, "compress": True})
    with pytest.raises(ValueError, match="quantization and zlib only"):
        check_codec("dpsgd", {"sparsify": "topk", "density": 0.1})
    with pytest.raises(ValueError, match="admm sends whole float32 models"):
        check_codec("admm", {"quant_bits": 8})
