"""One phone's side of SecAgg+ (Bell et al., 2020, after Bonawitz et al., 2017, "Practical
Secure Aggregation for Privacy-Preserving Machine Learning"), four steps, pure:

1. ``advertise``: two X25519 public keys, one for the share channel (c), one for masks (s).
2. ``share_keys``: Shamir shares of the mask-key seed (s_sk derives from it) and of the self-mask seed b,
   one sealed message per neighbour that advertised.
3. ``masked_upload``: y = x + PRG(b) + sum over neighbours j that shared keys of
   +PRG(s_ij) (own index < j) or -PRG(s_ij) (own index > j), mod 2**b.
4. ``unmask``: for each surviving neighbour the share of its self-mask seed, for each dropped
   neighbour the share of its mask-key seed; never both for one phone, and one answer per group.

Every secret derives from the phone's 32-byte ``entropy`` (``crypto.hkdf``). The two secrets
that are Shamir-shared are 127-bit field elements (``shamir.py``): the mask-key seed, from which
s_sk derives, and the self-mask seed, from which the self mask's PRG key derives.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

import numpy as np

from fedfleet.protocol.secagg import crypto, shamir
from fedfleet.protocol.secagg.errors import (
    BadShare,
    BelowThreshold,
    NotANeighbour,
    ShareRequestRefused,
    WrongStep,
)
from fedfleet.protocol.secagg.graph import neighbours_of
from fedfleet.protocol.secagg.integer import to_field
from fedfleet.protocol.secagg.params import GroupParams


@dataclass(frozen=True)
class PublicKeys:
    channel: bytes  # c_pk, 32 bytes
    mask: bytes  # s_pk, 32 bytes


@dataclass(frozen=True)
class HeldShare:
    """What phone i holds of neighbour j's secrets: f_key(i) and f_seed(i)."""

    key: int
    seed: int


@dataclass(frozen=True)
class UnmaskShares:
    seeds: dict[int, int]  # surviving neighbour -> share of its self-mask seed
    keys: dict[int, int]  # dropped neighbour -> share of its mask-key seed


def secret_seed(entropy: bytes, label: str, context: bytes) -> int:
    """A shared secret of the phone: HKDF(E, label, ctx, 16) as a big-endian integer mod p."""
    return int.from_bytes(crypto.hkdf(entropy, label, context, shamir.SHARE_BYTES), "big") % shamir.PRIME


def mask_secret_key(mask_seed: int, context: bytes) -> bytes:
    """s_sk, the X25519 secret key of the pairwise masks, from its 127-bit seed."""
    return crypto.hkdf(shamir.element_to_bytes(mask_seed), "mask key", context)


def self_mask_key(seed: int, context: bytes) -> bytes:
    """The PRG key of the self mask, from its 127-bit seed."""
    return crypto.hkdf(shamir.element_to_bytes(seed), "self mask", context)


def pairwise_key(own_mask_secret: bytes, peer_mask_public: bytes, context: bytes) -> bytes:
    return crypto.hkdf(crypto.agree(own_mask_secret, peer_mask_public), "pairwise mask", context)


SEALED_SHARE_BYTES = 2 * shamir.SHARE_BYTES + 16  # the two shares and the Poly1305 tag: 48


def share_plaintext(key_share: int, seed_share: int) -> bytes:
    return shamir.element_to_bytes(key_share) + shamir.element_to_bytes(seed_share)


def parse_share_plaintext(plain: bytes) -> HeldShare:
    if len(plain) != 2 * shamir.SHARE_BYTES:
        raise BadShare(f"a share message is {2 * shamir.SHARE_BYTES} bytes, got {len(plain)}")
    n = shamir.SHARE_BYTES
    return HeldShare(shamir.element_from_bytes(plain[:n]), shamir.element_from_bytes(plain[n:]))


def sync_group_name(round_number: int) -> str:
    """The name (and key-derivation context) of a sync round's group: the round's cohort."""
    return f"round/{round_number}/group/0"


def keys_for(entropy: bytes, context: bytes) -> PublicKeys:
    """The public keys a phone with ``entropy`` advertises in the group named ``context``
    (known before the group's other parameters are)."""
    mask_secret = mask_secret_key(secret_seed(entropy, "mask key seed", context), context)
    return PublicKeys(crypto.public_key(crypto.hkdf(entropy, "channel key", context)), crypto.public_key(mask_secret))


