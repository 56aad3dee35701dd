"""Durable server state in one SQLite file (WAL): model versions, phones, round records.

A version is committed before it is announced, so a restarted server resumes from the
newest version it ever published.

Group commit of acknowledged updates and of phone registrations runs off the event loop: rows
queued during one pass of the loop (or while the previous group commit was being written) are
written by one worker thread on a connection of its own (one transaction, one fsync), so an
fsync of 25-65 ms no longer stalls every other request. A version commit (on the loop's
connection) first waits for any such write in flight, so a merged update's pending row is
always written before the transaction that moves it to the merged set.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import hashlib
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

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
    record TEXT NOT NULL                -- one metrics.jsonl line
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
_PENDING_SQL = "INSERT INTO pending(phone, update_id, info, delta) VALUES (?, ?, ?, ?)"
_PHONE_SQL = "INSERT INTO phones(phone_id, token_sha256, registered, info) VALUES (?, ?, ?, ?)"
PendingRow = tuple[str, str, str, bytes]  # phone, update id, info JSON, delta
PhoneRow = tuple[str, str, float, str]  # phone id, token hash, registration time, info JSON
Queue = list[tuple[Any, asyncio.Future[None]]]  # rows waiting for a commit, and who waits for each
Refused = list[sqlite3.IntegrityError | None]  # per row of a group commit: the constraint it broke


class NameTaken(Exception):
    """A phone of that name is registered, or being registered."""


def _resolve(fut: asyncio.Future[None], exc: BaseException | None) -> None:
    if not fut.done():  # a waiter that gave up (cancelled) is not answered
        if exc is None:
            fut.set_result(None)
        else:
            fut.set_exception(exc)


def _settle(queued: Queue, exc: BaseException | None) -> None:
    for _, fut in queued:
        _resolve(fut, exc)


def _insert(db: sqlite3.Connection, sql: str, row: tuple[Any, ...]) -> sqlite3.IntegrityError | None:
    try:
        db.execute(sql, row)
    except sqlite3.IntegrityError as exc:
        return exc
    return None


def _write_rows(pending: list[PendingRow], phones: list[PhoneRow], db: sqlite3.Connection) -> Refused:
    """Insert the rows of a group commit in one transaction. If one breaks a constraint, all are
    inserted one by one (still one transaction) so that only that row is refused."""
    db.execute("BEGIN IMMEDIATE")
    try:
        db.execute("SAVEPOINT rows")
        try:
            db.executemany(_PENDING_SQL, pending)
            db.executemany(_PHONE_SQL, phones)
            refused: Refused = [None] * (len(pending) + len(phones))
        except sqlite3.IntegrityError:
            db.execute("ROLLBACK TO rows")
            refused = [_insert(db, _PENDING_SQL, r) for r in pending] + [_insert(db, _PHONE_SQL, r) for r in phones]
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:  # some errors (a full disk) have rolled it back already
            db.execute("ROLLBACK")
        raise
    return refused


def _fast_delete(db: sqlite3.Connection) -> None:
    """Zero deleted content only where that costs no extra write. With Debian's SECURE_DELETE
    build, moving a merge's 5,000 updates (~10 KB each) out of ``pending`` wrote ~51 MB of zeroed
    pages to the WAL (~150 ms on the loop), not ~1 MB; freed pages now keep their bytes until reused."""
    db.execute("PRAGMA secure_delete=FAST")


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Store:
    def __init__(self, path: str | Path = ":memory:", keep_versions: int = 16, sync: str = "full") -> None:
        if sync not in ("full", "normal"):
            raise ValueError("sqlite_sync must be 'full' or 'normal'")
        self.path = str(path)
        self.keep_versions = keep_versions
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        if self.path != ":memory:":
            self.db.execute("PRAGMA journal_mode=WAL")
            # WAL + NORMAL: a commit survives the process being killed, not the machine losing power.
            self.db.execute(f"PRAGMA synchronous={sync.upper()}")
        self.db.executescript(_SCHEMA)
        _fast_delete(self.db)
        # The group-commit writer: its own connection, used only from its one thread.
        self._writer: concurrent.futures.ThreadPoolExecutor | None = None
        self._wdb: sqlite3.Connection | None = None
        if self.path != ":memory:":
            self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fedfleet-commit")
            self._wdb = self._writer.submit(self._open_writer, sync).result()
        # group commits handed to the writer: (its job, pending rows, phone rows); at most one at a time
        self._inflight: list[tuple[concurrent.futures.Future[Refused], Queue, Queue]] = []
        self._tokens: dict[str, str] = {}  # token hash -> phone id: authentication without a query
        self._phones = -1  # cached count
        self._keys: dict[str, bytes | None] = {}  # phone id -> enrolled Ed25519 public key
        self._queued: Queue = []  # pending rows for the next group commit
        self._enrolments: Queue = []  # phone rows for the next group commit
        self._enrolling: set[str] = set()  # names queued or in flight: one batch cannot take a name twice
        self._flush_scheduled = False

    def _open_writer(self, sync: str) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute(f"PRAGMA synchronous={sync.upper()}")  # per connection
        _fast_delete(db)
        return db

    def close(self) -> None:
        self._drain()
        queued, self._queued = self._queued, []
        enrolments, self._enrolments = self._enrolments, []
        self._commit_here(queued, enrolments)  # not flushed by the loop: commit them on this connection
        if self._writer is not None:
            self._writer.submit(self._wdb.close if self._wdb is not None else lambda: None).result()
            self._writer.shutdown(wait=True)
            self._writer = None
        self.db.close()

    def _drain(self) -> None:
        """Wait for group commits in flight (their futures are settled by the loop)."""
        for cf, _, _ in list(self._inflight):
            concurrent.futures.wait([cf])

    # --- model versions -----------------------------------------------------------------
    def save_version(self, version: int, blob: bytes, opt_state: bytes | None = None,
                     meta: dict[str, str] | None = None, merged: list[tuple[str, str]] | None = None) -> str:
        """Commit a version, its optimizer state, counters, and the move of the ``merged``
        updates from pending to merged, in one transaction: a crash leaves all or nothing."""
        digest = hashlib.sha256(blob).hexdigest()
        db = self.db
        self._drain()  # pending rows being written go first: the merge below moves them
        # acknowledged-to-be updates join this transaction (registrations wait for the flush);
        # those merged by it go straight to ``merged``, without a pending row to insert and delete
        queued, self._queued = self._queued, []
        moved = merged or []
        gone = {(row[0], row[1]) for row, _ in queued}.intersection(moved)
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany(_PENDING_SQL, [row for row, _ in queued if (row[0], row[1]) not in gone])
            db.execute("INSERT INTO versions(version, created, sha256, params) VALUES (?, ?, ?, ?)",
                       (version, time.time(), digest, blob))
            if opt_state is not None:
                db.execute("INSERT OR REPLACE INTO optimizer(version, state) VALUES (?, ?)", (version, opt_state))
            db.executemany("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (meta or {}).items())
            db.executemany("DELETE FROM pending WHERE phone = ? AND update_id = ?", [k for k in moved if k not in gone])
            db.executemany("INSERT INTO merged(phone, update_id, version) VALUES (?, ?, ?)",
                           [(phone, update_id, version) for phone, update_id in moved])
            db.execute("DELETE FROM versions WHERE version <= ?", (version - self.keep_versions,))
            db.execute("DELETE FROM optimizer WHERE version < ?", (version,))
            db.execute("COMMIT")
        except BaseException as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            _settle(queued, exc)
            raise
        _settle(queued, None)
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
            self.db.execute(_PENDING_SQL, row)
            return None
        return self._enqueue(self._queued, row)

    def enrol(self, phone_id: str, token: str, info: dict[str, Any]) -> asyncio.Future[None]:
        """Register a phone in the group commit (inside the event loop; ``add_phone`` outside):
        the future resolves once its row is committed, so answer the phone (give it its token)
        only then. Raises, or the future fails with, ``NameTaken``; a failed commit fails it with
        the storage's error, and the phone is not registered."""
        row = self._phone_row(phone_id, token, info)
        if phone_id in self._enrolling or self.db.execute(
                "SELECT 1 FROM phones WHERE phone_id = ?", (phone_id,)).fetchone() is not None:
            raise NameTaken(phone_id)
        fut = self._enqueue(self._enrolments, row)
        self._enrolling.add(phone_id)
        return fut

    def _enqueue(self, queue: Queue, row: tuple[Any, ...]) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        queue.append((row, fut))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self.flush)
        return fut

    def commit_of(self, phone: str, update_id: str) -> asyncio.Future[None] | None:
        """The commit a queued or in-flight (accepted, not yet durable) update waits for."""
        batches = [self._queued, *(q for _, q, _ in self._inflight)]
        return next((fut for q in batches for row, fut in q if row[0] == phone and row[1] == update_id), None)

    def _commit_here(self, queued: Queue, enrolments: Queue) -> None:
        """Write queued rows on the loop's connection and settle their futures (a failure: none
        of them is acknowledged)."""
        if not queued and not enrolments:
            return
        try:
            refused = _write_rows([r for r, _ in queued], [r for r, _ in enrolments], self.db)
        except Exception as exc:
            self._settle_batch(queued, enrolments, exc)
            return
        self._settle_batch(queued, enrolments, refused)

    def flush(self) -> None:
        """Commit the queued rows (run by the loop right after they were queued): on the writer
        thread when there is one, each waiter's future settled by the loop once the transaction
        is committed (or failed: then none of them is acknowledged). While one group commit is
        being written, rows queue up for the next: it takes all of them when that one ends."""
        self._flush_scheduled = False
        if self._inflight and self._writer is not None:
            return  # _settle_inflight flushes again
        queued, self._queued = self._queued, []
        enrolments, self._enrolments = self._enrolments, []
        if not queued and not enrolments:
            return  # a version commit took them
        if self._writer is None or self._wdb is None:  # in memory: one connection, commit here
            self._commit_here(queued, enrolments)
            return
        loop = asyncio.get_running_loop()
        cf = self._writer.submit(_write_rows, [r for r, _ in queued], [r for r, _ in enrolments], self._wdb)
        entry = (cf, queued, enrolments)
        self._inflight.append(entry)

        def committed(_: concurrent.futures.Future[Refused]) -> None:
            try:
                loop.call_soon_threadsafe(self._settle_inflight, entry)
            except RuntimeError:  # the loop is gone (shutdown): nobody waits for these any more
                pass

        cf.add_done_callback(committed)

    def _settle_inflight(self, entry: tuple[concurrent.futures.Future[Refused], Queue, Queue]) -> None:
        cf, queued, enrolments = entry
        if entry in self._inflight:
            self._inflight.remove(entry)
        exc = cf.exception()
        self._settle_batch(queued, enrolments, exc if exc is not None else cf.result())
        self.flush()  # what queued up meanwhile: the next group commit

    def _settle_batch(self, queued: Queue, enrolments: Queue, outcome: Refused | BaseException) -> None:
        """Answer the waiters of a group commit; committed phones join the caches only now."""
        refused = [outcome] * (len(queued) + len(enrolments)) if isinstance(outcome, BaseException) else outcome
        for (_, fut), err in zip(queued, refused[:len(queued)], strict=True):
            _resolve(fut, err)
        for (row, fut), err in zip(enrolments, refused[len(queued):], strict=True):
            self._enrolling.discard(row[0])
            if err is None:
                self._enrolled(row)
            _resolve(fut, NameTaken(row[0]) if isinstance(err, sqlite3.IntegrityError) else err)

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
        self.db.execute(_PHONE_SQL, row)
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
