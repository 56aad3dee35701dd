"""A version commit moves its updates from pending to merged cheaply, and still all or nothing."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from pathlib import Path

import pytest

from fedfleet.server.store import Store

WIRE = os.urandom(10_000)  # about one 2,410-parameter float32 update


def _rows(path: Path, sql: str) -> list[tuple[str, ...]]:
    with sqlite3.connect(path) as db:  # a second connection: only what is committed
        return sorted(db.execute(sql).fetchall())


def _commit_pending(store: Store, keys: list[tuple[str, str]]) -> None:
    store.db.execute("BEGIN")
    store.db.executemany("INSERT INTO pending(phone, update_id, info, delta) VALUES (?, ?, '{}', ?)",
                         [(p, u, WIRE) for p, u in keys])
    store.db.execute("COMMIT")


async def test_queued_updates_merged_by_the_commit_skip_the_pending_table(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    store = Store(path)
    _commit_pending(store, [("a", "u1"), ("b", "u1")])
    merged_now = store.add_pending("c", "u1", {"examples": 1}, WIRE)
    waits = store.add_pending("d", "u1", {"examples": 1}, WIRE)  # queued, not part of this merge
    assert merged_now is not None and waits is not None and not merged_now.done()
    store.save_version(1, b"model", merged=[("a", "u1"), ("b", "u1"), ("c", "u1")])
    assert merged_now.done() and merged_now.exception() is None  # durable: merged in the version
    assert waits.done() and waits.exception() is None  # durable: committed as pending
    assert _rows(path, "SELECT phone, update_id, version FROM merged") == [("a", "u1", 1), ("b", "u1", 1),
                                                                          ("c", "u1", 1)]
    assert _rows(path, "SELECT phone, update_id FROM pending") == [("d", "u1")]
    assert store.merged_version("c", "u1") == 1 and store.commit_of("c", "u1") is None
    await asyncio.sleep(0)  # the scheduled flush finds nothing left to write
    store.close()
    reopened = Store(path)
    assert [(p, u) for p, u, _, _ in reopened.pending()] == [("d", "u1")]
    reopened.close()


async def test_a_failed_version_commit_changes_nothing_and_acknowledges_nothing(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    store = Store(path)
    store.save_version(1, b"model")
    _commit_pending(store, [("a", "u1")])
    queued = store.add_pending("b", "u1", {"examples": 1}, WIRE)
    assert queued is not None
    with pytest.raises(sqlite3.IntegrityError):  # version 1 exists: the transaction fails part-way
        store.save_version(1, b"again", merged=[("a", "u1"), ("b", "u1")])
    assert isinstance(queued.exception(), sqlite3.IntegrityError)  # never acknowledged
    assert _rows(path, "SELECT phone, update_id FROM merged") == []
    assert _rows(path, "SELECT phone, update_id FROM pending") == [("a", "u1")]
    assert _rows(path, "SELECT version FROM versions") == [(1,)]
    store.close()


def test_a_merge_writes_little_more_than_its_merged_rows(tmp_path: Path) -> None:
    """Deleting a merged update's pending row frees its ~10 KB of pages; zeroing and writing them
    all (SQLite's SECURE_DELETE, on in Debian's build) made the merge's commit ~25x larger."""
    path = tmp_path / "s.sqlite"
    store = Store(path)
    keys = [(f"p{i:04d}", "u1") for i in range(300)]
    _commit_pending(store, keys)
    store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    assert os.path.getsize(f"{path}-wal") == 0
    store.save_version(1, b"model", merged=keys)
    written = os.path.getsize(f"{path}-wal")
    assert written < 0.2 * len(keys) * len(WIRE), f"the merge wrote {written} bytes to the WAL"
    assert store.pending() == [] and store.merged_count() == len(keys)
    store.close()
