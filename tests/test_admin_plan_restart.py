"""Admin plan changes survive a restart: a real ``fedfleet serve`` process is killed (SIGKILL) and
started again on the same --data-dir, with a different start-up plan; the admin's change, the later
decision, wins until an admin forgets it (DELETE /v1/admin/plan)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bench.bench_faults import ServerProcess

ADMIN = {"Authorization": "Bearer s3cret"}
SETTINGS = {"rounds": 0, "sample_fraction": 1.0, "admin_token": "s3cret"}


async def _plan_of_a_task(http: aiohttp.ClientSession, url: str, name: str) -> dict[str, Any]:
    async with http.post(f"{url}/v1/register", json={"name": name}) as r:
        assert r.status == 201, await r.text()
        token = (await r.json())["token"]
    async with http.post(f"{url}/v1/checkin", json={}, headers={"Authorization": f"Bearer {token}"}) as r:
        answer = await r.json()
    assert answer["action"] == "train", answer
    return dict(answer["train"])


@pytest.mark.slow
async def test_an_admin_plan_change_survives_a_kill_and_beats_the_new_start_up_plan(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = ServerProcess(state, "synthetic:200", {**SETTINGS, "lr": 0.1, "batch_size": 32})
    second = ServerProcess(state, "synthetic:200", {**SETTINGS, "lr": 0.3, "batch_size": 8, "local_epochs": 1})
    try:
        await first.start()
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{first.url}/v1/admin/plan", json={"lr": 0.02}, headers=ADMIN) as r:
                assert r.status == 200, await r.text()
            async with http.post(f"{first.url}/v1/admin/plan", json={"local_epochs": 3}, headers=ADMIN) as r:
                assert r.status == 200, await r.text()
            first.kill9()  # no graceful shutdown: the change was durable when it was answered
            await second.start()  # same data dir, another start-up plan
            plan = await _plan_of_a_task(http, second.url, "a")
            assert (plan["lr"], plan["local_epochs"], plan["batch_size"]) == (0.02, 3, 8)  # admin's, admin's, flag's
            async with http.delete(f"{second.url}/v1/admin/plan") as r:
                assert r.status == 403  # admins only
            async with http.delete(f"{second.url}/v1/admin/plan", headers=ADMIN) as r:
                assert r.status == 200 and (await r.json())["train"]["lr"] == 0.3
            second.stop()
            await second.start()
            plan = await _plan_of_a_task(http, second.url, "b")
            assert (plan["lr"], plan["local_epochs"]) == (0.3, 1)  # forgotten for good: the start-up plan
    finally:
        first.stop()
        second.stop()


@pytest.mark.slow
async def test_a_stored_change_that_no_longer_fits_stops_the_start_in_one_line(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = ServerProcess(state, "synthetic:200", {**SETTINGS, "max_checkin_retry_s": 600.0})
    try:
        await first.start()
        async with aiohttp.ClientSession() as http, \
                http.post(f"{first.url}/v1/admin/plan", json={"checkin_retry_s": 300}, headers=ADMIN) as r:
            assert r.status == 200, await r.text()
    finally:
        first.stop()
    lower = ServerProcess(state, "synthetic:200", {**SETTINGS, "max_checkin_retry_s": 60.0})
    done = subprocess.run(lower.args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("fedfleet serve: error: the admin's plan change") and "checkin_retry_s" in line, line
