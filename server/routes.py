"""HTTP handlers. JSON for control, wire-format messages for tensors.

Every handler checks its input at the boundary and answers bad input with a 4xx JSON
error before the coordinator's state is touched.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import sqlite3
import weakref
from collections.abc import Callable
from typing import Any

from aiohttp import web

from fedfleet.protocol import FORMAT_VERSION, check_update_meta, decode_message
from fedfleet.protocol.signing import NONCE_HEADER, SIGNATURE_HEADER
from fedfleet.protocol.state import split_state
from fedfleet.server.admin import admin_routes
from fedfleet.server.bulk_registration import register_many
from fedfleet.server.config import ServerConfig
from fedfleet.server.coordinator import Coordinator
from fedfleet.server.enrolment import ENROLMENT, EnrolmentCodes, EnrolmentRefused
from fedfleet.server.http import (
    COUNTED_KEY,
    NAME_RE,
    NEW_UPDATE_KEY,
    JsonError,
    authenticate,
    check_body_headers,
    fail,
    json_response,
    read_body,
    read_json,
)
from fedfleet.server.ratelimit import check_registration_budget
from fedfleet.server.robust_math import update_norms
from fedfleet.server.security import SignatureError, parse_public_key
from fedfleet.server.state import (
    CONFIG,
    COORD,
    MODEL_FINGERPRINT,
    NONCES,
    STORE,
    UPLOADS,
    WORK,
    schedule_merge,
)
from fedfleet.server.store import NameTaken

# The task's JSON per coordinator, with the configuration it was made from: every registration sends
# it, and it changes only when an admin plan change gives the coordinator a new configuration.
_TASK_JSON: weakref.WeakKeyDictionary[Coordinator, tuple[ServerConfig, bytes]] = weakref.WeakKeyDictionary()


def task_spec_json(request: web.Request) -> bytes:
    """``task_spec`` as ``json_response`` would serialise it, made once per plan in force."""
    coord = request.app[COORD]
    cfg = coord.config  # the plan in force (POST /v1/admin/plan replaces it), as check-ins hand out
    cached = _TASK_JSON.get(coord)
    if cached is None or cached[0] is not cfg:
        cached = (cfg, json.dumps(task_spec(cfg, coord, request.app.get(MODEL_FINGERPRINT)),
                                  separators=(",", ":")).encode())
        _TASK_JSON[coord] = cached
    return cached[1]


def task_spec(cfg: ServerConfig, coord: Coordinator, fingerprint: str | None = None) -> dict[str, Any]:
    return {**_state_spec(cfg, coord),
        "format_version": FORMAT_VERSION,
        "mode": cfg.mode,
        "model": cfg.model,
        "input_shape": list(cfg.input_shape),
        "num_classes": cfg.num_classes,
        "params": [{"name": n, "shape": list(s.shape), "dtype": s.dtype} for n, s in coord.specs.items()],
        "train": cfg.train_plan(),
        "dp_delta": cfg.dp_delta,
        "bundle": cfg.bundle_dir is not None,
        "max_update_bytes": cfg.max_update_bytes,
        "rounds": cfg.rounds,
        "model_fingerprint": fingerprint,  # names, shapes, dtypes of the model's state (None: not known)
        "loss": cfg.loss or "cross_entropy",  # what phones train (export/task_loss.py); in the fingerprint too
    }


def _state_spec(cfg: ServerConfig, coord: Coordinator) -> dict[str, Any]:
    """A model with state: its tensors, and whether the model message ships them (FORMAT.md section 11)."""
    if not coord.state:
        return {}
    return {"state": [{"name": n, "shape": list(v.shape), "dtype": v.dtype.name} for n, v in coord.state.items()],
            "state_mode": "local" if cfg.local_state else "shared"}


async def register(request: web.Request) -> web.Response:
    check_registration_budget(request)  # server/ratelimit.py: per address, successful or not
    store = request.app[STORE]
    body = await read_json(request, timeout_s=request.app[CONFIG].request_timeout_s)
    name = body.get("name")
    info: dict[str, Any] = {k: str(body[k])[:64] for k in ("platform", "runtime") if k in body}
    if "public_key" in body:
        try:
            info["public_key"] = base64.b64encode(parse_public_key(body["public_key"])).decode()
        except SignatureError as exc:
            fail(400, exc.reason, exc.message)
    elif request.app[CONFIG].require_signatures:
        fail(400, "key_required", "this server requires an Ed25519 public_key at registration")
    check_model_fingerprint(body.get("model_fingerprint"), request.app.get(MODEL_FINGERPRINT))
    if name is None:
        phone_id = f"phone-{secrets.token_hex(6)}"
    elif not isinstance(name, str) or not NAME_RE.match(name):
        fail(400, "bad_name", "name must be 1-64 characters of letters, digits, '.', '_' or '-'")
    else:
        phone_id = name
    token = secrets.token_urlsafe(24)
    codes = request.app.get(ENROLMENT)  # server/enrolment.py: a single-use code from the admin, if required
    code = _claim_code(codes, body.get("enrolment_code"), info) if codes is not None else None
    registered = False
    try:
        await store.enrol(phone_id, token, info)  # the token is given only once the phone is committed
        registered = True
    except NameTaken:
        fail(409, "name_taken", f"a phone named {phone_id!r} is already registered")
    except sqlite3.Error as exc:  # not committed: not registered, the phone retries
        raise JsonError(503, "storage_unavailable", f"the registration could not be made durable ({exc}); retry",
                        headers={"Retry-After": "1"}) from None
    finally:
        if code is not None and codes is not None:
            codes.settle(code, registered)
    # json_response({"phone_id": ..., "token": ..., "task": task_spec(...)}) byte for byte, with the task's
    # JSON serialised once rather than per phone (~30 us each; 10,000 phones register in round 1)
    answer = b'{"phone_id":%s,"token":%s,"task":%s}' % (json.dumps(phone_id).encode(), json.dumps(token).encode(),
                                                         task_spec_json(request))
    return web.Response(body=answer, status=201, content_type="application/json")


def _claim_code(codes: EnrolmentCodes, code: Any, info: dict[str, Any]) -> str:
    """Claim the registration's enrolment code (403 if it has none, or one not issued or spent); its
    hash goes into the phone's row, committed with it."""
    try:
        info["enrolment_code"] = digest = codes.claim(code)
    except EnrolmentRefused as exc:
        fail(403, exc.reason, exc.message)
    return digest


