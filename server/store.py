"""Durable server state in one SQLite file (WAL): model versions, phones, round records.

A version is committed before it is announced, so a restarted server resumes from the
newest version it ever published; its round record (unevaluated, a draft) is committed with it,
so a crash cannot separate the two. One process at a time opens a store on disk: ``Store`` holds
an exclusive lock on ``<file>.lock`` until ``close`` (the kernel drops it if the process dies).

Acknowledged updates and phone registrations are committed in groups, off the event loop
(server/commit.py); a version commit first waits for any such write in flight, so a merged
update's pending row is always written before the transaction that moves it to the merged set.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

from fedfleet.server.commit import PENDING_SQL, PHONE_SQL, GroupCommit, PhoneRow, fast_delete, settle
from fedfleet.server.commit import NameTaken as NameTaken  # re-exported: server.routes answers it with a 409
from fedfleet.server.phone_cache import BoundedCache

_SCHEMA = """
CREATE TABLE IF NOT EXISTS versions (
    version INTEGER PRIMARY KEY,
    created REAL NOT NULL,
    sha256 TEXT NOT NULL,
    params BLOB NOT NULL                -- a wire-format 'model' message
);
CREATE TABLE IF NOT EXISTS optimizer (
    version INTEGER PRIMARY KEY,
    state BLOB NOT NULL                 -- server optimizer moments after this version
);
CREATE TABLE IF NOT EXISTS phones (
    phone_id TEXT PRIMARY KEY,
    token_sha256 TEXT UNIQUE NOT NULL,
    registered REAL NOT NULL,
    info TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY,
    record TEXT NOT NULL                -- one metrics.jsonl line ("_draft": true until evaluated)
);
CREATE TABLE IF NOT EXISTS pending (     -- acknowledged, not yet merged: durable before the 200
    phone TEXT NOT NULL,
    update_id TEXT NOT NULL,
    info TEXT NOT NULL,                 -- JSON: examples, loss, latency, staleness, bytes, base version
    delta BLOB NOT NULL,                -- a wire-format 'update' message (dense float32)
    PRIMARY KEY (phone, update_id)
);
CREATE TABLE IF NOT EXISTS merged (      -- every update ever merged, for idempotent retries
    phone TEXT NOT NULL,
    update_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    PRIMARY KEY (phone, update_id)
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class StoreInUse(ValueError):
    """Another process holds the store's lock: two servers on one data dir would corrupt each
    other. The CLI reports it in one line."""


_LOCKS: dict[str, list[int]] = {}  # lock file -> [fd, stores open on it in this process]


def _lock(path: str) -> str | None:
    """Take an exclusive, non-blocking lock on ``path + ".lock"`` (flock) and write our pid in it.
    The lock is per process: stores opened on one file within this process share it (tests reopen
    a data dir before the previous app is collected); ``_unlock`` drops it with the last of them,
    and the kernel drops it when the process dies."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        return None
    lock_path = os.path.realpath(path) + ".lock"
    if lock_path in _LOCKS:
        _LOCKS[lock_path][1] += 1
        return lock_path
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        who = f"process {holder}" if holder.isdigit() else "another process"
        raise StoreInUse(f"{Path(path).parent} is in use by {who} (it holds {lock_path}): one server per "
                         "data dir; stop that server or choose another --data-dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    _LOCKS[lock_path] = [fd, 1]
    return lock_path


def _unlock(lock_path: str | None) -> None:
    entry = _LOCKS.get(lock_path) if lock_path is not None else None
    if entry is not None:
        entry[1] -= 1
        if entry[1] <= 0:
            del _LOCKS[lock_path]  # type: ignore[arg-type]
            os.close(entry[0])  # releases the lock


class Store:
    def __init__(self, path: str | Path = ":memory:", keep_versions: int = 16, sync: str = "full") -> None:
        if sync not in ("full", "normal"):
            raise ValueError("sqlite_sync must be 'full' or 'normal'")
        self.path = str(path)
        self.keep_versions = keep_versions
        self._lock = _lock(self.path) if self.path != ":memory:" else None  # before touching the file
        try:
            self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            if self.path != ":memory:":
                self.db.execute("PRAGMA journal_mode=WAL")
                # WAL + NORMAL: a commit survives the process being killed, not the machine losing power.
                self.db.execute(f"PRAGMA synchronous={sync.upper()}")
            self.db.executescript(_SCHEMA)
            fast_delete(self.db)
            # queued updates and registrations, committed in groups by a writer thread (on disk)
            self.commits = GroupCommit(self.db, self.path, sync, self._enrolled)
        except BaseException:
            _unlock(self._lock)
            raise
        # token hash -> phone id, phone id -> enrolled Ed25519 public key: the phones heard from lately
        # are authenticated without a query; the rest are rows of ``phones`` (server/phone_cache.py)
        self._tokens: BoundedCache[str, str] = BoundedCache()
        self._phones = -1  # cached count
        self._keys: BoundedCache[str, bytes | None] = BoundedCache()

    def close(self) -> None:
        try:
            self.commits.close()
            self.db.close()
        finally:
            _unlock(self._lock)
            self._lock = None

    # --- model versions -----------------------------------------------------------------
    def save_version(self, version: int, blob: bytes, opt_state: bytes | None = None,
                     meta: dict[str, str] | None = None, merged: list[tuple[str, str]] | None = None,
                     record: dict[str, Any] | None = None) -> str:
        """Commit a version, its optimizer state, counters, the move of the ``merged`` updates
        from pending to merged, and its round ``record``, in one transaction: a crash leaves all or
        nothing."""
        digest = hashlib.sha256(blob).hexdigest()
        db = self.db
        self.commits.drain()  # pending rows being written go first: the merge below moves them
        # acknowledged-to-be updates join this transaction (registrations wait for the flush);
        # those merged by it go straight to ``merged``, without a pending row to insert and delete
        queued = self.commits.take_updates()
        moved = merged or []
        gone = {(row[0], row[1]) for row, _ in queued}.intersection(moved)
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany(PENDING_SQL, [row for row, _ in queued if (row[0], row[1]) not in gone])
            db.execute("INSERT INTO versions(version, created, sha256, params) VALUES (?, ?, ?, ?)",
                       (version, time.time(), digest, blob))
            if opt_state is not None:
                db.execute("INSERT OR REPLACE INTO optimizer(version, state) VALUES (?, ?)", (version, opt_state))
            db.executemany("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (meta or {}).items())
            db.executemany("DELETE FROM pending WHERE phone = ? AND update_id = ?", [k for k in moved if k not in gone])
            db.executemany("INSERT INTO merged(phone, update_id, version) VALUES (?, ?, ?)",
                           [(phone, update_id, version) for phone, update_id in moved])
            if record is not None:
                db.execute("INSERT OR REPLACE INTO rounds(round, record) VALUES (?, ?)",
                           (record["round"], json.dumps(record)))
            db.execute("DELETE FROM versions WHERE version <= ?", (version - self.keep_versions,))
            db.execute("DELETE FROM optimizer WHERE version < ?", (version,))
            db.execute("COMMIT")
        except BaseException as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            settle(queued, exc)
            raise
        settle(queued, None)
        return digest

    def optimizer_state(self, version: int) -> bytes | None:
        row = self.db.execute("SELECT state FROM optimizer WHERE version = ?", (version,)).fetchone()
        return bytes(row[0]) if row else None

    def latest_version(self) -> tuple[int, bytes] | None:
        row = self.db.execute("SELECT version, params FROM versions ORDER BY version DESC LIMIT 1").fetchone()
        return (int(row[0]), bytes(row[1])) if row else None

    def version_blob(self, version: int) -> bytes | None:
        row = self.db.execute("SELECT params FROM versions WHERE version = ?", (version,)).fetchone()
        return bytes(row[0]) if row else None

    # --- updates between acknowledgement and merge ------------------------------------------
    def add_pending(self, phone: str, update_id: str, info: dict[str, Any], delta: bytes) -> asyncio.Future[None] | None:
        """Make an accepted update durable. Inside an event loop this is a group commit: rows
        queued during one pass of the loop are written in one transaction (one fsync), and the
        returned future resolves once theirs is committed; acknowledge only then. Without a
        running loop the row is committed before returning (None)."""
        row = (phone, update_id, json.dumps(info), delta)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            self.db.execute(PENDING_SQL, row)
            return None
        return self.commits.add_update(row)

    def enrol(self, phone_id: str, token: str, info: dict[str, Any]) -> asyncio.Future[None]:
        """Register a phone in the group commit (inside the event loop; ``add_phone`` outside):
        the future resolves once its row is committed, so answer the phone (give it its token)
        only then. Raises, or the future fails with, ``NameTaken``; a failed commit fails it with
        the storage's error, and the phone is not registered."""
        return self.commits.enrol(self._phone_row(phone_id, token, info))

    async def enrol_many(self, rows: list[PhoneRow]) -> None:
        """Register ``rows`` in one transaction (server/bulk_registration.py): all, or none with
        ``NameTaken``. They join no cache (a million would evict the phones heard from lately)."""
        await self.commits.enrol_many(rows)
        if self._phones >= 0:
            self._phones += len(rows)

    def commit_of(self, phone: str, update_id: str) -> asyncio.Future[None] | None:
        """The commit a queued or in-flight (accepted, not yet durable) update waits for."""
        return self.commits.commit_of(phone, update_id)

    def flush(self) -> None:
        """Commit the queued rows now (the loop does so right after they were queued)."""
        self.commits.flush()

    def pending(self) -> list[tuple[str, str, dict[str, Any], bytes]]:
        rows = self.db.execute("SELECT phone, update_id, info, delta FROM pending ORDER BY rowid").fetchall()
        return [(str(p), str(u), json.loads(i), bytes(d)) for p, u, i, d in rows]

    def drop_pending(self) -> None:
        self.db.execute("DELETE FROM pending")

    def merged_version(self, phone: str, update_id: str) -> int | None:
        row = self.db.execute("SELECT version FROM merged WHERE phone = ? AND update_id = ?",
                              (phone, update_id)).fetchone()
        return int(row[0]) if row else None

    def merged_count(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM merged").fetchone()[0])

    # --- phones -------------------------------------------------------------------------
    def add_phone(self, phone_id: str, token: str, info: dict[str, Any]) -> None:
        """Register a phone now, on the loop's connection (sqlite3.IntegrityError: name taken)."""
        row = self._phone_row(phone_id, token, info)
        self.db.execute(PHONE_SQL, row)
        self._enrolled(row)

    @staticmethod
    def _phone_row(phone_id: str, token: str, info: dict[str, Any]) -> PhoneRow:
        return (phone_id, token_hash(token), time.time(), json.dumps(info))

    def _enrolled(self, row: PhoneRow) -> None:
        phone_id, key, _, info = row
        self._tokens[key] = phone_id
        public_key = json.loads(info).get("public_key")
        self._keys[phone_id] = base64.b64decode(public_key) if public_key else None
        if self._phones >= 0:
            self._phones += 1

    def phone_for_token(self, token: str) -> str | None:
        key = token_hash(token)
        if key in self._tokens:
            return self._tokens[key]
        row = self.db.execute("SELECT phone_id FROM phones WHERE token_sha256 = ?", (key,)).fetchone()
        if row is None:
            return None  # unknown tokens are not cached: a flood of them cannot grow memory
        self._tokens[key] = str(row[0])
        return str(row[0])

    def public_key(self, phone_id: str) -> bytes | None:
        if phone_id in self._keys:
            return self._keys[phone_id]
        row = self.db.execute("SELECT info FROM phones WHERE phone_id = ?", (phone_id,)).fetchone()
        if row is None:
            return None
        key = json.loads(row[0]).get("public_key")
        self._keys[phone_id] = base64.b64decode(key) if key else None  # enrolment never changes
        return self._keys[phone_id]

    def phone_ids(self, limit: int = 1000) -> list[str]:
        return [str(r[0]) for r in self.db.execute("SELECT phone_id FROM phones ORDER BY rowid LIMIT ?", (limit,))]

    def enrolment_codes_spent(self) -> set[str]:
        """The hashes of the enrolment codes registered phones used (server/enrolment.py)."""
        rows = self.db.execute("SELECT json_extract(info, '$.enrolment_code') FROM phones "
                               "WHERE json_extract(info, '$.enrolment_code') IS NOT NULL")
        return {str(r[0]) for r in rows}

    def phone_count(self) -> int:
        if self._phones < 0:
            self._phones = int(self.db.execute("SELECT COUNT(*) FROM phones").fetchone()[0])
        return self._phones

    # --- rounds and settings ------------------------------------------------------------
    def add_round(self, record: dict[str, Any]) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO rounds(round, record) VALUES (?, ?)", (record["round"], json.dumps(record))
        )

    def rounds(self) -> list[dict[str, Any]]:
        rows = self.db.execute("SELECT record FROM rounds ORDER BY round").fetchall()
        return [json.loads(r[0]) for r in rows]

    def get_meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return str(row[0]) if row else None

    def set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))
