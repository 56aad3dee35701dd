"""Gossip messages carry their JSON header zlib-compressed (device_runtime/gossip_frame.py): the
same tensors and meta in fewer bytes; the relay takes them, and refuses a broken compressed header."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest

from fedfleet.device_runtime.gossip_frame import compact
from fedfleet.protocol import EncoderConfig, UpdateEncoder, decode_message, encode_message
from fedfleet.protocol.signing import PhoneKey
from fedfleet.protocol.wire import FLAG_ZLIB_HEADER, frame
from tests.conftest import MakeClient, zero_delta
from tests.test_gossip_relay import _fleet, _status

CNN = {"conv1.weight": (16, 1, 3, 3), "conv1.bias": (16,), "conv2.weight": (32, 16, 3, 3), "conv2.bias": (32,),
       "fc.weight": (10, 1568), "fc.bias": (10,)}


def _choco_message(rng: np.random.Generator) -> bytes:
    """A CHOCO-SGD step of the CNN as its encoder writes it: 1% top-k, 8-bit values, varint indices."""
    encoder = UpdateEncoder(EncoderConfig(sparsify="topk", density=0.01, quant_bits=8), np.random.default_rng(1))
    q = {name: rng.normal(0, 0.05, shape) for name, shape in CNN.items()}
    return encoder.encode(q, {"algorithm": "choco", "from": "phone-00003", "round": 17})


def test_a_compacted_message_decodes_to_the_same_message_in_under_two_thirds_the_bytes() -> None:
    body = _choco_message(np.random.default_rng(0))
    small = compact(body)
    flags = struct.unpack_from("<H", small, 6)[0]
    assert flags == FLAG_ZLIB_HEADER  # the header only: the payload stays as the codec wrote it
    assert len(small) < 0.6 * len(body)  # the header JSON was most of a 1% top-k message
    before, after = decode_message(body), decode_message(small)
    assert after.meta == before.meta and after.tensors.keys() == before.tensors.keys()
    for name in before.tensors:
        np.testing.assert_array_equal(after.tensors[name], before.tensors[name])
    assert compact(small) == small  # already compacted: left as it is


def test_compact_refuses_what_is_not_a_wire_message() -> None:
    body = _choco_message(np.random.default_rng(0))
    with pytest.raises(ValueError, match="magic"):
        compact(b"XXXX" + body[4:])
    with pytest.raises(ValueError, match="its fields say"):
        compact(body + b"\0")
    with pytest.raises(ValueError, match="bytes"):
        compact(body[:10])


def test_the_gossip_phone_sends_compacted_messages() -> None:
    from fedfleet.device_runtime.emulated_device import PhoneClient
    from fedfleet.device_runtime.gossip import GossipPhone

    rng = np.random.default_rng(0)
    model = {name: rng.normal(0, 0.1, shape).astype(np.float32) for name, shape in CNN.items()}
    client = PhoneClient(None, "http://unused", "phone-00001", (np.zeros((1, 1, 8, 8)), np.zeros(1)), None,  # type: ignore[arg-type]
                         np.random.default_rng(0), key=PhoneKey())
    encoder = UpdateEncoder(EncoderConfig(sparsify="topk", density=0.01, quant_bits=8), np.random.default_rng(1))
    phone = GossipPhone(client, "choco", model, encoder=encoder)
    body = phone.message(1)
    assert struct.unpack_from("<H", body, 6)[0] & FLAG_ZLIB_HEADER
    for name in model:  # x_hat moved by exactly what the neighbours decode
        np.testing.assert_array_equal(phone.hat[name], decode_message(body).tensors[name])
    plain = GossipPhone(client, "dpsgd", model).message(1)  # dense float32 too: the header shrinks
    assert struct.unpack_from("<H", plain, 6)[0] == FLAG_ZLIB_HEADER


async def test_the_relay_forwards_a_compacted_message_and_refuses_a_broken_one(make_server: MakeClient) -> None:
    client, (a, b, _, _) = await _fleet(make_server)
    meta = {"algorithm": "dpsgd", "from": a.name, "round": 1}
    body = compact(encode_message("update", meta, zero_delta(a.task, 0.5)))
    assert struct.unpack_from("<H", body, 6)[0] == FLAG_ZLIB_HEADER
    assert await a.send(1, b.name, body) == (202, {"queued": True, "round": 1})
    status, got = await b.recv(1, a.name)
    assert status == 200 and got == body

    header_len = struct.unpack_from("<I", body, 8)[0]
    header = zlib.decompress(body[12:12 + header_len])
    payload = body[16 + header_len:-4]
    for broken in (zlib.compress(header)[:-3], zlib.compress(header) + b"extra", b"\x78\x9c" + b"\0" * 20):
        bad = frame(broken, payload, flags=FLAG_ZLIB_HEADER)  # a valid CRC over a header that does not inflate
        status, err = await a.send(1, "phone-00003", bad)
        assert (status, err["error"]) == (400, "malformed"), err
    traffic = (await _status(client))["rounds"]["1"]
    assert traffic["messages"] == 1  # nothing refused was kept
