"""A server shutting down answers its held check-ins (long polls) at once instead of waiting out
``checkin_hold_s`` for phones that may be gone, so that ``fedfleet simulate --hours`` does not end
~25 s after its phones have left."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
from aiohttp import web

from fedfleet.server.app import make_app
from fedfleet.server.config import ServerConfig


async def test_held_checkins_are_answered_when_the_server_shuts_down() -> None:
    cfg = ServerConfig(model="mlp", input_shape=(1, 8, 8), num_classes=10, round_timeout_s=60.0,
                       sample_fraction=0.5, over_selection=1.0, min_cohort=1, checkin_hold_s=30.0)
    runner = web.AppRunner(make_app(cfg))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    url = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as http:
        auths = []
        for name in ("a", "b"):
            async with http.post(f"{url}/v1/register", json={"name": name}) as resp:
                assert resp.status == 201
                auths.append({"Authorization": f"Bearer {(await resp.json())['token']}"})

        async def checkin(auth: dict[str, str]) -> dict[str, Any]:
            async with http.post(f"{url}/v1/checkin", json={}, headers=auth) as resp:
                assert resp.status == 200, await resp.text()
                answer: dict[str, Any] = await resp.json()
                return answer

        assert (await checkin(auths[0]))["action"] == "train"  # the round's one seat
        held = asyncio.create_task(checkin(auths[1]))  # no seat left: held up to 30 s
        await asyncio.sleep(0.3)
        assert not held.done()
        t0 = time.monotonic()
        await runner.cleanup()
        answer = await asyncio.wait_for(held, 5.0)
        assert answer["action"] == "wait", answer
        assert time.monotonic() - t0 < 10.0
