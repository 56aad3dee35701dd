"""The secure-aggregation golden vectors (tests/golden/secagg, FORMAT.md section 12),
rebuilt from their inputs by the Python implementation, byte for byte."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from fedfleet.protocol.secagg import SecAggPhone, UnmaskShares, crypto, group_params, unmask_sum
from fedfleet.protocol.secagg.framing import pack_sealed, pack_unmask, unpack_sealed, unpack_unmask
from fedfleet.protocol.secagg.graph import neighbours, ring_order
from fedfleet.protocol.secagg.integer import pack, unpack
from fedfleet.protocol.secagg.phone import mask_secret_key, pairwise_key, secret_seed
from fedfleet.protocol.secagg.shamir import element_to_bytes

GOLDEN = Path(__file__).parent / "golden" / "secagg"


def _load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((GOLDEN / f"{name}.json").read_text())
    return data


def test_prg_is_the_chacha20_keystream() -> None:
    v = _load("prg_chacha20")
    key = bytes.fromhex(v["key_hex"])
    assert [str(int(w)) for w in crypto.prg_words(key, 4)] == v["words"]
    assert crypto.mask(key, 4, v["mask_bits"]).tolist() == v["mask"]
    # libsodium's ChaCha20-Poly1305 (IETF) encrypts with the same keystream from block 1 on
    from nacl.bindings import crypto_aead_chacha20poly1305_ietf_encrypt

    block1 = crypto_aead_chacha20poly1305_ietf_encrypt(bytes(64), None, bytes(12), key)[:64]
    assert crypto.prg_words(key, 16)[8:].astype("<u8").tobytes() == block1


def test_neighbour_graph() -> None:
    v = _load("graph_10_phones_degree_4")
    seed = bytes.fromhex(v["seed_hex"])
    assert ring_order(v["size"], seed) == v["ring_order"]
    graph = neighbours(v["size"], v["degree"], seed)
    assert {str(i): sorted(n) for i, n in graph.items()} == v["neighbours"]


def test_shared_coordinates() -> None:
    from fedfleet.protocol.secagg.coords import shared_coordinates

    v = _load("coords_50_keep_10")
    got = shared_coordinates(bytes.fromhex(v["seed_hex"]), v["group"].encode(), v["full_dim"], v["k"])
    assert got.tolist() == v["coordinates"]


def test_rotation() -> None:
    from fedfleet.protocol.secagg.rotation import rotation

    v = _load("rotation_90")
    r = rotation(bytes.fromhex(v["seed_hex"]), v["group"].encode(), v["dim"])
    assert (list(r.blocks), r.rotated_dim) == (v["blocks"], v["rotated_dim"]) == ([64, 32], 96)
    assert r.signs.astype(int).tolist() == v["signs"] and r.order.tolist() == v["order"]
    y = r.apply(np.array(v["x"]))
    assert y.tolist() == v["y"]  # the same float operations in the same order: bit for bit
    np.testing.assert_allclose(r.invert(y), v["x"], rtol=0, atol=1e-12)


def test_packing() -> None:
    v = _load("packing_5_bits")
    values = np.array(v["values"], dtype=np.uint64)
    assert pack(values, v["bits"]).hex() == v["packed_hex"]
    assert unpack(bytes.fromhex(v["packed_hex"]), len(values), v["bits"]).tolist() == v["values"]


def test_group_of_six_step_by_step() -> None:
    v = _load("group_6_phones")
    p = v["params"]
    params = group_params(
        p["group"], p["size"], p["dim"], clip=p["clip"], threshold=p["threshold"], modulus_bits=p["modulus_bits"],
        graph_seed=bytes.fromhex(p["graph_seed_hex"]),
    )
    assert (params.degree, params.share_threshold, params.min_survivors, params.modulus_bits, params.rotated_dim) == (
        p["degree"], p["share_threshold"], p["min_survivors"], p["modulus_bits"], p["rotated_dim"]
    )
    spec = {int(i): ph for i, ph in v["phones"].items()}
    phones = {i: SecAggPhone(params, i, bytes.fromhex(ph["entropy_hex"])) for i, ph in spec.items()}
    roster = {i: ph.advertise() for i, ph in phones.items()}
    for i, ph in spec.items():
        assert roster[i].channel.hex() == ph["channel_public_hex"]
        assert roster[i].mask.hex() == ph["mask_public_hex"]
    ctx = params.context
    for ph in spec.values():  # the shared secrets are 16-byte field elements
        entropy = bytes.fromhex(ph["entropy_hex"])
        assert element_to_bytes(secret_seed(entropy, "mask key seed", ctx)).hex() == ph["mask_key_seed_hex"]
        assert element_to_bytes(secret_seed(entropy, "self mask seed", ctx)).hex() == ph["self_mask_seed_hex"]
    for key, expected in v["pairwise_keys_hex"].items():
        i, j = map(int, key.split("-"))
        secret = mask_secret_key(int(spec[i]["mask_key_seed_hex"], 16), ctx)
        assert pairwise_key(secret, roster[j].mask, ctx).hex() == expected
    sealed = {i: ph.share_keys(roster) for i, ph in phones.items()}
    for i, ph in spec.items():
        assert {str(j): s.hex() for j, s in sealed[i].items()} == ph["sealed_shares_hex"]
        assert {len(s) for s in sealed[i].values()} == {48}  # two 16-byte shares and the 16-byte tag
        assert pack_sealed(sealed[i]).hex() == ph["shares_body_hex"]
        assert unpack_sealed(bytes.fromhex(ph["shares_body_hex"]), list(sealed[i])) == sealed[i]
    survivors, dropped = set(v["survivors"]), set(v["dropped"])
    masked = {}
    for i in sorted(survivors):
        incoming = {j: out[i] for j, out in sealed.items() if i in out}
        y = phones[i].masked_upload(incoming, np.array(spec[i]["values"], dtype=np.int64))
        assert pack(y, params.modulus_bits).hex() == v["masked_hex"][str(i)]
        masked[i] = unpack(bytes.fromhex(v["masked_hex"][str(i)]), params.rotated_dim, params.modulus_bits)
    responses = {}
    for key, expected in v["responses"].items():
        shares = phones[int(key)].unmask(survivors, dropped)
        assert {str(j): f"{y:032x}" for j, y in shares.seeds.items()} == expected["seeds_hex"]
        assert {str(j): f"{y:032x}" for j, y in shares.keys.items()} == expected["keys_hex"]
        assert pack_unmask(shares).hex() == expected["body_hex"]
        senders = [j for j, out in sealed.items() if int(key) in out]
        assert unpack_unmask(bytes.fromhex(expected["body_hex"]), senders, survivors) == shares
        responses[int(key)] = UnmaskShares(
            {int(j): int(h, 16) for j, h in expected["seeds_hex"].items()},
            {int(j): int(h, 16) for j, h in expected["keys_hex"].items()},
        )
    total = unmask_sum(params, roster, frozenset(phones), masked, responses)
    assert total.tolist() == v["sum"] == np.sum([spec[i]["values"] for i in survivors], axis=0).tolist()