def check_model_fingerprint(phone: Any, server: str | None) -> None:
    """A phone that says which model it runs (export.task_model.model_fingerprint) must run the task's:
    409 model_mismatch otherwise, before it is enrolled."""
    if phone is None or server is None:
        return
    if not isinstance(phone, str):
        fail(400, "bad_fingerprint", "model_fingerprint must be a string")
    if phone != server:
        fail(409, "model_mismatch", f"this phone's model (fingerprint {phone[:12]}) differs from the task's "
                                    f"(fingerprint {server[:12]}): its tensors' names, shapes or dtypes, or its "
                                    "loss (--loss), differ")


async def task(request: web.Request) -> web.Response:
    return web.Response(body=task_spec_json(request), content_type="application/json")


async def checkin(request: web.Request) -> web.Response:
    phone = authenticate(request, request.app[STORE])
    body = await read_json(request, timeout_s=request.app[CONFIG].request_timeout_s)  # bounded
    inline = body.get("inline_model", False)
    if not isinstance(inline, bool):
        fail(400, "bad_checkin", "inline_model must be true or false")
    return await _checkin_answer(request, phone, inline)


async def _checkin_answer(request: web.Request, phone: str, inline: bool, chained: bool = False) -> web.Response:
    """What a check-in answers: a task, ``wait`` (held up to ``checkin_hold_s`` while there is
    no work: a long poll) or ``done``; a task as its model message when ``inline`` allows.
    A check-in ``chained`` to an upload lets the held check-ins that work just woke go first."""
    coord = request.app[COORD]
    if chained:
        await request.app[WORK].settled()
    if coord.paused and not coord.done:
        return json_response(coord.paused_wait(phone))
    answer = coord.checkin(phone)
    hold = request.app[CONFIG].checkin_hold_s
    if answer["action"] == "wait" and hold > 0:  # long poll: answer as soon as there is work
        deadline = asyncio.get_running_loop().time() + hold
        while answer["action"] == "wait" and not request.app[UPLOADS].closing:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                break
            await request.app[WORK].wait(left)
            answer = coord.paused_wait(phone) if coord.paused and not coord.done else coord.checkin(phone)
    if answer["action"] in ("train", "wait"):
        coord.pace.observe(answer["action"] == "train")
    if inline and answer["action"] == "train":
        blob = coord.model_with_task(answer)
        if blob is not None:  # the task rides in the model message's meta: no GET /v1/model
            return web.Response(body=blob, content_type="application/octet-stream",
                                headers={"X-Fedfleet-Version": str(answer["version"])})
    return json_response(answer)


