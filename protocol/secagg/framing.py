"""The bodies of the messages a phone uploads besides its masked update (FORMAT.md 12.5),
binary and without addresses: both ends know whom each share is for from the group's graph and
its inbox.

- advertise: c_pk || s_pk, 64 bytes;
- share keys: the sealed share for each neighbour, neighbours in increasing index order,
  48 bytes each (``phone.SEALED_SHARE_BYTES``);
- unmask: one 16-byte share (a field element, big-endian) for each neighbour whose sealed share
  the phone received, in increasing index order: of its self-mask seed if it survived, of its
  mask-key seed if it dropped.

Pure: bytes in, bytes out; a body of the wrong length or a share outside the field is
``BadShare``.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

from fedfleet.protocol.secagg import shamir
from fedfleet.protocol.secagg.crypto import KEY_BYTES
from fedfleet.protocol.secagg.errors import BadShare
from fedfleet.protocol.secagg.phone import SEALED_SHARE_BYTES, PublicKeys, UnmaskShares


def pack_keys(keys: PublicKeys) -> bytes:
    return keys.channel + keys.mask


def unpack_keys(body: bytes) -> PublicKeys:
    if len(body) != 2 * KEY_BYTES:
        raise BadShare(f"an advertisement is two {KEY_BYTES}-byte public keys, {2 * KEY_BYTES} bytes, got {len(body)}")
    return PublicKeys(body[:KEY_BYTES], body[KEY_BYTES:])


def pack_sealed(sealed: Mapping[int, bytes]) -> bytes:
    """recipient -> sealed share  =>  the shares in increasing recipient order."""
    return b"".join(sealed[j] for j in sorted(sealed))


def unpack_sealed(body: bytes, recipients: Sequence[int]) -> dict[int, bytes]:
    """The body of a phone whose neighbours are ``recipients`` (any order) => recipient -> sealed."""
    order = sorted(recipients)
    if len(body) != SEALED_SHARE_BYTES * len(order):
        raise BadShare(f"the sealed shares for {len(order)} neighbours are {SEALED_SHARE_BYTES * len(order)} bytes, "
                       f"got {len(body)}")
    return {j: body[SEALED_SHARE_BYTES * k : SEALED_SHARE_BYTES * (k + 1)] for k, j in enumerate(order)}


def pack_unmask(shares: UnmaskShares) -> bytes:
    """The phone's answer: seeds and keys together, in increasing neighbour order."""
    merged = {**shares.seeds, **shares.keys}
    return b"".join(shamir.element_to_bytes(merged[j]) for j in sorted(merged))


def unpack_unmask(body: bytes, senders: Sequence[int], survivors: Collection[int]) -> UnmaskShares:
    """The answer of a phone that received sealed shares from ``senders`` (any order); a sender
    in ``survivors`` gets a seed share, any other a key share."""
    order, n = sorted(senders), shamir.SHARE_BYTES
    if len(body) != n * len(order):
        raise BadShare(f"the unmask shares for {len(order)} neighbours are {n * len(order)} bytes, got {len(body)}")
    values = {j: shamir.element_from_bytes(body[n * k : n * (k + 1)]) for k, j in enumerate(order)}
    alive = set(survivors)
    return UnmaskShares({j: y for j, y in values.items() if j in alive},
                        {j: y for j, y in values.items() if j not in alive})
