"""Churn: phones that vanish mid-body cost the server nothing (zero 5xx, no state change), and
the round merges exactly the acknowledged updates (the model equals an offline numpy FedAvg).
The 500-phone version is ``python -m bench.bench_faults churn``."""

from __future__ import annotations

import asyncio

import aiohttp

from bench.bench_faults import (
    TOLERANCE,
    Update,
    checkin,
    churn_plan,
    churn_settings,
    post_update,
    raw_post,
    register,
    run_churn,
    running_app,
    scrape,
    server_statuses,
)


async def test_churn_30_percent_dropped_mid_body() -> None:
    plan = churn_plan(40, 0.3, seed=1)
    assert len(plan.dropped) == 12 and len(plan.retried) == 6
    async with running_app(**churn_settings(plan)) as url:
        r = await run_churn(url, plan)
    assert r["client"] == {"2xx": plan.completing, "4xx": 0, "5xx": 0}
    assert r["server_5xx"] == 0, r["server_statuses"]  # also the answers to phones that had gone away
    assert r["incomplete_body"] > 0  # drops reached the handler mid-body, not only refused connections
    assert r["acked"] == r["merged"] == plan.completing and r["duplicates"] == 0
    assert r["version"] == 1
    # The check can tell: leaving out the lightest acknowledged update moves the model far more.
    assert r["max_abs_diff"] <= TOLERANCE < r["one_update_effect"], r


async def test_a_dropped_body_is_a_4xx_and_changes_nothing() -> None:
    async with running_app(sample_fraction=1.0) as url, aiohttp.ClientSession() as http:
        port = int(url.rsplit(":", 1)[1])
        phone, task = await register(http, url, "p")
        assert (await checkin(http, url, phone))["action"] == "train"
        upd = Update(0, "u1", 0, 10, (0,))
        body = upd.body(task["params"])
        for cut, how in [(0, "fin"), (7, "fin"), (len(body) // 2, "reset"), (len(body) - 1, "fin")]:
            await raw_post(port, "/v1/update", phone.headers(), body, cut, how, stall_s=0.05)
        for _ in range(100):  # the server notices each closed connection on its own schedule
            async with http.get(f"{url}/v1/status") as resp:
                status = await resp.json()
            if sum(status["rejections"].values()) >= 4:
                break
            await asyncio.sleep(0.02)
        assert status["rejections"] == {"incomplete_body": 4}
        assert status["updates_in_round"] == 0 and status["version"] == 0
        assert server_statuses(await scrape(http, url), "/v1/update") == {400: 4}
        # The complete update is then new: nothing of the dropped copies was kept.
        code, answer = await post_update(http, url, phone, upd, body)
        assert code == 200 and answer["duplicate"] is False
