"""Registering many phones in one request: ``POST /v1/admin/phones`` (``Authorization: Bearer ADMIN_TOKEN``).

An operator (or an emulated fleet) that provisions a population enrols it up front in requests
of up to ``BULK_MAX_PHONES`` phones, each entry what a single ``POST /v1/register`` takes (``name``,
``public_key``, ``platform``, ``runtime``); one ``model_fingerprint`` for the whole body. The
admin's token stands in for enrolment codes: the admin is who issues them. The body is checked in
full before anything is written (a bad entry is a 4xx naming its index, nothing inserted) and its
phones are inserted in one SQLite transaction (a name already taken: 409, nothing inserted). The
answer gives each phone its token, in the order of the request, and the task once:
``{"phone_ids": [...], "tokens": [...], "task": {...}}``. Tokens are given only once committed.

Bulk-registered phones are not put in the server's caches of tokens and keys (phone_cache): they
are looked up from their rows when they first make a request, as any phone evicted from them.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import sqlite3
import time
from typing import Any

from aiohttp import web

from fedfleet.server.http import NAME_RE, JsonError, check_admin, fail, read_json
from fedfleet.server.security import SignatureError, parse_public_key
from fedfleet.server.state import CONFIG, MODEL_FINGERPRINT, STORE
from fedfleet.server.store import NameTaken, token_hash

BULK_MAX_PHONES = 10_000  # phones per request
# ~110 bytes an entry (a name, a base64 key) in compact JSON; room for platform and runtime too
BULK_MAX_BODY = BULK_MAX_PHONES * 400
PhoneEntry = tuple[str, dict[str, Any]]  # phone id, info (as a single registration stores it)


def parse_entries(body: dict[str, Any], require_key: bool) -> tuple[list[PhoneEntry], list[Any]]:
    """The entries of a bulk body, checked (400 naming the first bad one), and their public keys
    as sent (validated as curve points by ``check_keys``)."""
    phones = body.get("phones")
    if not isinstance(phones, list) or not phones:
        fail(400, "malformed", "phones must be a non-empty list of {name, public_key, platform, runtime}")
    if len(phones) > BULK_MAX_PHONES:
        fail(413, "too_many_phones", f"at most {BULK_MAX_PHONES} phones per request, got {len(phones)}")
    entries: list[PhoneEntry] = []
    keys: list[Any] = []
    names: set[str] = set()
    for i, entry in enumerate(phones):
        if not isinstance(entry, dict):
            fail(400, "malformed", f"phones[{i}] must be an object")
        name = entry["name"] if "name" in entry else f"phone-{secrets.token_hex(6)}"
        if not isinstance(name, str) or not NAME_RE.match(name):
            fail(400, "bad_name", f"phones[{i}]: name must be 1-64 characters of letters, digits, '.', '_' or '-'")
        if name in names:
            fail(400, "duplicate_name", f"phones[{i}]: the name {name!r} appears twice in the request")
        names.add(name)
        if require_key and "public_key" not in entry:
            fail(400, "key_required", f"phones[{i}]: this server requires an Ed25519 public_key at registration")
        entries.append((name, {k: str(entry[k])[:64] for k in ("platform", "runtime") if k in entry}))
        keys.append(entry.get("public_key"))
    return entries, keys


def check_keys(keys: list[Any]) -> list[str | None]:
    """Each key decoded and checked to be a curve point (off the event loop: ~50-200 us a key),
    returned re-encoded as a single registration stores it; raises ``BadKey`` for the first bad one,
    or for one that appears twice."""
    out: list[str | None] = []
    seen: set[bytes] = set()
    for i, text in enumerate(keys):
        if text is None:
            out.append(None)
            continue
        try:
            raw = parse_public_key(text)
        except SignatureError as exc:
            raise BadKey(exc.reason, f"phones[{i}]: {exc.message}") from None
        if raw in seen:
            raise BadKey("duplicate_key", f"phones[{i}]: this public_key appears twice in the request")
        seen.add(raw)
        out.append(base64.b64encode(raw).decode())
    return out


class BadKey(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason, self.message = reason, message


async def register_many(request: web.Request) -> web.Response:
    config = request.app[CONFIG]
    check_admin(request, config.admin_token)
    body = await read_json(request, limit=BULK_MAX_BODY, timeout_s=config.request_timeout_s)
    # one fingerprint for the body, checked as a single registration checks it
    from fedfleet.server.routes import check_model_fingerprint, task_spec_json

    check_model_fingerprint(body.get("model_fingerprint"), request.app.get(MODEL_FINGERPRINT))
    entries, sent = parse_entries(body, config.require_signatures)
    try:
        keys = await asyncio.get_running_loop().run_in_executor(None, check_keys, sent)
    except BadKey as exc:
        fail(400, exc.reason, exc.message)
    tokens = [secrets.token_urlsafe(24) for _ in entries]
    now = time.time()
    rows = [(name, token_hash(token), now, json.dumps({**info, **({"public_key": key} if key else {})}))
            for (name, info), token, key in zip(entries, tokens, keys, strict=True)]
    try:
        await request.app[STORE].enrol_many(rows)
    except NameTaken as exc:
        fail(409, "name_taken", f"a phone named {exc.args[0]!r} is already registered: none of the request's "
                                "phones was registered")
    except sqlite3.Error as exc:
        raise JsonError(503, "storage_unavailable", f"the registrations could not be made durable ({exc}); retry",
                        headers={"Retry-After": "1"}) from None
    answer = b'{"phone_ids":%s,"tokens":%s,"task":%s}' % (
        json.dumps([name for name, _ in entries]).encode(), json.dumps(tokens).encode(), task_spec_json(request))
    return web.Response(body=answer, status=201, content_type="application/json")
