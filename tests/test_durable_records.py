"""A published version and its round record cannot be separated by kill -9: a real ``fedfleet
serve`` process, a real SQLite file, killed after version 1 is committed and before its record is
written (its evaluation is held by a gated ``--metrics`` hook, tests/eval_gate.py); the restarted
server evaluates and records round 1 (``recovered``), and metrics.jsonl holds each round once."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bench.bench_faults import ServerProcess
from tests.conftest import update_body, zero_delta


async def _wait_for(http: aiohttp.ClientSession, url: str, ok: Any, timeout_s: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        async with http.get(url) as r:
            body = await r.json()
        if ok(body):
            return dict(body)
        await asyncio.sleep(0.005)
    raise TimeoutError(f"{url}: {body}")


async def _contribute(http: aiohttp.ClientSession, url: str, auth: dict[str, str], task: dict[str, Any],
                      base: int) -> None:
    async with http.post(f"{url}/v1/checkin", headers=auth) as r:
        assert (await r.json())["action"] == "train"
    body = update_body(task, zero_delta(task, 0.01 * (base + 1)), update_id=f"u{base}", base_version=base,
                       round=base + 1)
    async with http.post(f"{url}/v1/update", data=body, headers=auth) as r:
        assert r.status == 200, await r.text()


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
async def test_kill_9_between_a_version_and_its_record_loses_no_round(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    state, gate = tmp_path / "state", tmp_path / "evaluation-gate"
    monkeypatch.setenv("FEDFLEET_TEST_EVAL_GATE", str(gate))  # the server processes inherit it
    server = ServerProcess(state, "digits", {"rounds": 0, "sample_fraction": 1.0, "round_timeout_s": 3600.0,
                                             "metrics": "tests.eval_gate:gated_accuracy"})
    metrics = state / "metrics.jsonl"
    try:
        await server.start()
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{server.url}/v1/register", json={"name": "solo"}) as r:
                reg = await r.json()
            auth, task = {"Authorization": f"Bearer {reg['token']}"}, reg["task"]
        server.stop()  # a fresh start imports torch (version 0); a restart loads it at the first evaluation
        await server.start()
        gate.touch()  # version 1's evaluation waits from now on
        async with aiohttp.ClientSession() as http:
            await _contribute(http, server.url, auth, task, 0)  # the round's only phone: merged at once
            await _wait_for(http, f"{server.url}/v1/status", lambda s: s["version"] == 1)
            server.kill9()  # version 1 is committed (the loop answered after the commit); its evaluation is not
        gate.unlink()
        assert not metrics.exists(), "the kill came after round 1 was recorded: nothing tested"
        with sqlite3.connect(state / "server.sqlite") as db:
            assert db.execute("SELECT MAX(version) FROM versions").fetchone()[0] == 1
        with metrics.open("w") as f:  # and a line torn by a kill in the middle of a write
            f.write('{"round": 1, "vers')

        await server.start()
        async with aiohttp.ClientSession() as http:
            got = await _wait_for(http, f"{server.url}/v1/rounds", lambda b: len(b["rounds"]) >= 1)
            (first,) = got["rounds"]
            assert first["round"] == 1 and first["version"] == 1 and first["updates"] == 1
            assert first["recovered"] is True and first["accuracy"] is not None and first["loss"] is not None
            assert first["mode"] == "sync" and first["bytes_up"] > 0  # as recorded at the merge
            assert _lines(metrics) == [first]
            await _contribute(http, server.url, auth, task, 1)
            got = await _wait_for(http, f"{server.url}/v1/rounds", lambda b: len(b["rounds"]) >= 2)
            assert [r["round"] for r in got["rounds"]] == [1, 2] and "recovered" not in got["rounds"][1]
            assert got["rounds"][1]["accuracy"] is not None
            assert _lines(metrics) == got["rounds"]
        server.stop()
        with sqlite3.connect(state / "server.sqlite") as db:
            stored = [json.loads(r) for (r,) in db.execute("SELECT record FROM rounds ORDER BY round")]
        assert stored == got["rounds"]  # no draft left behind
    finally:
        server.stop()
    assert server.unhandled_errors() == 0, server.log_text()[-2000:]
