"""Write the golden vectors of secure aggregation (protocol/FORMAT.md section 12).

Run once when the protocol changes on purpose: ``.venv/bin/python tests/golden/secagg/generate.py``.
tests/test_secagg_golden.py rebuilds every vector from its inputs and compares.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from fedfleet.protocol.secagg import SecAggPhone, crypto, group_params, unmask_sum
from fedfleet.protocol.secagg.coords import shared_coordinates
from fedfleet.protocol.secagg.framing import pack_sealed, pack_unmask
from fedfleet.protocol.secagg.graph import neighbours, ring_order
from fedfleet.protocol.secagg.integer import pack
from fedfleet.protocol.secagg.phone import mask_secret_key, pairwise_key, secret_seed
from fedfleet.protocol.secagg.rotation import rotation
from fedfleet.protocol.secagg.shamir import element_to_bytes

HERE = Path(__file__).parent
PRG_KEY = bytes(range(32))


def prg_vector() -> dict[str, Any]:
    words = crypto.prg_words(PRG_KEY, 4)
    return {
        "name": "prg_chacha20",
        "description": "ChaCha20 (RFC 8439), key 00..1f, nonce 0, counter 0: the first four uint64 words "
        "(little-endian) and those words mod 2**20.",
        "key_hex": PRG_KEY.hex(),
        "words": [str(int(w)) for w in words],
        "mask_bits": 20,
        "mask": [int(w) for w in crypto.mask(PRG_KEY, 4, 20)],
    }


def graph_vector() -> dict[str, Any]:
    seed = b"fedfleet graph"
    graph = neighbours(10, 4, seed)
    return {
        "name": "graph_10_phones_degree_4",
        "description": "Ring order of 10 phones by SHA-256(seed || index, 4 bytes big-endian), each joined "
        "to 2 on either side.",
        "size": 10,
        "degree": 4,
        "seed_hex": seed.hex(),
        "ring_order": ring_order(10, seed),
        "neighbours": {str(i): sorted(graph[i]) for i in sorted(graph)},
    }


def coords_vector() -> dict[str, Any]:
    seed, group = b"fedfleet coords", b"round/7/group/0"
    return {
        "name": "coords_50_keep_10",
        "description": "Shared random-k: indices 0..49 sorted by (PRG word, index), the PRG keyed by "
        "HKDF(seed, 'coordinates', group); the first 10, increasing.",
        "seed_hex": seed.hex(), "group": group.decode(), "full_dim": 50, "k": 10,
        "coordinates": shared_coordinates(seed, group, 50, 10).tolist(),
    }


def group_vector() -> dict[str, Any]:
    """Six phones, complete graph, t = 3: phone 6 drops after sharing keys, phone 5 after its
    masked upload. The server rebuilds 6's mask-key seed and the self-mask seeds of 1-5 from the
    shares of 1-4."""
    params = group_params("round/7/group/0", 6, 6, clip=1.0, threshold=0.6, modulus_bits=14, graph_seed=b"g")
    entropy = {i: bytes([i]) * 32 for i in range(1, 7)}
    pad = [0] * (params.rotated_dim - 6)  # the 6 coordinates rotate into 32
    values = {i: np.array([i, -i, 100 * i, -100 * i, 0, i * i - 7, *pad], dtype=np.int64) for i in range(1, 7)}
    phones = {i: SecAggPhone(params, i, entropy[i]) for i in range(1, 7)}
    roster = {i: p.advertise() for i, p in phones.items()}
    sealed = {i: p.share_keys(roster) for i, p in phones.items()}
    sharers, uploaders, responders = frozenset(range(1, 7)), frozenset(range(1, 6)), frozenset(range(1, 5))
    masked = {
        i: phones[i].masked_upload({j: out[i] for j, out in sealed.items() if i in out}, values[i])
        for i in sorted(uploaders)
    }
    dropped = sharers - uploaders
    responses = {i: phones[i].unmask(uploaders, dropped) for i in sorted(responders)}
    total = unmask_sum(params, roster, sharers, masked, responses)
    ctx = params.context
    return {
        "name": "group_6_phones",
        "description": group_vector.__doc__.split("\n\n")[0] if group_vector.__doc__ else "",
        "params": {
            "group": params.group, "clip": 1.0, "threshold": 0.6, "size": params.size, "dim": params.dim,
            "rotated_dim": params.rotated_dim, "degree": params.degree,
            "share_threshold": params.share_threshold, "min_survivors": params.min_survivors,
            "modulus_bits": params.modulus_bits, "graph_seed_hex": params.graph_seed.hex(),
        },
        "phones": {
            str(i): {
                "entropy_hex": entropy[i].hex(),
                "channel_public_hex": roster[i].channel.hex(),
                "mask_public_hex": roster[i].mask.hex(),
                "mask_key_seed_hex": element_to_bytes(secret_seed(entropy[i], "mask key seed", ctx)).hex(),
                "self_mask_seed_hex": element_to_bytes(secret_seed(entropy[i], "self mask seed", ctx)).hex(),
                "values": values[i].tolist(),
                "sealed_shares_hex": {str(j): sealed[i][j].hex() for j in sorted(sealed[i])},
                "shares_body_hex": pack_sealed(sealed[i]).hex(),
            }
            for i in range(1, 7)
        },
        "pairwise_keys_hex": {
            f"{i}-{j}": pairwise_key(mask_secret_key(secret_seed(entropy[i], "mask key seed", ctx), ctx), roster[j].mask, ctx).hex()
            for i in range(1, 7) for j in range(i + 1, 7)
        },
        "masked_hex": {str(i): pack(y, params.modulus_bits).hex() for i, y in masked.items()},
        "survivors": sorted(uploaders),
        "dropped": sorted(dropped),
        "responses": {
            str(i): {
                "seeds_hex": {str(j): f"{y:032x}" for j, y in sorted(r.seeds.items())},
                "keys_hex": {str(j): f"{y:032x}" for j, y in sorted(r.keys.items())},
                "body_hex": pack_unmask(r).hex(),
            }
            for i, r in responses.items()
        },
        "sum": total.tolist(),
    }


def rotation_vector() -> dict[str, Any]:
    seed, group = b"fedfleet rotation", b"round/7/group/0"
    r = rotation(seed, group, 90)
    x = np.random.default_rng(0).normal(0, 1, 90)
    return {
        "name": "rotation_90",
        "description": "The rotation of 90 coordinates: padded to 96, blocks of 64 and 32; signs from bit 0 of "
        "PRG(HKDF(seed, 'rotation signs', group)), order by (PRG(HKDF(seed, 'rotation order', group)) word, index); "
        "y = H_64 / 8 of u[0:64] and H_32 / sqrt(32) of u[64:96], u = (signs * pad(x))[order]. Floats as Python "
        "repr (round-trip).",
        "seed_hex": seed.hex(), "group": group.decode(), "dim": 90, "blocks": list(r.blocks),
        "rotated_dim": r.rotated_dim,
        "signs": [int(v) for v in r.signs], "order": r.order.tolist(),
        "x": [float(v) for v in x], "y": [float(v) for v in r.apply(x)],
    }


def packing_vector() -> dict[str, Any]:
    values = np.array([0, 1, 2, 3, 4, 31, 17, 9, 30], dtype=np.uint64)
    return {
        "name": "packing_5_bits",
        "description": "Nine values of 5 bits, packed little-endian: value i is bits [5i, 5i + 5) of the stream, "
        "least significant first; the last byte padded with zeros.",
        "bits": 5, "values": values.tolist(), "packed_hex": pack(values, 5).hex(),
    }


def vectors() -> list[dict[str, Any]]:
    return [prg_vector(), graph_vector(), coords_vector(), rotation_vector(), packing_vector(), group_vector()]


def main() -> None:
    for vector in vectors():
        (HERE / f"{vector['name']}.json").write_text(json.dumps(vector, indent=1) + "\n")


if __name__ == "__main__":
    main()
