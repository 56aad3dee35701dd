"""Group commit of acknowledged updates and of phone registrations, off the event loop.

Rows queued during one pass of the loop (or while the previous group commit was being written)
are written by one worker thread on a connection of its own (one transaction, one fsync), so an
fsync of 25-65 ms does not stall every other request. A version commit (on the loop's
connection, in ``Store.save_version``) first waits for any such write in flight (``drain``), so a
merged update's pending row is always written before the transaction that moves it to the merged
set.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import sqlite3
from collections.abc import Callable
from typing import Any

PENDING_SQL = "INSERT INTO pending(phone, update_id, info, delta) VALUES (?, ?, ?, ?)"
PHONE_SQL = "INSERT INTO phones(phone_id, token_sha256, registered, info) VALUES (?, ?, ?, ?)"
PendingRow = tuple[str, str, str, bytes]  # phone, update id, info JSON, delta
PhoneRow = tuple[str, str, float, str]  # phone id, token hash, registration time, info JSON
Queue = list[tuple[Any, asyncio.Future[None]]]  # rows waiting for a commit, and who waits for each
Refused = list[sqlite3.IntegrityError | None]  # per row of a group commit: the constraint it broke
Inflight = tuple[concurrent.futures.Future[Refused], Queue, Queue]  # the writer's job, pending rows, phone rows


class NameTaken(Exception):
    """A phone of that name is registered, or being registered."""


def _resolve(fut: asyncio.Future[None], exc: BaseException | None) -> None:
    if not fut.done():  # a waiter that gave up (cancelled) is not answered
        if exc is None:
            fut.set_result(None)
        else:
            fut.set_exception(exc)


def settle(queued: Queue, exc: BaseException | None) -> None:
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
            db.executemany(PENDING_SQL, pending)
            db.executemany(PHONE_SQL, phones)
            refused: Refused = [None] * (len(pending) + len(phones))
        except sqlite3.IntegrityError:
            db.execute("ROLLBACK TO rows")
            refused = [_insert(db, PENDING_SQL, r) for r in pending] + [_insert(db, PHONE_SQL, r) for r in phones]
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:  # some errors (a full disk) have rolled it back already
            db.execute("ROLLBACK")
        raise
    return refused


def _write_all(phones: list[PhoneRow], db: sqlite3.Connection) -> None:
    """Insert ``phones`` in one transaction: all, or none (``NameTaken`` for a name already taken)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        db.executemany(PHONE_SQL, phones)
        db.execute("COMMIT")
    except BaseException as exc:
        if db.in_transaction:
            db.execute("ROLLBACK")
        if isinstance(exc, sqlite3.IntegrityError):
            names = [r[0] for r in phones]
            marks = ",".join("?" * len(names))
            row = db.execute(f"SELECT phone_id FROM phones WHERE phone_id IN ({marks}) LIMIT 1", names).fetchone()
            raise NameTaken(row[0] if row else "(one of them)") from None
        raise


def fast_delete(db: sqlite3.Connection) -> None:
    """Zero deleted content only where that costs no extra write. With Debian's SECURE_DELETE
    build, moving a merge's 5,000 updates (~10 KB each) out of ``pending`` wrote ~51 MB of zeroed
    pages to the WAL (~150 ms on the loop), not ~1 MB; freed pages now keep their bytes until reused."""
    db.execute("PRAGMA secure_delete=FAST")


class GroupCommit:
    """The queues of rows waiting to be committed, and the writer thread that commits them.

    ``db`` is the loop's connection: an in-memory store (no writer thread) commits on it, and so
    does ``close``. ``enrolled`` is called on the loop with each phone row once it is committed."""

    def __init__(self, db: sqlite3.Connection, path: str, sync: str,
                 enrolled: Callable[[PhoneRow], None]) -> None:
        self.db = db
        self.path = path
        self._enrolled = enrolled
        # The group-commit writer: its own connection, used only from its one thread.
        self._writer: concurrent.futures.ThreadPoolExecutor | None = None
        self._wdb: sqlite3.Connection | None = None
        if self.path != ":memory:":
            self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fedfleet-commit")
            self._wdb = self._writer.submit(self._open_writer, sync).result()
        # group commits handed to the writer: (its job, pending rows, phone rows); at most one at a time
        self._inflight: list[Inflight] = []
        self._queued: Queue = []  # pending rows for the next group commit
        self._enrolments: Queue = []  # phone rows for the next group commit
        self._enrolling: set[str] = set()  # names queued or in flight: one batch cannot take a name twice
        self._flush_scheduled = False

    def _open_writer(self, sync: str) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute(f"PRAGMA synchronous={sync.upper()}")  # per connection
        fast_delete(db)
        return db

    def close(self) -> None:
        self.drain()
        queued, self._queued = self._queued, []
        enrolments, self._enrolments = self._enrolments, []
        self._commit_here(queued, enrolments)  # not flushed by the loop: commit them on this connection
        if self._writer is not None:
            self._writer.submit(self._wdb.close if self._wdb is not None else lambda: None).result()
            self._writer.shutdown(wait=True)
            self._writer = None

    def drain(self) -> None:
        """Wait for group commits in flight (their futures are settled by the loop)."""
        for cf, _, _ in list(self._inflight):
            concurrent.futures.wait([cf])

    def take_updates(self) -> Queue:
        """Hand the queued pending rows to the caller, which must commit and ``settle`` them."""
        queued, self._queued = self._queued, []
        return queued

    def add_update(self, row: PendingRow) -> asyncio.Future[None]:
        return self._enqueue(self._queued, row)

    def enrol(self, row: PhoneRow) -> asyncio.Future[None]:
        phone_id = row[0]
        if phone_id in self._enrolling or self.db.execute(
                "SELECT 1 FROM phones WHERE phone_id = ?", (phone_id,)).fetchone() is not None:
            raise NameTaken(phone_id)
        fut = self._enqueue(self._enrolments, row)
        self._enrolling.add(phone_id)
        return fut

    async def enrol_many(self, rows: list[PhoneRow]) -> None:
        """Register ``rows`` in one transaction of their own (on the writer thread, after the group
        commits before it): all of them, or none with ``NameTaken`` naming a name already taken."""
        names = [r[0] for r in rows]
        taken = next((n for n in names if n in self._enrolling), None)
        if taken is not None:
            raise NameTaken(taken)
        self._enrolling.update(names)
        try:
            if self._writer is None or self._wdb is None:
                _write_all(rows, self.db)
            else:
                await asyncio.wrap_future(self._writer.submit(_write_all, rows, self._wdb))
        finally:
            self._enrolling.difference_update(names)

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

    def _settle_inflight(self, entry: Inflight) -> None:
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
