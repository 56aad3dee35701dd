"""A sync round stops counting phones that missed their appointment by more than the grace
(``cohort_grace_s``, by default the round timeout): through the real server on a manual clock."""

from __future__ import annotations

from typing import Any

from fedfleet.server.app import make_app
from fedfleet.server.config import ServerConfig
from tests.conftest import register, update_body

CFG = ServerConfig(model="mlp", input_shape=(1, 8, 8), num_classes=10, round_timeout_s=60.0, sample_fraction=0.5,
                   over_selection=1.0, checkin_retry_s=1.0, checkin_pace=0.0, rounds=5)


async def _checkin(client: Any, auth: dict[str, str]) -> dict[str, Any]:
    resp = await client.post("/v1/checkin", headers=auth, json={})
    assert resp.status == 200, await resp.text()
    return dict(await resp.json())


async def _upload(client: Any, auth: dict[str, str], task: dict[str, Any], base: int, uid: str) -> None:
    resp = await client.post("/v1/update", headers=auth, data=update_body(task, base_version=base, update_id=uid,
                                                                                 round=base + 1))
    assert resp.status == 200, await resp.text()


async def _status(client: Any) -> dict[str, Any]:
    return dict(await (await client.get("/v1/status")).json())


async def _four_phones_one_round(client: Any) -> list[tuple[str, dict[str, str], dict[str, Any]]]:
    """Round 1 (target 2 of 4): a and b train and upload; c and d are told to wait and never return."""
    phones = [await register(client, name) for name in "abcd"]
    answers = [await _checkin(client, auth) for _, auth, _ in phones]
    assert [a["action"] for a in answers] == ["train", "train", "wait", "wait"]
    for i in (0, 1):
        await _upload(client, phones[i][1], phones[i][2], 0, "r1")
    assert (await _status(client))["version"] == 1
    return phones


async def test_a_round_is_sized_on_the_phones_that_are_not_away(aiohttp_client: Any) -> None:
    now = [0.0]
    client = await aiohttp_client(make_app(CFG, clock=lambda: now[0]))
    phones = await _four_phones_one_round(client)
    now[0] += 5.0  # c and d are late, within the grace: still counted
    answer = await _checkin(client, phones[0][1])
    assert answer["action"] == "train" and (await _status(client))["target"] == 2
    now[0] += 120.0  # the round restarts empty; b, c and d are past their appointment by more than 60 s
    assert (await _status(client))["away"] == 4  # a too: its task's deadline passed 65 s ago
    answer = await _checkin(client, phones[0][1])  # a checks in: present again at once
    assert answer["action"] == "train"
    status = await _status(client)
    assert (status["away"], status["target"]) == (3, 1)  # ceil(0.5 x the 1 phone present), not ceil(0.5 x 4)
    await _upload(client, phones[0][1], phones[0][2], 1, "r2")
    assert (await _status(client))["version"] == 2  # merged at once: the round waited for no away phone


async def test_phones_unheard_of_since_the_start_are_away_after_the_grace(aiohttp_client: Any) -> None:
    """Phones that never check in (an emulated phone asleep outside its diurnal window) count as
    away once the grace since the server started has passed."""
    now = [0.0]
    client = await aiohttp_client(make_app(CFG, clock=lambda: now[0]))
    phones = [await register(client, name) for name in "abcd"]
    assert (await _status(client))["away"] == 0  # within the grace of the start
    now[0] += 61.0
    assert (await _status(client))["away"] == 4
    assert (await _checkin(client, phones[0][1]))["action"] == "train"
    status = await _status(client)
    assert (status["away"], status["target"]) == (3, 1)
    await _upload(client, phones[0][1], phones[0][2], 0, "r1")
    assert (await _status(client))["version"] == 1


async def test_infinite_grace_counts_every_phone(aiohttp_client: Any) -> None:
    now = [0.0]
    client = await aiohttp_client(make_app(CFG.replace(cohort_grace_s=float("inf")), clock=lambda: now[0]))
    phones = await _four_phones_one_round(client)
    now[0] += 120.0
    await _checkin(client, phones[0][1])
    assert (await _status(client))["target"] == 2


async def test_phones_checking_in_during_a_pause_are_not_away(aiohttp_client: Any) -> None:
    now = [0.0]
    client = await aiohttp_client(make_app(CFG.replace(admin_token="s3cret"), clock=lambda: now[0]))
    phones = [await register(client, name) for name in "abcd"]
    assert (await client.post("/v1/admin/pause", headers={"Authorization": "Bearer s3cret"})).status == 200
    for _ in range(3):  # a long pause: every phone keeps checking in, and is told to wait
        now[0] += 50.0
        for _, auth, _ in phones:
            assert (await _checkin(client, auth))["action"] == "wait"
    assert (await _status(client))["away"] == 0
    assert (await client.post("/v1/admin/resume", headers={"Authorization": "Bearer s3cret"})).status == 200
    assert (await _checkin(client, phones[0][1]))["action"] == "train"
    assert (await _status(client))["target"] == 2  # ceil(0.5 x 4): nobody was away
