"""Secure groups made durable: every acknowledged message of a group, in order, in the
server's SQLite file, and the group rebuilt by replaying them after a restart.

A message is written after it passed the group's checks and before the group changes, and is
committed before the phone gets its 200, so an acknowledged step is never lost. The log holds what the
server holds anyway: public keys, sealed shares it cannot open, masked uploads, unmask shares;
nothing in it reveals a phone's update. Replaying goes through the same ``SecureGroup`` methods,
so the rebuilt group is the one that was lost, except that its open step's deadline starts again.
A group's rows go once it aborted, or merged: an async group's at the next tick after its version
committed (and at start if its version's round record names it), a sync round's when the next
round's group opens (and at start if its round is no longer the open one).

Writes are group-committed: a message's row is queued and the queue is committed in one
transaction at the end of the event loop's pass (one fsync for every message that arrived in it,
not one each), in order, so the file always holds a prefix of the log. A handler answers only
after ``settled()``, once everything queued before its answer (its own row, and what its answer
reveals of other phones' messages) is committed; so an acknowledgement never goes out ahead of
its commit. A phone handed a group's task at check-in (``write_now``) is committed at once.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from typing import Any

from fedfleet.protocol.secagg import PublicKeys, UnmaskShares
from fedfleet.server.secagg import SecureGroup

_SCHEMA = """
CREATE TABLE IF NOT EXISTS secagg_log (   -- secure groups: acknowledged messages, in order
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    grp INTEGER NOT NULL,
    kind TEXT NOT NULL,                   -- round (sync) | open | assign | seal (async) | advertise | share |
                                          -- masked | unmask | close
    phone TEXT NOT NULL,
    body BLOB NOT NULL
);
"""
Entry = tuple[str, str, bytes]  # kind, phone, body


Op = tuple[str, tuple[Any, ...]]  # SQL and its parameters
_INSERT = "INSERT INTO secagg_log(grp, kind, phone, body) VALUES (?, ?, ?, ?)"


class Journal:
    """The log of secure groups, in the store's database, group-committed per loop pass."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.db.executescript(_SCHEMA)
        self._queue: list[Op] = []
        self._batch: asyncio.Future[None] | None = None  # resolved once the queued ops are committed
        self.commits = 0  # transactions written (a count for tests and benchmarks)

    def write(self, group: int, kind: str, phone: str, body: bytes) -> None:
        self._put((_INSERT, (group, kind, phone, body)))

    def write_now(self, group: int, kind: str, phone: str, body: bytes) -> None:
        """Write and commit before returning (with everything queued before it)."""
        self._queue.append((_INSERT, (group, kind, phone, body)))
        self.flush()

    def end(self, group: int) -> None:
        self._put(("DELETE FROM secagg_log WHERE grp = ?", (group,)))

    def keep_only(self, group: int) -> None:
        self._put(("DELETE FROM secagg_log WHERE grp != ?", (group,)))

    def _put(self, op: Op) -> None:
        self._queue.append(op)
        if self._batch is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop (start-up, tools): commit at once
            self.flush()
            return
        self._batch = loop.create_future()
        loop.call_soon(self.flush)  # after the handlers already scheduled in this pass have run

    def flush(self) -> None:
        """Commit every queued op in one transaction."""
        ops, batch, self._queue, self._batch = self._queue, self._batch, [], None
        error: BaseException | None = None
        if ops:
            try:
                self.db.execute("BEGIN IMMEDIATE")
                try:
                    for sql, params in ops:
                        self.db.execute(sql, params)
                    self.db.execute("COMMIT")
                except BaseException:
                    self.db.execute("ROLLBACK")
                    raise
                self.commits += 1
            except sqlite3.Error as exc:
                error = exc
        if batch is not None and not batch.done():
            if error is None:
                batch.set_result(None)
            else:
                batch.set_exception(error)
        if error is not None and batch is None:
            raise error

    async def settled(self) -> None:
        """Wait until everything written so far is committed."""
        if self._batch is not None:
            await asyncio.shield(self._batch)

    def groups(self) -> dict[int, list[Entry]]:
        self.flush()
        out: dict[int, list[Entry]] = {}
        for grp, kind, phone, body in self.db.execute("SELECT grp, kind, phone, body FROM secagg_log ORDER BY seq"):
            out.setdefault(int(grp), []).append((str(kind), str(phone), bytes(body)))
        return out


def replay(group: SecureGroup, kind: str, phone: str, body: bytes) -> None:
    """Apply one logged message to ``group`` (its journal is off while replaying)."""
    if kind == "advertise":
        group.advertise(phone, PublicKeys(body[:32], body[32:]))
    elif kind == "share":
        group.share(phone, {int(j): bytes.fromhex(h) for j, h in json.loads(body).items()})
    elif kind == "masked":
        group.upload(phone, body)
    elif kind == "unmask":
        msg = json.loads(body)
        group.unmask(phone, UnmaskShares({int(j): int(y) for j, y in msg["seeds"].items()},
                                         {int(j): int(y) for j, y in msg["keys"].items()}))
    elif kind == "close":
        group.close_step()
    else:
        raise ValueError(f"unknown secure-group log entry {kind!r}")


def merged_groups(rounds: list[dict[str, Any]]) -> set[int]:
    """The groups the store's round records say were merged."""
    return {int(r["secagg_group"]) for r in rounds if r.get("secagg_group") is not None}
