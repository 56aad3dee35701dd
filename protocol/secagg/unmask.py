"""The server's last step, pure: from the survivors' masked updates and the shares the
responders sent, rebuild each survivor's self-mask seed and each dropped phone's mask-key seed,
strip every mask, and return the sum of the survivors' integer updates.

Rebuilding needs ``share_threshold`` shares per secret; fewer for any phone, or fewer than
``min_survivors`` survivors, raises ``BelowThreshold`` before anything is computed, so an
aborted group reveals nothing (no mask is ever removed from a partial set).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedfleet.protocol.secagg import crypto, shamir
from fedfleet.protocol.secagg.errors import BadShare, BelowThreshold
from fedfleet.protocol.secagg.graph import neighbours
from fedfleet.protocol.secagg.integer import from_field
from fedfleet.protocol.secagg.params import GroupParams
from fedfleet.protocol.secagg.phone import (
    PublicKeys,
    UnmaskShares,
    mask_secret_key,
    pairwise_key,
    self_mask_key,
)


def _rebuild(params: GroupParams, about: int, held: Mapping[int, int], what: str) -> int:
    if len(held) < params.share_threshold:
        raise BelowThreshold(
            f"{len(held)} shares of phone {about}'s {what}, fewer than the threshold {params.share_threshold}"
        )
    return shamir.combine(sorted(held.items()), params.share_threshold)


def collect(responses: Mapping[int, UnmaskShares]) -> tuple[dict[int, dict[int, int]], dict[int, dict[int, int]]]:
    """responder -> shares  =>  (about -> {responder: seed share}, about -> {responder: key share})."""
    seeds: dict[int, dict[int, int]] = {}
    keys: dict[int, dict[int, int]] = {}
    for responder, shares in responses.items():
        for about, y in shares.seeds.items():
            seeds.setdefault(about, {})[responder] = y
        for about, y in shares.keys.items():
            keys.setdefault(about, {})[responder] = y
    return seeds, keys


def unmask_sum(
    params: GroupParams,
    keys: Mapping[int, PublicKeys],
    sharers: frozenset[int],
    masked: Mapping[int, np.ndarray],
    responses: Mapping[int, UnmaskShares],
) -> np.ndarray:
    """The signed sum (D,) int64 of the integer updates of the phones in ``masked``.

    ``keys``: advertised keys; ``sharers``: the phones that shared keys (U2);
    ``masked``: survivor -> y (U3, a subset of U2); ``responses``: responder -> its
    shares (U4, a subset of U3)."""
    survivors = frozenset(masked)
    dropped = sharers - survivors
    if len(survivors) < params.min_survivors:
        raise BelowThreshold(f"{len(survivors)} masked uploads, fewer than {params.min_survivors}")
    if len(responses) < params.share_threshold:
        raise BelowThreshold(f"{len(responses)} phones sent shares, fewer than {params.share_threshold}")
    seed_shares, key_shares = collect(responses)
    graph = neighbours(params.size, params.degree, params.graph_seed)
    # rebuild everything first: a missing share aborts before any mask is removed
    seeds = {j: _rebuild(params, j, seed_shares.get(j, {}), "self-mask seed") for j in sorted(survivors)}
    ctx = params.context
    secrets = {j: mask_secret_key(_rebuild(params, j, key_shares.get(j, {}), "mask key seed"), ctx)
               for j in sorted(dropped)}
    for j, secret in secrets.items():
        if crypto.public_key(secret) != keys[j].mask:
            raise BadShare(f"the shares of phone {j}'s mask key rebuild a key it did not advertise")
    bits = params.modulus_bits
    total = np.zeros(params.rotated_dim, dtype=np.uint64)
    for i in sorted(survivors):
        total += masked[i]
        total -= crypto.mask(self_mask_key(seeds[i], ctx), params.rotated_dim, bits)
    for j, secret in secrets.items():
        for i in sorted(graph[j] & survivors):
            m = crypto.mask(pairwise_key(secret, keys[i].mask, ctx), params.rotated_dim, bits)
            # i added +m if i < j, -m if i > j: take it back out
            if i < j:
                total -= m
            else:
                total += m
    if bits < 64:
        total &= np.uint64((1 << bits) - 1)
    return from_field(total, bits)
