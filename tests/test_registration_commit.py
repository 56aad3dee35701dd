"""Registrations share the group commit: a phone gets its token only once its row is committed."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from fedfleet.server.state import STORE
from fedfleet.server.store import NameTaken, Store
from tests.conftest import MakeClient


class PhoneCommits:
    """Counts the transactions that insert phones, on every connection it watches (a statement
    outside BEGIN ... COMMIT is a transaction of its own: autocommit)."""

    def __init__(self, *dbs: sqlite3.Connection) -> None:
        self.count = 0
        self._lock = threading.Lock()
        for db in dbs:
            db.set_trace_callback(self._watcher())

    def _watcher(self) -> Callable[[str], None]:
        state = {"open": False, "phones": False}

        def trace(sql: str) -> None:
            verb = sql.lstrip().split(None, 1)[0].upper()
            phones = sql.lstrip().upper().startswith("INSERT INTO PHONES")
            with self._lock:
                if verb == "BEGIN":
                    state.update(open=True, phones=False)
                elif verb in ("COMMIT", "END"):
                    self.count += state["phones"]
                    state.update(open=False, phones=False)
                elif verb == "ROLLBACK" and not sql.upper().startswith("ROLLBACK TO"):
                    state.update(open=False, phones=False)
                elif phones and state["open"]:
                    state["phones"] = True
                elif phones:
                    self.count += 1

        return trace


@contextmanager
def slow_disk(store: Store) -> Iterator[threading.Event]:
    """Hold the writer thread until the event is set (at the latest when the block ends)."""
    assert store.commits._writer is not None
    gate = threading.Event()
    store.commits._writer.submit(gate.wait)
    try:
        yield gate
    finally:
        gate.set()


async def test_a_burst_of_registrations_shares_commits_and_survives_a_restart(
        make_server: MakeClient, tmp_path: Path) -> None:
    client = await make_server(data_dir=str(tmp_path))
    store = client.app[STORE]
    assert store.commits._wdb is not None
    commits = PhoneCommits(store.db, store.commits._wdb)
    n = 100

    async def register(i: int) -> tuple[str, str]:
        resp = await client.post("/v1/register", json={"name": f"p{i}"})
        assert resp.status == 201, await resp.text()
        body = await resp.json()
        return body["phone_id"], body["token"]

    phones = await asyncio.gather(*(register(i) for i in range(n)))
    assert len({token for _, token in phones}) == n
    assert 1 <= commits.count <= n // 4, f"{commits.count} transactions for {n} registrations"
    for _, token in phones:  # each token authenticates
        resp = await client.get("/v1/model", headers={"Authorization": f"Bearer {token}"})
        assert resp.status == 200, await resp.text()
    assert (await (await client.get("/v1/status")).json())["phones"] == n
    await client.close()  # the server shuts down: its store is closed
    reopened = Store(tmp_path / "server.sqlite")
    try:
        assert reopened.phone_count() == n
        assert [reopened.phone_for_token(token) for _, token in phones] == [p for p, _ in phones]
    finally:
        reopened.close()


async def test_two_registrations_of_one_name_one_wins(make_server: MakeClient, tmp_path: Path) -> None:
    client = await make_server(data_dir=str(tmp_path))
    for attempt in range(3):
        name = f"twin{attempt}"
        resps = await asyncio.gather(*(client.post("/v1/register", json={"name": name}) for _ in range(2)))
        assert sorted(r.status for r in resps) == [201, 409]
        loser = next(r for r in resps if r.status == 409)
        assert (await loser.json())["error"] == "name_taken"
    again = await client.post("/v1/register", json={"name": "twin0"})
    assert again.status == 409  # committed names are refused too


async def test_no_token_when_the_commit_fails(make_server: MakeClient, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    client = await make_server(data_dir=str(tmp_path))
    store = client.app[STORE]
    assert store.commits._writer is not None and store.commits._wdb is not None
    store.commits._writer.submit(store.commits._wdb.close).result()  # the writer's connection is gone: commits fail
    monkeypatch.setattr("fedfleet.server.routes.secrets.token_urlsafe", lambda _: "the-token")
    resp = await client.post("/v1/register", json={"name": "p"})
    assert resp.status == 503, await resp.text()
    assert (await resp.json())["error"] == "storage_unavailable"
    auth = {"Authorization": "Bearer the-token"}
    assert (await client.post("/v1/checkin", headers=auth, json={})).status == 401
    assert store.phone_count() == 0
    store.commits._wdb = store.commits._writer.submit(store.commits._open_writer, "full").result()  # the disk is back
    resp = await client.post("/v1/register", json={"name": "p"})  # the failed name is free again
    assert resp.status == 201, await resp.text()
    assert (await client.post("/v1/checkin", headers=auth, json={})).status == 200


async def test_registrations_queued_meanwhile_go_in_the_next_single_commit(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite")
    assert store.commits._writer is not None and store.commits._wdb is not None
    commits = PhoneCommits(store.db, store.commits._wdb)
    with slow_disk(store) as gate:  # the first group commit waits behind it
        first = store.enrol("a0", "t-a0", {})
        await asyncio.sleep(0)  # its flush hands it to the writer
        later = []
        for i in range(1, 20):  # each in a pass of the loop of its own
            later.append(store.enrol(f"a{i}", f"t-a{i}", {"public_key": "AAAA"}))
            await asyncio.sleep(0)
        assert store.phone_for_token("t-a0") is None  # not committed: unknown
        with pytest.raises(NameTaken):
            store.enrol("a5", "t-other", {})  # queued, not committed: still taken
        gate.set()
        await asyncio.gather(first, *later)
    assert commits.count == 2  # one for the first, one for all 19 queued while it was written
    assert store.phone_count() == 20 and store.phone_for_token("t-a7") == "a7"
    assert store.public_key("a7") == b"\0\0\0"
    with pytest.raises(NameTaken):
        store.enrol("a5", "t-other", {})  # committed: taken
    store.close()


async def test_a_row_taken_behind_the_checks_back_fails_alone(tmp_path: Path) -> None:
    """A name taken by another writer after the check: the batch falls back to row-by-row
    inserts, so only that registration is refused."""
    store = Store(tmp_path / "s.sqlite")
    with slow_disk(store) as gate:
        futs = [store.enrol(name, f"t-{name}", {}) for name in ("x", "y", "z")]
        other = sqlite3.connect(tmp_path / "s.sqlite", isolation_level=None)
        other.execute("INSERT INTO phones(phone_id, token_sha256, registered, info) VALUES ('y', 'h', 0, '{}')")
        other.close()
        gate.set()
        results = await asyncio.gather(*futs, return_exceptions=True)
    assert results[0] is None and isinstance(results[1], NameTaken) and results[2] is None
    assert store.phone_for_token("t-x") == "x" and store.phone_for_token("t-y") is None
    store.close()


async def test_close_commits_what_is_queued_and_a_version_commit_leaves_phones_alone(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite")
    phone = store.enrol("q", "t-q", {})
    acked = store.add_pending("q", "u1", {"examples": 1}, b"wire")
    store.save_version(1, b"model")  # takes the pending row; the phone waits for the flush
    assert acked is not None and acked.done() and not phone.done()
    store.close()  # before the loop ran the flush: committed here
    assert phone.done() and phone.exception() is None
    reopened = Store(tmp_path / "s.sqlite")
    assert reopened.phone_for_token("t-q") == "q" and reopened.phone_count() == 1
    assert [(p, u) for p, u, _, _ in reopened.pending()] == [("q", "u1")]
    reopened.close()


async def test_in_memory_store_commits_on_the_loop(tmp_path: Path) -> None:
    store = Store()
    futs = [store.enrol(f"m{i}", f"t{i}", {}) for i in range(3)]
    await asyncio.gather(*futs)
    assert store.phone_count() == 3 and store.phone_for_token("t2") == "m2"
    store.close()
