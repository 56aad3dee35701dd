"""The fleet's watch on the server's round records: when the run is over, and what it merged."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiohttp

from fedfleet.device_runtime.fleet_plan import FleetConfig
from fedfleet.device_runtime.fleet_result import FleetError, FleetResult, ServerGone, _why

MONITOR_TIMEOUT = aiohttp.ClientTimeout(total=30)  # one poll of the round records
MONITOR_MAX_BACKOFF_S = 5.0  # between polls of a server that does not answer
MONITOR_GIVE_UP = 4  # failed polls in a row, once the phones have stopped, before the server counts as gone


async def _monitor(
    session: aiohttp.ClientSession,
    server: str,
    cfg: FleetConfig,
    on_round: Callable[[dict[str, Any]], None],
    stop: asyncio.Event,
    phones_done: asyncio.Event,
    virtual: bool = False,
    *,
    joined: list[int] | None = None,
) -> list[dict[str, Any]]:
    """Poll the server's round records; set ``stop`` when the run is over. When the phones
    stop first (``hours`` elapsed, or they heard "done"), wait until every merge the server made
    is recorded (GET /v1/status), then return.
    On a virtual clock a finished server does not stop the phones: each leaves when its own next
    check-in hears "done". Stopped by this wall-clock poll, how many had checked in after the last
    merge depended on the machine's load (devices.csv differed between runs of one seed).

    Only the rounds merged after the fleet joined are reported and counted (``max_rounds`` of
    them): those the server had merged already (GET /v1/status, before any phone registers; put
    in ``joined``) are another fleet's. A server that does not answer (killed, restarting on its
    data dir) is polled again with backoff for as long as the phones run; once they have
    stopped, ``ServerGone`` (its ``result`` holding the rounds seen) after MONITOR_GIVE_UP
    failures in a row."""
    url = server.rstrip("/")
    seen: list[dict[str, Any]] = []
    failures = 0

    async def get(path: str, params: dict[str, str] | None = None) -> dict[str, Any]:
        nonlocal failures
        while True:
            try:
                async with session.get(url + path, params=params, timeout=MONITOR_TIMEOUT) as resp:
                    if 400 <= resp.status < 500:
                        raise FleetError(f"GET {url}{path} answered {resp.status} {resp.reason}",
                                         FleetResult(seen, []))
                    resp.raise_for_status()  # 5xx: retried
                    answer = await resp.json()
                failures = 0
                if not isinstance(answer, dict):
                    raise FleetError(f"GET {url}{path} did not answer a JSON object", FleetResult(seen, []))
                return answer
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                failures += 1
                if phones_done.is_set() and failures >= MONITOR_GIVE_UP:
                    raise ServerGone(f"the server at {url} stopped answering ({_why(exc)})",
                                     FleetResult(seen, [])) from None
                await asyncio.sleep(min(cfg.poll_s * 2 ** min(failures, 8), MONITOR_MAX_BACKOFF_S))

    status = await get("/v1/status")
    since = max(int(status.get("round", 1)) - 1, 0)
    if joined is not None:
        joined.append(since)
    quiet = 0
    while True:
        answer = await get("/v1/rounds", {"since": str(since)})
        for row in answer["rounds"]:
            if cfg.max_rounds and len(seen) >= cfg.max_rounds:
                break  # merged in the same poll as the fleet's last: not its own any more
            seen.append(row)
            on_round(row)
        if seen:
            since = seen[-1]["round"]
        quiet = quiet + 1 if phones_done.is_set() and not answer["rounds"] else 0
        if answer["finished"] and virtual:
            return seen
        # Phones gone and nothing new twice in a row: over once every merge the server made is recorded
        # (its publisher evaluates each first: a server just restarted imports torch for that, ~4 s).
        settled = quiet >= 2 and since >= int((await get("/v1/status")).get("round", 1)) - 1
        if answer["finished"] or (cfg.max_rounds and len(seen) >= cfg.max_rounds) or settled:
            stop.set()  # phones leave after their current step
            return seen
        await asyncio.sleep(cfg.poll_s)