async def model(request: web.Request) -> web.Response:
    """The current model (or ``?version=N`` from the kept window) as a wire-format message;
    ``If-None-Match`` makes repeated downloads free."""
    authenticate(request, request.app[STORE])
    coord = request.app[COORD]
    version, blob = coord.version, coord.model_blob
    if "version" in request.query:
        try:
            version = int(request.query["version"])
        except ValueError:
            fail(400, "bad_query", "version must be an integer")
        if not 0 <= version < 1 << 63:  # SQLite integers are 64-bit
            fail(400, "bad_query", "version must be a non-negative 64-bit integer")
        if version != coord.version:
            old = request.app[STORE].version_blob(version)
            if old is None:
                fail(404, "no_such_version", f"version {version} is not kept (current {coord.version})")
            blob = old
    etag = f'"v{version}"'
    headers = {"ETag": etag, "X-Fedfleet-Version": str(version)}
    if request.headers.get("If-None-Match") == etag:
        return web.Response(status=304, headers=headers)
    return web.Response(body=blob, content_type="application/octet-stream", headers=headers)


def _update_meta(meta: dict[str, Any], max_examples: int) -> dict[str, Any]:
    """The meta's keys the coordinator uses, once the protocol's check passed (a ProtocolError:
    400 with its reason, ``bad_meta`` or ``bad_examples``)."""
    check_update_meta(meta, max_examples)
    return {k: meta[k] for k in ("update_id", "base_version", "num_examples", "train_loss")}


async def update(request: web.Request) -> web.Response:
    """Bounded, authenticated, decoded and checked before the coordinator sees it; at most
    ``max_concurrent_uploads`` at once, later ones queued for a slot (bounded in length and time:
    503 + Retry-After beyond, which also paces phones).

    ``?checkin=json|inline``: once the update is durable, the phone's next check-in is made in
    the same request (FORMAT.md section 9): the answer is then that check-in's (JSON, or the
    task's model message with ``inline``), with ``X-Fedfleet-Checkin: 1`` and the upload's own
    JSON answer in ``X-Fedfleet-Update``. Not when the server asks the phone to rest first
    (``next_checkin_s`` > 0): then the upload's answer as usual, without that header."""
    app = request.app
    cfg = app[CONFIG]
    then = request.query.get("checkin")
    if then not in (None, "json", "inline"):
        fail(400, "bad_query", "checkin must be json or inline")
    gate = app[UPLOADS]
    if not await gate.enter(cfg.max_concurrent_uploads, cfg.max_waiting_uploads, cfg.upload_wait_s):
        raise JsonError(503, "busy", "too many uploads in progress; retry later",
                        headers={"Retry-After": str(max(1, round(cfg.checkin_retry_s)))})
    try:
        response, ack, durable, phone, update_id = await _update(request)
    finally:
        gate.leave()  # the body is in; waiting for the group commit holds no upload slot
    if durable is not None:
        try:
            await durable  # acknowledged only once committed (group commit: one fsync for many uploads)
        except sqlite3.Error as exc:
            app[COORD].forget(phone, update_id)  # not durable, so not accepted: the phone retries
            raise JsonError(503, "storage_unavailable", f"the update could not be made durable ({exc}); retry",
                            headers={"Retry-After": "1"}) from None
    if then is None or not isinstance(response.body, bytes) or float(ack.get("next_checkin_s") or 0.0) > 0:
        return response  # no check-in asked for, or the phone rests before its next one
    answer = await _checkin_answer(request, phone, then == "inline", chained=True)
    app[COORD].count_bytes(0, len(answer.body) if isinstance(answer.body, bytes) else 0)  # the next task's bytes
    answer.headers["X-Fedfleet-Checkin"] = "1"
    answer.headers["X-Fedfleet-Update"] = response.body.decode()
    return answer


