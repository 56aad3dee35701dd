"""POST /v1/admin/plan checks every field as the phones will (TrainConfig) before anything changes:
a refused plan answers 400 naming the field and leaves the tasks handed out as they were."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from fedfleet.device_runtime.runtimes.base import TrainConfig
from fedfleet.protocol.plan import MAX_BATCH_SIZE, MAX_LOCAL_EPOCHS
from tests.conftest import MakeClient, register, update_body

ADMIN = {"Authorization": "Bearer s3cret"}
BAD = [
    ({"batch_size": 0}, "batch_size"), ({"batch_size": MAX_BATCH_SIZE + 1}, "batch_size"),
    ({"batch_size": 8.0}, "batch_size"), ({"batch_size": "8"}, "batch_size"), ({"batch_size": True}, "batch_size"),
    ({"local_epochs": 1_000_000}, "local_epochs"), ({"local_epochs": 0}, "local_epochs"),
    ({"local_epochs": None}, "local_epochs"), ({"lr": True}, "lr"), ({"lr": "fast"}, "lr"), ({"lr": 0}, "lr"),
    ({"lr": -0.1}, "lr"), ({"lr": [0.1]}, "lr"), ({"prox_mu": -1}, "prox_mu"), ({"prox_mu": False}, "prox_mu"),
    ({"rounds": -1}, "rounds"), ({"rounds": 2.5}, "rounds"), ({"checkin_retry_s": -1}, "checkin_retry_s"),
    ({"checkin_retry_s": 1e12}, "checkin_retry_s"), ({"lr": 0.01, "batch_size": 0}, "batch_size"),
    ({"model": "cnn"}, "model"),
]


async def _task(client: Any, auth: dict[str, str]) -> dict[str, Any]:
    answer = await (await client.post("/v1/checkin", headers=auth)).json()
    assert answer["action"] == "train", answer
    return dict(answer["train"])


async def test_a_refused_plan_names_its_field_and_changes_nothing(make_server: MakeClient) -> None:
    client = await make_server(admin_token="s3cret", sample_fraction=1.0, rounds=7)
    _, auth, _ = await register(client, "p")
    before = await _task(client, auth)
    for plan, field in BAD:
        resp = await client.post("/v1/admin/plan", json=plan, headers=ADMIN)
        body = await resp.json()
        assert resp.status == 400 and body["error"] == "bad_plan", (plan, body)
        assert field in body["message"], (plan, body)
    for raw in ('{"lr": NaN}', '{"lr": Infinity}'):  # Python's JSON reader takes these
        resp = await client.post("/v1/admin/plan", data=raw, headers={**ADMIN, "Content-Type": "application/json"})
        assert resp.status == 400 and "lr must be" in (await resp.json())["message"]
    assert await _task(client, auth) == before
    assert (await (await client.get("/v1/status")).json())["done"] is False  # rounds unchanged too


async def test_accepted_plans_accumulate_and_phones_can_train_them(make_server: MakeClient) -> None:
    client = await make_server(admin_token="s3cret", sample_fraction=1.0)
    _, auth, _ = await register(client, "p")
    for plan in ({"lr": 0.01}, {"batch_size": MAX_BATCH_SIZE, "local_epochs": MAX_LOCAL_EPOCHS},
                 {"prox_mu": 0, "checkin_retry_s": 0, "rounds": 0}):
        resp = await client.post("/v1/admin/plan", json=plan, headers=ADMIN)
        assert resp.status == 200, await resp.text()
    task = await _task(client, auth)
    assert (task["lr"], task["batch_size"], task["local_epochs"], task["prox_mu"]) == (
        0.01, MAX_BATCH_SIZE, MAX_LOCAL_EPOCHS, 0)  # an earlier change is not undone by a later one
    TrainConfig(**{k: task[k] for k in ("local_epochs", "batch_size", "lr", "prox_mu")})  # what a phone builds


async def test_a_phone_registering_after_a_plan_change_is_told_the_plan_in_force(make_server: MakeClient) -> None:
    client = await make_server(admin_token="s3cret", sample_fraction=1.0)
    before = await (await client.get("/v1/task")).json()
    resp = await client.post("/v1/admin/plan", json={"lr": 0.01, "batch_size": 4}, headers=ADMIN)
    assert resp.status == 200, await resp.text()
    answer = await (await client.post("/v1/register", json={"name": "late"})).json()
    assert (answer["task"]["train"]["lr"], answer["task"]["train"]["batch_size"]) == (0.01, 4)
    assert (await (await client.get("/v1/task")).json())["train"] == answer["task"]["train"] != before["train"]


@pytest.mark.parametrize("plan", [{"local_epochs": 1, "batch_size": 1, "lr": 5e-324, "prox_mu": 0.0},
                                  {"local_epochs": MAX_LOCAL_EPOCHS, "batch_size": MAX_BATCH_SIZE, "lr": 1e300,
                                   "prox_mu": 1e300}])
async def test_the_limits_are_inside_what_phones_accept(make_server: MakeClient, plan: dict[str, Any]) -> None:
    client = await make_server(admin_token="s3cret", sample_fraction=1.0)
    _, auth, _ = await register(client, "p")
    assert (await client.post("/v1/admin/plan", json=plan, headers=ADMIN)).status == 200
    task = await _task(client, auth)
    TrainConfig(**{k: task[k] for k in plan})


async def test_a_plan_that_ends_the_task_answers_the_held_checkins_at_once(make_server: MakeClient) -> None:
    client = await make_server(admin_token="s3cret", rounds=0, sample_fraction=0.5, over_selection=1.0,
                               min_cohort=1, checkin_hold_s=30.0)
    _, auth_a, task = await register(client, "a")
    _, auth_b, _ = await register(client, "b")
    assert (await _task(client, auth_a))  # round 1's one seat
    resp = await client.post("/v1/update", data=update_body(task), headers=auth_a)
    assert resp.status == 200, await resp.text()  # round 1 merges: version 1, round 2 opens
    assert (await _task(client, auth_a))  # round 2's one seat
    held = asyncio.ensure_future(client.post("/v1/checkin", headers=auth_b))  # no seat: held up to 30 s
    await asyncio.sleep(0.3)
    assert not held.done()
    t0 = time.monotonic()
    resp = await client.post("/v1/admin/plan", json={"rounds": 1}, headers=ADMIN)  # the task is now done
    assert resp.status == 200, await resp.text()
    answer = await (await asyncio.wait_for(held, 5.0)).json()
    assert answer["action"] == "done" and time.monotonic() - t0 < 5.0, answer
