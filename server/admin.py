"""Admin endpoints (``Authorization: Bearer ADMIN_TOKEN``): pause, resume, change the plan."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from aiohttp import web

from fedfleet.protocol.plan import PLAN_FIELDS, InvalidPlan, check_plan_value
from fedfleet.server.config import ServerConfig
from fedfleet.server.http import check_admin, fail, json_response, read_json
from fedfleet.server.state import CONFIG, COORD, STORE, WORK

Check = Callable[[Any, ServerConfig], bool]


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not 1


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


# What an admin may change, and what each value must be: the training plan's fields as the protocol
# defines them (protocol/plan.py: what phones accept in a task), and the server's own settings below.
# Checked in full before anything changes.
PLAN_LIMITS: dict[str, tuple[Check, str]] = {
    "rounds": (lambda v, _: _whole(v) and v >= 0, "a whole number >= 0 (0 = until stopped)"),
    "checkin_retry_s": (lambda v, c: _number(v) and 0 <= v <= c.max_checkin_retry_s,
                        "a number of seconds from 0 to max_checkin_retry_s ({limit:g})"),
}
PLAN_KEYS = (*PLAN_FIELDS, *PLAN_LIMITS)


def check_plan(body: dict[str, Any], config: ServerConfig) -> None:
    """400 naming the first plan field that is unknown or out of its limits."""
    unknown = sorted(set(body) - set(PLAN_KEYS))
    if unknown:
        fail(400, "bad_plan", f"cannot change {unknown}; changeable: {list(PLAN_KEYS)}")
    for name, value in body.items():
        if name in PLAN_FIELDS:
            try:
                check_plan_value(name, value)
            except InvalidPlan as exc:
                fail(400, "bad_plan", str(exc))
            continue
        ok, words = PLAN_LIMITS[name]
        if not ok(value, config):
            shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:40] + "..."
            fail(400, "bad_plan", f"{name} must be {words.format(limit=config.max_checkin_retry_s)}, got {shown}")


async def pause(request: web.Request) -> web.Response:
    check_admin(request, request.app[CONFIG].admin_token)
    request.app[COORD].paused = True
    return json_response({"paused": True})


async def resume(request: web.Request) -> web.Response:
    check_admin(request, request.app[CONFIG].admin_token)
    request.app[COORD].paused = False
    return json_response({"paused": False})


async def plan(request: web.Request) -> web.Response:
    """Change the training plan of future tasks, e.g. ``{"lr": 0.05, "rounds": 40}``."""
    check_admin(request, request.app[CONFIG].admin_token)
    body = await read_json(request)
    current = request.app[COORD].config
    check_plan(body, current)
    try:
        config = current.replace(**body)
    except (TypeError, ValueError) as exc:
        fail(400, "bad_plan", str(exc))
    request.app[COORD].config = config  # the app's CONFIG key is frozen; the coordinator reads its own
    request.app[WORK].notify()  # held check-ins look again: the new plan may have ended the task
    return json_response({"train": config.train_plan(), "rounds": config.rounds})


async def phones(request: web.Request) -> web.Response:
    check_admin(request, request.app[CONFIG].admin_token)
    store = request.app[STORE]
    return json_response({"count": store.phone_count(), "phones": store.phone_ids()})


def admin_routes() -> list[web.RouteDef]:
    return [
        web.post("/v1/admin/pause", pause),
        web.post("/v1/admin/resume", resume),
        web.post("/v1/admin/plan", plan),
        web.get("/v1/admin/phones", phones),
    ]
