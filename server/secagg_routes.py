"""HTTP handlers of secure aggregation's four steps (FORMAT.md section 12; server/secagg.py).

Every message names its round (sync: the open round; async: the number of the phone's group,
its task's ``round``); a message for another round or group, a step not open, or from a phone
outside the group is a 400 ``wrong_step``. What phones POST is binary (``application/octet-stream``,
the round in the query: protocol/secagg/framing.py, and the packed masked values); the answers
are JSON with hex bytes. A GET for a step that
has not closed yet answers ``{"state": "wait", "retry_after_s": ...}``; one from a phone whose
group aborted ``{"state": "aborted", ...}`` (a state, not bad input), and that phone's other
messages a 400 ``below_threshold``. An advertisement that comes after the roster closed answers
``{"accepted": false}``.

    POST /v1/secagg/advertise?round=R   c_pk || s_pk, 64 bytes
    GET  /v1/secagg/roster?round=R      -> {"index", "params", "neighbours", "keys"}
    POST /v1/secagg/shares?round=R      sealed shares, 48 bytes per neighbour, increasing
    GET  /v1/secagg/inbox?round=R       -> {"shares": {sender: sealed}}
    POST /v1/secagg/masked?round=R      raw masked update
    GET  /v1/secagg/unmask?round=R      -> {"survivors", "dropped"}
    POST /v1/secagg/unmask?round=R      16-byte shares, one per inbox sender, increasing
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from fedfleet.protocol import MalformedMessage
from fedfleet.protocol.secagg import BelowThreshold, WrongStep
from fedfleet.protocol.secagg.framing import unpack_keys
from fedfleet.server.async_coordinator import AsyncCoordinator
from fedfleet.server.http import authenticate, json_response, read_body
from fedfleet.server.secagg import SecureGroup
from fedfleet.server.secagg_async import wrong_group
from fedfleet.server.state import CONFIG, COORD, STORE, WORK, schedule_merge
from fedfleet.server.sync_coordinator import SyncCoordinator

MAX_SHARES = 1 << 20  # a phone's keys or shares: its sealed shares are 48 bytes per neighbour (about 1 kB at k = 20)


def _lookup(request: web.Request, phone: str, number: Any, poll: bool = False) -> tuple[SecureGroup, str | None, bool]:
    """Group ``number`` (sync: the open round's; async: any live group), why ``phone``'s group
    aborted (None: it did not), and whether the phone was handed this group's task."""
    coord = request.app[COORD]
    if type(number) is not int:
        raise WrongStep(f"message for round {number!r}: a round is a whole number")
    if isinstance(coord, AsyncCoordinator) and coord.secure is not None:
        coord.tick()
        group = coord.secure.lookup(number)
        if group is None and poll:  # the phone's group is gone: a state, the phone checks in again
            group = SecureGroup(number, 0, 0, coord.secure.settings, coord.clock)
        if group is None:
            raise wrong_group(number)
        return group, coord.secure.abort_notice(phone, group), coord.secure.assigned(phone, number)
    if isinstance(coord, SyncCoordinator) and coord.secure is not None:
        group = coord.secure_group()
        if number != group.round:
            raise WrongStep(f"message for round {number!r}, the open round is {group.round}")
        return group, coord.secure.abort_notice(phone, group), phone in coord.round.cohort
    raise WrongStep("this server does not run secure aggregation")


def _group(request: web.Request, round_number: Any, poll: bool = False) -> tuple[str, SecureGroup, str | None]:
    """The phone, its round's group, and why the phone's previous group aborted (None: it did
    not, or the phone is in the round's new group)."""
    phone = authenticate(request, request.app[STORE])
    group, aborted, _ = _lookup(request, phone, round_number, poll)
    return phone, group, aborted


def _member(request: web.Request, round_number: Any) -> tuple[str, SecureGroup]:
    """For a step's message: a phone whose group aborted gets 400 ``below_threshold``."""
    phone, group, aborted = _group(request, round_number)
    if aborted:
        raise BelowThreshold(aborted)
    return phone, group


async def _poll(request: web.Request, answer_for: Any) -> web.Response:
    """A GET for a step's result: ready, wait, or (not an error: a state) aborted."""
    phone, group, aborted = _group(request, _round_query(request), poll=True)
    if aborted is None and phone not in group.keys:  # e.g. after a server restart lost the group
        aborted = f"{phone} is not in {group.name}; check in again"
    if aborted:
        return await _durable(request, {"state": "aborted", "error": "below_threshold", "message": aborted})
    answer = answer_for(group, phone)
    return await _durable(request, _wait(request) if answer is None else {"state": "ready", **answer})


def _round_query(request: web.Request) -> int:
    text = request.query.get("round", "")
    if not text.isdigit():
        raise MalformedMessage("query parameter round must be a whole number")
    return int(text)


def _wait(request: web.Request) -> dict[str, Any]:
    return {"state": "wait", "retry_after_s": request.app[CONFIG].checkin_retry_s}


async def _durable(request: web.Request, answer: dict[str, Any]) -> web.Response:
    """Answer once every secure-group message written so far is committed (server/secagg_journal.py):
    the phone's own, and those of other phones that the answer reveals."""
    secure = getattr(request.app[COORD], "secure", None)
    if secure is not None:
        await secure.journal.settled()
    return json_response(answer)


def _after(request: web.Request, group: SecureGroup) -> None:
    """A step may have closed: merge a finished group, wake held check-ins after an abort."""
    coord = request.app[COORD]
    if coord.ready():
        schedule_merge(request.app)
    elif group.step == "aborted":
        coord.tick()
        request.app[WORK].notify()


async def advertise(request: web.Request) -> web.Response:
    phone = authenticate(request, request.app[STORE])
    group, _, assigned = _lookup(request, phone, _round_query(request))  # a phone of an aborted group may join the next
    body = await read_body(request, MAX_SHARES, request.app[CONFIG].request_timeout_s)
    if not assigned:
        raise WrongStep(f"{phone} has no task in round {group.round}; check in first")
    if group.step != "advertise" and phone not in group.keys:  # came too late: a race, not bad input
        return await _durable(request, {"accepted": False, "step": group.step})
    group.advertise(phone, unpack_keys(body))
    return await _durable(request, {"accepted": True, "step": group.step})


async def roster(request: web.Request) -> web.Response:
    return await _poll(request, lambda group, phone: group.roster_for(phone))


async def shares(request: web.Request) -> web.Response:
    phone, group = _member(request, _round_query(request))
    body = await read_body(request, MAX_SHARES, request.app[CONFIG].request_timeout_s)
    group.share_packed(phone, body)
    _after(request, group)
    return await _durable(request, {"accepted": True, "step": group.step})


async def inbox(request: web.Request) -> web.Response:
    return await _poll(request, lambda group, phone: group.inbox_for(phone))


async def masked(request: web.Request) -> web.Response:
    cfg = request.app[CONFIG]
    phone, group = _member(request, _round_query(request))
    body = await read_body(request, cfg.max_update_bytes, cfg.request_timeout_s)
    group.upload(phone, body)
    _after(request, group)
    return await _durable(request, {"accepted": True, "step": group.step})


async def unmask_request(request: web.Request) -> web.Response:
    return await _poll(request, lambda group, phone: group.unmask_request_for(phone))


async def unmask(request: web.Request) -> web.Response:
    phone, group = _member(request, _round_query(request))
    body = await read_body(request, MAX_SHARES, request.app[CONFIG].request_timeout_s)
    group.unmask_packed(phone, body)
    _after(request, group)
    return await _durable(request, {"accepted": True, "step": group.step})


def setup_secagg_routes(app: web.Application) -> None:
    app.router.add_routes([
        web.post("/v1/secagg/advertise", advertise),
        web.get("/v1/secagg/roster", roster),
        web.post("/v1/secagg/shares", shares),
        web.get("/v1/secagg/inbox", inbox),
        web.post("/v1/secagg/masked", masked),
        web.get("/v1/secagg/unmask", unmask_request),
        web.post("/v1/secagg/unmask", unmask),
    ])
