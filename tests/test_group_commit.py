"""Uploads arriving together share one commit, and none is acknowledged before it is durable."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

from fedfleet.server.store import Store
from tests.conftest import MakeClient, register, update_body, zero_delta


def _durable(db_path: Path, phone: str, update_id: str) -> bool:
    with sqlite3.connect(db_path) as db:  # a second connection sees only committed rows
        found = db.execute("SELECT 1 FROM pending WHERE phone = ? AND update_id = ? UNION "
                           "SELECT 1 FROM merged WHERE phone = ? AND update_id = ?",
                           (phone, update_id, phone, update_id)).fetchone()
    return found is not None


async def test_every_acknowledged_upload_is_already_committed(make_server: MakeClient, tmp_path: Path) -> None:
    client = await make_server(data_dir=str(tmp_path), mode="async", concurrency=64, buffer_size=7)
    phones = [await register(client, f"p{i}") for i in range(24)]
    for _, auth, _ in phones:
        assert (await (await client.post("/v1/checkin", headers=auth, json={})).json())["action"] == "train"
    db_path = tmp_path / "server.sqlite"

    async def upload(i: int) -> tuple[str, str, int]:
        phone, auth, task = phones[i]
        body = update_body(task, zero_delta(task, 0.01 * (i + 1)), update_id=f"u{i}")
        resp = await client.post("/v1/update", data=body, headers=auth)
        status = resp.status
        if status == 200:  # checked the moment the answer arrives, before anything else runs
            assert _durable(db_path, phone, f"u{i}"), f"u{i} acknowledged before it was committed"
        return phone, f"u{i}", status

    results = await asyncio.gather(*(upload(i) for i in range(len(phones))))
    assert [s for _, _, s in results] == [200] * len(phones)
    # retries of acknowledged updates are acknowledged again and change nothing
    again = await asyncio.gather(*(upload(i) for i in range(0, len(phones), 3)))
    assert {s for _, _, s in again} == {200}
    with sqlite3.connect(db_path) as db:
        pending = db.execute("SELECT COUNT(*) FROM pending").fetchone()[0]
        merged = db.execute("SELECT COUNT(*) FROM merged").fetchone()[0]
    assert pending + merged == len(phones)
    assert merged == 21 and pending == 3  # three merges of 7; the rest waits, durably


async def test_no_acknowledgement_when_the_commit_fails(make_server: MakeClient, tmp_path: Path) -> None:
    client = await make_server(data_dir=str(tmp_path), mode="async", concurrency=8, buffer_size=4)
    phone, auth, task = await register(client, "p")
    await client.post("/v1/checkin", headers=auth, json={})
    blocker = sqlite3.connect(tmp_path / "server.sqlite", timeout=0.1)
    blocker.execute("BEGIN IMMEDIATE")  # another writer holds the database: the server cannot commit
    try:
        resp = await client.post("/v1/update", data=update_body(task, update_id="u1"), headers=auth)
        assert resp.status == 503, await resp.text()
        assert (await resp.json())["error"] == "storage_unavailable"
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert not _durable(tmp_path / "server.sqlite", phone, "u1")
    status = await (await client.get("/v1/status")).json()
    assert status["buffered"] == 0  # forgotten in memory too
    resp = await client.post("/v1/update", data=update_body(task, update_id="u1"), headers=auth)
    assert resp.status == 200 and not (await resp.json())["duplicate"]  # the retry is a fresh acceptance
    assert _durable(tmp_path / "server.sqlite", phone, "u1")


async def test_a_merge_waits_for_pending_rows_still_being_written(tmp_path: Path) -> None:
    """Group commits run on a writer thread; a version commit that moves an update to the merged
    set must come after that update's pending row is written, or the row would outlive its merge
    (and a restart would merge it again)."""
    store = Store(tmp_path / "s.sqlite")
    gate = threading.Event()
    assert store.commits._writer is not None
    store.commits._writer.submit(gate.wait)  # keep the writer busy: the next group commit waits behind this
    acked = store.add_pending("p", "u1", {"examples": 1}, b"wire")
    assert acked is not None
    await asyncio.sleep(0)  # the loop runs the flush: the row is handed to the writer, not yet written
    assert store.commit_of("p", "u1") is acked and not acked.done()
    threading.Timer(0.2, gate.set).start()
    store.save_version(1, b"model", merged=[("p", "u1")])  # waits for the row, then moves it
    await acked
    assert store.pending() == [] and store.merged_version("p", "u1") == 1
    store.close()
