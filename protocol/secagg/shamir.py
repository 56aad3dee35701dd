"""Shamir secret sharing (Shamir, 1979, "How to Share a Secret") over the prime field GF(p),
p = 2**127 - 1 (a Mersenne prime). The secrets are field elements themselves, 127-bit seeds
from which the phone's mask key and self-mask key derive (``phone.py``), so a share is 16 bytes;
X25519's own security is about 2**126, so a 127-bit seed is not the weaker link. A secret s
becomes the points (x, f(x)) of a random polynomial f of degree t - 1 with f(0) = s; any t of
them give s back by Lagrange interpolation at 0, fewer reveal nothing.

Pure integer arithmetic; the random coefficients come from the caller (derived from the
phone's entropy in ``keys.py``), so a fixed entropy gives fixed shares (golden vectors).
"""

from __future__ import annotations

from collections.abc import Sequence

from fedfleet.protocol.secagg.errors import BadShare

PRIME = (1 << 127) - 1
SHARE_BYTES = 16  # a field element (a share or a secret), big-endian


def split(secret: int, xs: Sequence[int], coefficients: Sequence[int]) -> list[int]:
    """f(x) for each x in ``xs`` (distinct, in [1, p)), f(0) = secret (a field element), f's
    other coefficients ``coefficients`` (t - 1 field elements, lowest degree first)."""
    if not 0 <= secret < PRIME:
        raise ValueError("the secret must be a field element")
    coeffs = [secret, *coefficients]
    out = []
    for x in xs:
        y = 0
        for c in reversed(coeffs):  # Horner
            y = (y * x + c) % PRIME
        out.append(y)
    return out


def _lagrange_at(points: Sequence[tuple[int, int]], at: int) -> int:
    """f(at) from the points of f: sum_i y_i * num_i / den_i, with one modular inversion for
    all the den_i (prefix products, Montgomery's trick) instead of one each."""
    nums, dens = [], []
    for i, (xi, _) in enumerate(points):
        num, den = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                num = num * (at - xj) % PRIME
                den = den * (xi - xj) % PRIME
        nums.append(num)
        dens.append(den)
    prefix = [1]
    for den in dens:
        prefix.append(prefix[-1] * den % PRIME)
    inverse = pow(prefix[-1], -1, PRIME)  # 1 / (den_0 ... den_{m-1})
    total = 0
    for i in range(len(points) - 1, -1, -1):
        inv_i = inverse * prefix[i] % PRIME  # 1 / den_i
        inverse = inverse * dens[i] % PRIME  # 1 / (den_0 ... den_{i-1})
        total = (total + points[i][1] * nums[i] * inv_i) % PRIME
    return total


def combine(points: Sequence[tuple[int, int]], threshold: int) -> int:
    """The secret from at least ``threshold`` points (x, f(x)). With more, the first point
    beyond ``threshold`` must lie on the polynomial of the others, else ``BadShare``: a wrong
    share among the first ``threshold`` moves the polynomial off it (a wrong share beyond
    them changes nothing)."""
    if len({x for x, _ in points}) != len(points):
        raise BadShare("two shares at the same x")
    if len(points) < threshold:
        raise ValueError(f"need {threshold} shares, got {len(points)}")
    basis = list(points[:threshold])
    if len(points) > threshold:
        x, y = points[threshold]
        if _lagrange_at(basis, x) != y:
            raise BadShare(f"the share at x={x} is not on the polynomial of the others")
    return _lagrange_at(basis, 0)


def element_to_bytes(y: int) -> bytes:
    return y.to_bytes(SHARE_BYTES, "big")


def element_from_bytes(data: bytes) -> int:
    if len(data) != SHARE_BYTES:
        raise BadShare(f"a share is {SHARE_BYTES} bytes, got {len(data)}")
    y = int.from_bytes(data, "big")
    if y >= PRIME:
        raise BadShare("share is not a field element")
    return y
