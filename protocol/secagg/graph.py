"""The neighbour graph of SecAgg+ (Bell et al., 2020, "Secure Single-Server Aggregation with
(Poly)Logarithmic Overhead", section 3.1): a random k-regular Harary graph. Phones sit on
a ring in an order drawn from a seed and each is joined to its k/2 nearest on either side,
so each phone shares keys and masks with k others instead of all n - 1.

The order is portable: phones (numbered 1..n) sorted by SHA-256(seed || index as 4 bytes
big-endian), ties broken by index. Pure.
"""

from __future__ import annotations

import hashlib
import math


def default_degree(size: int) -> int:
    """About 2 * log2(n), even, at most n - 1 (then every phone neighbours every other)."""
    if size <= 1:
        return 0
    k = 2 * math.ceil(math.log2(size))
    return min(k, size - 1)


def ring_order(size: int, seed: bytes) -> list[int]:
    def key(index: int) -> tuple[bytes, int]:
        return hashlib.sha256(seed + index.to_bytes(4, "big")).digest(), index

    return sorted(range(1, size + 1), key=key)


def neighbours_of(size: int, degree: int, seed: bytes, index: int) -> frozenset[int]:
    """One phone's neighbours (what ``neighbours`` gives it), without building the whole graph."""
    if degree >= size - 1:
        return frozenset(range(1, size + 1)) - {index}
    if degree % 2:
        raise ValueError(f"degree must be even below n - 1 = {size - 1}, got {degree}")
    order = ring_order(size, seed)
    pos = order.index(index)
    return frozenset(order[(pos + step) % size] for step in range(-(degree // 2), degree // 2 + 1) if step)


def neighbours(size: int, degree: int, seed: bytes) -> dict[int, frozenset[int]]:
    """Phone index (1..n) -> its neighbours' indices. ``degree`` >= n - 1 gives the
    complete graph; otherwise it must be even (each side of the ring takes degree / 2)."""
    if size < 1:
        raise ValueError(f"a group needs at least one phone, got {size}")
    if degree < 0:
        raise ValueError(f"degree must be >= 0, got {degree}")
    everyone = frozenset(range(1, size + 1))
    if degree >= size - 1:
        return {i: everyone - {i} for i in everyone}
    if degree % 2:
        raise ValueError(f"degree must be even below n - 1 = {size - 1}, got {degree}")
    order = ring_order(size, seed)
    out: dict[int, frozenset[int]] = {}
    for pos, phone in enumerate(order):
        near = {order[(pos + step) % size] for step in range(1, degree // 2 + 1)}
        near |= {order[(pos - step) % size] for step in range(1, degree // 2 + 1)}
        out[phone] = frozenset(near)
    return out
