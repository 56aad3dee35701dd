"""Admin endpoints (``Authorization: Bearer ADMIN_TOKEN``): pause, resume, change the plan."""

from __future__ import annotations

from aiohttp import web

from server.http import check_admin, fail, json_response, read_json
from server.state import CONFIG, COORD, STORE

PLAN_KEYS = ("local_epochs", "batch_size", "lr", "prox_mu", "rounds", "checkin_retry_s")


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
    unknown = sorted(set(body) - set(PLAN_KEYS))
    if unknown:
        fail(400, "bad_plan", f"cannot change {unknown}; changeable: {list(PLAN_KEYS)}")
    try:
        config = request.app[CONFIG].replace(**body)
    except (TypeError, ValueError) as exc:
        fail(400, "bad_plan", str(exc))
    request.app[COORD].config = config  # the app's CONFIG key is frozen; the coordinator reads its own
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
