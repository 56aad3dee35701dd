"""Secure groups made durable: every acknowledged message of a group, in order, in the
server's SQLite file, and the group rebuilt by replaying them after a restart.

A message is written (and committed) after it passed the group's checks and before the group
changes or the phone gets its 200, so an acknowledged step is never lost. The log holds what the
server holds anyway: public keys, sealed shares it cannot open, masked uploads, unmask shares;
nothing in it reveals a phone's update. Replaying goes through the same ``SecureGroup`` methods,
so the rebuilt group is the one that was lost, except that its open step's deadline starts again.
A group's rows go once it aborted, or merged: an async group's at the next tick after its version
committed (and at start if its version's round record names it), a sync round's when the next
round's group opens (and at start if its round is no longer the open one).
"""

from __future__ import annotations

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


class Journal:
    """The log of secure groups, in the store's database (one commit per message)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.db.executescript(_SCHEMA)

    def write(self, group: int, kind: str, phone: str, body: bytes) -> None:
        self.db.execute("INSERT INTO secagg_log(grp, kind, phone, body) VALUES (?, ?, ?, ?)",
                        (group, kind, phone, body))

    def end(self, group: int) -> None:
        self.db.execute("DELETE FROM secagg_log WHERE grp = ?", (group,))

    def keep_only(self, group: int) -> None:
        self.db.execute("DELETE FROM secagg_log WHERE grp != ?", (group,))

    def groups(self) -> dict[int, list[Entry]]:
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
