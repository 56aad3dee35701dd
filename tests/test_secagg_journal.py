"""The secure groups' log is group-committed: the messages written in one pass of the event loop
share one transaction, nothing is visible on disk before it commits, and ``settled()`` (what a
handler awaits before it answers) returns only once it has. A real round commits far fewer
transactions than it has messages. (``tests/test_secagg_durability.py`` kills a real server.)"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from fedfleet.device_runtime.secagg_client import SecureOutcome
from fedfleet.server.secagg_journal import Journal
from fedfleet.server.state import COORD
from fedfleet.server.store import Store
from tests.conftest import MakeClient
from tests.test_secagg_server import SECURE, _cohort, _round


def _on_disk(path: Path) -> int:
    with sqlite3.connect(path) as other:
        return int(other.execute("SELECT COUNT(*) FROM secagg_log").fetchone()[0])


def test_one_pass_of_the_loop_is_one_commit_and_settled_waits_for_it(tmp_path: Path) -> None:
    store = Store(tmp_path / "server.sqlite")
    journal = Journal(store.db)

    async def handler(i: int) -> int:
        journal.write(1, "advertise", f"p{i}", bytes(64))
        seen = _on_disk(tmp_path / "server.sqlite")  # written, not committed yet
        await journal.settled()
        return seen

    async def main() -> list[int]:
        return await asyncio.gather(*[handler(i) for i in range(50)])

    before = asyncio.run(main())
    assert before == [0] * 50
    assert _on_disk(tmp_path / "server.sqlite") == 50 and journal.commits == 1
    journal.end(1)  # outside a loop: at once
    assert _on_disk(tmp_path / "server.sqlite") == 0 and journal.commits == 2
    store.close()


def test_a_failed_commit_fails_every_waiter_and_keeps_nothing(tmp_path: Path) -> None:
    store = Store(tmp_path / "server.sqlite")
    journal = Journal(store.db)

    async def main() -> None:
        journal.write(1, "advertise", "p0", bytes(64))
        journal._queue.append(("INSERT INTO no_such_table VALUES (1)", ()))
        with pytest.raises(sqlite3.OperationalError):
            await journal.settled()

    asyncio.run(main())
    assert _on_disk(tmp_path / "server.sqlite") == 0
    store.close()


async def test_a_round_commits_fewer_transactions_than_messages(make_server: MakeClient) -> None:
    n = 12
    client = await make_server(min_cohort=n, **SECURE)
    phones, task = await _cohort(client, n)
    outcomes = await _round(client, phones, task, {})  # every message acknowledged
    assert all(isinstance(o, SecureOutcome) for o in outcomes), outcomes
    journal = client.app[COORD].secure.journal  # type: ignore[attr-defined]
    messages = 4 * n + 1  # advertise, share, masked, unmask per phone, and the round's header
    assert 0 < journal.commits < messages / 2
