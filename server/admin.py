"""Admin endpoints (``Authorization: Bearer ADMIN_TOKEN``): pause, resume, change the plan.

A plan change is durable: the fields an admin changed are kept in the store (meta ``admin_plan``)
and laid over the start-up configuration when the server starts again on the same data dir. The
admin's change is the later decision, so it wins over a start-up flag or TOML value for the same
field; ``DELETE /v1/admin/plan`` forgets every change and returns to the start-up plan.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

from aiohttp import web

from fedfleet.protocol.plan import PLAN_FIELDS, InvalidPlan, check_plan_value
from fedfleet.server.config import ServerConfig
from fedfleet.server.http import check_admin, fail, json_response, read_json
from fedfleet.server.state import CONFIG, COORD, STORE, WORK
from fedfleet.server.store import Store

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
PLAN_META = "admin_plan"  # the store's meta key: the JSON object of every field an admin changed


class StoredPlanConflict(ValueError):
    """An admin's stored plan change does not fit the start-up configuration. The CLI reports it in one line."""


def stored_plan(store: Store) -> dict[str, Any]:
    """The plan fields an admin changed on this data dir ({} if none)."""
    return dict(json.loads(store.get_meta(PLAN_META) or "{}"))


def with_stored_plan(config: ServerConfig, store: Store) -> ServerConfig:
    """``config`` with the admin's stored plan changes laid over it (they win: they came later).
    A stored change that no longer fits the start-up configuration (a lower ``max_checkin_retry_s``)
    is a ``StoredPlanConflict`` naming it: the operator decides, not a silent drop."""
    plan = stored_plan(store)
    if not plan:
        return config
    try:
        check_plan(plan, config)
        return config.replace(**plan)
    except (web.HTTPException, TypeError, ValueError) as exc:
        words = json.loads(exc.text or "{}")["message"] if isinstance(exc, web.HTTPException) else str(exc)
        raise StoredPlanConflict(f"the admin's plan change {plan} stored in the data dir does not fit this configuration "
                         f"({words}); clear it with DELETE /v1/admin/plan on a server started without the "
                         "conflicting setting, or use a fresh --data-dir") from None


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
    store = request.app[STORE]
    store.set_meta(PLAN_META, json.dumps({**stored_plan(store), **body}))  # durable before the answer
    request.app[COORD].config = config  # the app's CONFIG key is frozen; the coordinator reads its own
    request.app[WORK].notify()  # held check-ins look again: the new plan may have ended the task
    return json_response({"train": config.train_plan(), "rounds": config.rounds})


async def forget_plan(request: web.Request) -> web.Response:
    """Forget every stored plan change: back to the start-up plan, now and after a restart."""
    check_admin(request, request.app[CONFIG].admin_token)
    request.app[STORE].set_meta(PLAN_META, "{}")
    config = request.app[CONFIG]
    request.app[COORD].config = config
    request.app[WORK].notify()
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
        web.delete("/v1/admin/plan", forget_plan),
        web.get("/v1/admin/phones", phones),
    ]
