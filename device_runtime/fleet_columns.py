"""An emulated fleet's phones as columns: what a phone is before it is built.

A fleet of a million phones cannot hold a million copies of its examples, device profiles,
seed sequences and key pairs. Until a phone is built (``fleet_plan.FleetPlan.phone``), it is
a row of shared arrays: its examples a range of one index into the shared dataset (``Shard``),
its profile a row of ``profiles.ProfileColumns``, its generator's seed sequence the fleet's ``i``-th
child made on demand (``child_seed``), its Ed25519 key a 32-byte seed derived from the fleet's
key secret and its index (``key_seed``). Each yields exactly what the eager construction gave:
the same examples in the same order, the same profile floats, the same random stream.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np


class Shard:
    """A phone's examples (x, y): ``index`` (a view of the fleet's index) into the shared dataset,
    gathered when the phone trains (``x, y = shard``) rather than copied for its whole life."""

    __slots__ = ("_x", "_y", "index")

    def __init__(self, x: np.ndarray, y: np.ndarray, index: np.ndarray) -> None:
        self._x, self._y, self.index = x, y, index

    def __iter__(self) -> Iterator[np.ndarray]:
        yield self._x[self.index]
        yield self._y[self.index]

    def __len__(self) -> int:
        return 2  # (x, y), like the tuple it stands for

    @property
    def examples(self) -> int:
        return len(self.index)


@dataclass(frozen=True)
class Shards:
    """Every phone's shard: phone ``i`` holds ``order[offsets[i]:offsets[i + 1]]`` (the indices
    ``data.partition`` gave it, in its order)."""

    order: np.ndarray  # [examples held by phones] int64
    offsets: np.ndarray  # [phones + 1] int64

    @classmethod
    def of(cls, parts: list[np.ndarray]) -> Shards:
        sizes = np.fromiter((len(p) for p in parts), dtype=np.int64, count=len(parts))
        order = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        return cls(order.astype(np.int64, copy=False), np.concatenate([[0], np.cumsum(sizes)]))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def index(self, i: int) -> np.ndarray:
        return self.order[self.offsets[i]:self.offsets[i + 1]]


def child_seed(root: np.random.SeedSequence, i: int) -> np.random.SeedSequence:
    """``root.spawn(n)[i]`` for a root that had spawned no children, without spawning the others."""
    return np.random.SeedSequence(root.entropy, spawn_key=(*root.spawn_key, i), pool_size=root.pool_size)


def key_seed(secret: bytes, i: int) -> bytes:
    """Phone ``i``'s Ed25519 seed: keyed BLAKE2b of its index under the fleet's secret (32 random
    bytes per fleet: keys stay secrets, unlike the fleet's seed, and no key is part of a seeded run)."""
    return hashlib.blake2b(i.to_bytes(8, "little"), key=secret, digest_size=32).digest()