class SecAggPhone:
    """Phone ``index`` (1..n) of the group ``params``; one instance per group and round."""

    def __init__(self, params: GroupParams, index: int, entropy: bytes) -> None:
        if not 1 <= index <= params.size:
            raise ValueError(f"index must be in [1, {params.size}], got {index}")
        if len(entropy) != 32:
            raise ValueError("entropy must be 32 bytes")
        self.params, self.index = params, index
        ctx = params.context
        self._channel_secret = crypto.hkdf(entropy, "channel key", ctx)
        self._secrets = {label: secret_seed(entropy, label, ctx) for label in ("mask key seed", "self mask seed")}
        self._mask_secret = mask_secret_key(self._secrets["mask key seed"], ctx)
        self._self_mask = self_mask_key(self._secrets["self mask seed"], ctx)
        t = params.share_threshold
        self._coefficients = {
            label: [
                int.from_bytes(crypto.hkdf(entropy, f"shamir {label} {m}", ctx), "big") % shamir.PRIME
                for m in range(1, t)
            ]
            for label in self._secrets
        }
        self.neighbours = neighbours_of(params.size, params.degree, params.graph_seed, index)
        self.keys = PublicKeys(crypto.public_key(self._channel_secret), crypto.public_key(self._mask_secret))
        self._roster: dict[int, PublicKeys] = {}
        self._held: dict[int, HeldShare] | None = None
        self._answered: tuple[frozenset[int], frozenset[int]] | None = None

    def advertise(self) -> PublicKeys:
        return self.keys

    def share_keys(self, roster: Mapping[int, PublicKeys]) -> dict[int, bytes]:
        """``roster``: the advertised keys of (at least) this phone's neighbours that
        advertised. Returns recipient -> sealed (share of the mask-key seed || share of the
        self-mask seed)."""
        if self._roster:
            raise WrongStep("keys already shared")
        if roster.get(self.index) != self.keys:
            raise BadShare("the roster does not carry this phone's own keys")
        self._roster = {j: k for j, k in roster.items() if j in self.neighbours}
        xs = sorted(self._roster)
        key_shares, seed_shares = (shamir.split(self._secrets[label], xs, self._coefficients[label])
                                   for label in ("mask key seed", "self mask seed"))
        ctx = self.params.context
        return {
            j: crypto.seal(self._channel_secret, self._roster[j].channel, ctx, self.index, j, share_plaintext(k, s))
            for j, k, s in zip(xs, key_shares, seed_shares, strict=True)
        }

    def masked_upload(self, incoming: Mapping[int, bytes], values: np.ndarray) -> np.ndarray:
        """``incoming``: sender -> sealed share, from every neighbour that shared keys
        (and only those: they are the neighbours whose pairwise masks go in).
        ``values``: this phone's integer update (D,). Returns y (D,) uint64 mod 2**b."""
        if self._held is not None:
            raise WrongStep("masked update already made")
        if not self._roster:
            raise WrongStep("keys not shared yet")
        stray = set(incoming) - set(self._roster)
        if stray:
            raise NotANeighbour(f"shares from phones {sorted(stray)} outside this phone's advertised neighbours")
        p, ctx = self.params, self.params.context
        values = np.asarray(values, dtype=np.int64)
        if values.shape != (p.rotated_dim,) or np.abs(values).max(initial=0) > p.value_bound:
            raise ValueError(f"values must be ({p.rotated_dim},) integers within +-{p.value_bound}: the sum could wrap")
        held = {
            j: parse_share_plaintext(
                crypto.open_sealed(self._channel_secret, self._roster[j].channel, ctx, j, self.index, sealed)
            )
            for j, sealed in sorted(incoming.items())
        }
        bits, mod = p.modulus_bits, np.uint64((1 << p.modulus_bits) - 1) if p.modulus_bits < 64 else None
        y = to_field(values, bits) + crypto.mask(self._self_mask, p.rotated_dim, bits)
        for j in sorted(held):
            m = crypto.mask(pairwise_key(self._mask_secret, self._roster[j].mask, ctx), p.rotated_dim, bits)
            y = y + m if self.index < j else y - m  # uint64 arithmetic wraps mod 2**64
        if mod is not None:
            y &= mod
        self._held = held
        return y

    def unmask(self, survivors: Collection[int], dropped: Collection[int]) -> UnmaskShares:
        """Shares the server needs to unmask the sum of ``survivors``' masked updates.
        Refuses any request that could isolate one phone's update."""
        if self._held is None:
            raise WrongStep("no masked update made")
        alive, gone = frozenset(survivors), frozenset(dropped)
        if alive & gone:
            raise ShareRequestRefused(f"phones {sorted(alive & gone)} are both survivors and dropped")
        if self.index not in alive:
            raise ShareRequestRefused("this phone uploaded but is listed as not surviving")
        if self._answered is not None and self._answered != (alive, gone):
            raise ShareRequestRefused("shares already given for a different set of survivors")
        if len(alive) < self.params.min_survivors:
            raise BelowThreshold(f"{len(alive)} survivors, fewer than {self.params.min_survivors}")
        self._answered = (alive, gone)
        return UnmaskShares(
            seeds={j: h.seed for j, h in self._held.items() if j in alive},
            keys={j: h.key for j, h in self._held.items() if j in gone},
        )