async def _update(request: web.Request) -> tuple[web.Response, dict[str, Any], Any, str, str]:
    app = request.app
    cfg, coord = app[CONFIG], app[COORD]
    phone = authenticate(request, app[STORE])
    check_body_headers(request, cfg.max_update_bytes)
    key = app[STORE].public_key(phone)
    signed = key is not None or cfg.require_signatures
    if signed:  # what the headers alone can refuse is refused before the body is read
        _check_signature(lambda: app[NONCES].precheck(phone, request.headers.get(SIGNATURE_HEADER),
                                                      request.headers.get(NONCE_HEADER)), key)
    body = await read_body(request, cfg.max_update_bytes, cfg.request_timeout_s)
    msg = decode_message(body, expected=coord.update_specs, max_bytes=cfg.max_update_bytes)  # ProtocolError -> 400
    if msg.kind != "update":
        fail(400, "malformed", f"expected an 'update' message, got {msg.kind!r}")
    meta = {**_update_meta(msg.meta, cfg.max_examples), "wire_bytes": len(body)}
    norm = float(update_norms([split_state(msg.tensors)[0]])[0])  # finite values can still overflow a float32 merge
    if cfg.max_update_norm and not norm <= cfg.max_update_norm:
        fail(400, "huge_norm", f"the update's L2 norm {norm:.3g} exceeds max_update_norm {cfg.max_update_norm:g}")
    if signed:
        _check_signature(lambda: app[NONCES].verify(key or b"", phone, meta["base_version"], meta["update_id"], body,
                                                    request.headers.get(SIGNATURE_HEADER),
                                                    request.headers.get(NONCE_HEADER)), key)
    _check_round(coord, msg.meta.get("round"), meta["base_version"])
    openings = coord.openings()
    answer = coord.add_update(phone, meta, msg.tensors, wire=body, norm=norm)
    durable, coord.durable = coord.durable, None
    response = json_response(answer)
    coord.count_bytes(len(body), response.content_length or 0)  # before a merge closes the round
    request[COUNTED_KEY] = True
    request[NEW_UPDATE_KEY] = answer.get("duplicate") is False
    if coord.ready():
        schedule_merge(app)
    elif coord.openings() != openings:
        app[WORK].notify()  # an async slot is free again (in a sync round an upload frees nothing)
    return response, answer, durable, phone, str(meta["update_id"])


def _check_round(coord: Coordinator, claimed: Any, base: int) -> None:
    """``meta.round`` against the rounds this server handed out (400 ``wrong_round`` otherwise): a task
    says ``round`` = merges + 1 when it is handed out, so no update can claim a round not begun yet;
    and in sync mode an update on the current version belongs to the open round, exactly. An update on
    an older version is judged by ``base_version`` (sync: stale; async: within ``max_staleness``,
    its round long closed by design), and a retry of an accepted one carries its round unchanged."""
    current = coord.merges + 1
    if claimed > current:
        fail(400, "wrong_round", f"meta.round {claimed} has not begun: the server is in round {current}")
    if coord.mode == "sync" and base == coord.version and claimed != current:
        fail(400, "wrong_round", f"meta.round {claimed} disagrees with the round open on version {base}, "
                                 f"round {current}; the task handed out for it said round {current}")


def _check_signature(check: Callable[[], None], key: bytes | None) -> None:
    """Run a signature check; a phone without an enrolled key, or a failed check, is a 401."""
    try:
        if key is None:
            raise SignatureError("unsigned", "this server requires signed uploads; enrol a key")
        check()
    except SignatureError as exc:
        fail(401, exc.reason, exc.message)


async def status(request: web.Request) -> web.Response:
    return json_response(request.app[COORD].status())


async def rounds(request: web.Request) -> web.Response:
    """Round records after ``?since=N``; ``finished`` once the last round is recorded."""
    coord = request.app[COORD]
    try:
        since = int(request.query.get("since", "0"))
    except ValueError:
        fail(400, "bad_query", "since must be an integer")
    rows = [r for r in coord.history if r["round"] > since]
    finished = coord.done and len(coord.history) >= coord.merges
    return json_response({"rounds": rows, "finished": finished})


def setup_routes(app: web.Application) -> None:
    app.router.add_routes(
        [
            web.post("/v1/register", register),
            web.get("/v1/task", task),
            web.post("/v1/checkin", checkin),
            web.get("/v1/model", model),
            web.post("/v1/update", update),
            web.get("/v1/status", status),
            web.get("/v1/rounds", rounds),
            *admin_routes(),
            web.post("/v1/admin/phones", register_many),  # server/bulk_registration.py
        ]
    )
