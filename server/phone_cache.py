"""A bounded cache of per-phone lookups in front of the store's SQLite rows.

The store answers "which phone holds this token" and "which key did this phone enrol" from its
``phones`` table (indexed); these caches keep the answers for the phones heard from lately, so
the active part of a fleet is served without a query while a million registered phones cost
no Python objects each. Oldest-inserted entries go first (registration order or first lookup):
a phone evicted is looked up again at its next request.
"""

from __future__ import annotations

from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")

# Entries per cache. At ~300 B an entry (a hex digest key, a phone id), 2^17 of them are ~40 MB;
# 10,000 phones fit whole, so a fleet of that size never queries.
CACHE_ENTRIES = 1 << 17


class BoundedCache(Generic[K, V]):
    def __init__(self, capacity: int | None = None) -> None:
        capacity = CACHE_ENTRIES if capacity is None else capacity
        if capacity < 1:
            raise ValueError("a cache holds at least one entry")
        self.capacity = capacity
        self._items: dict[K, V] = {}

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __getitem__(self, key: K) -> V:
        return self._items[key]

    def __len__(self) -> int:
        return len(self._items)

    def __setitem__(self, key: K, value: V) -> None:
        items = self._items
        if key not in items and len(items) >= self.capacity:
            del items[next(iter(items))]  # dicts keep insertion order: the oldest goes
        items[key] = value
