"""HTTP plumbing shared by the handlers: JSON errors, bounded bodies, phone authentication."""

from __future__ import annotations

import asyncio
import hmac
import json
import re
from typing import Any, NoReturn

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from fedfleet.server.store import Store

PHONE_KEY = web.RequestKey("phone", str)  # the authenticated phone id
COUNTED_KEY = web.RequestKey("bytes_counted", bool)  # the handler charged its bytes itself
NEW_UPDATE_KEY = web.RequestKey("new_update", bool)  # this upload was accepted and is not a retry
NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=json.dumps(data, separators=(",", ":")).encode(),
        status=status,
        content_type="application/json",
        headers=headers,
    )


class JsonError(web.HTTPException):
    """An HTTP error whose body is ``{"error": reason, "message": text}``."""

    def __init__(self, status: int, reason: str, message: str, headers: dict[str, str] | None = None) -> None:
        self.status_code = status
        super().__init__(
            body=json.dumps({"error": reason, "message": message}).encode(),
            content_type="application/json",
            headers=headers,
        )
        self.reason_tag = reason


def fail(status: int, reason: str, message: str) -> NoReturn:
    raise JsonError(status, reason, message)


def check_body_headers(request: web.Request, limit: int) -> None:
    """Refuse from the headers alone a body that is compressed (415) or declared over ``limit`` (413)."""
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding != "identity":
        fail(415, "content_encoding", f"Content-Encoding {encoding[:32]!r} is not accepted: send the body as is "
                                      "(wire messages compress themselves, protocol/FORMAT.md)")
    declared = request.content_length
    if declared is not None and declared > limit:
        fail(413, "too_large", f"body of {declared} bytes exceeds the limit of {limit} bytes")


async def read_body(request: web.Request, limit: int, timeout_s: float = 30.0) -> bytes:
    """Read at most ``limit`` bytes from the stream within ``timeout_s``; refuse larger bodies
    with 413 before buffering them (the declared length first, then the bytes that arrive),
    bodies that trickle in too slowly (slow-loris) with 408, and any HTTP ``Content-Encoding``
    with 415: nothing is inflated at the HTTP layer (the app turns aiohttp's auto_decompress off),
    so an HTTP compression bomb has nothing to explode; wire messages carry their own bounded
    zlib flag (protocol/FORMAT.md)."""
    check_body_headers(request, limit)
    chunks: list[bytes] = []
    size = 0
    try:
        if request.content_length:  # usually all there already: take it without the timed loop
            first = request.content.read_nowait(limit + 1)
            if len(first) == request.content_length:
                return first
            size = len(first)
            if size > limit:
                fail(413, "too_large", f"body exceeds the limit of {limit} bytes")
            chunks.append(first)
        async with asyncio.timeout(timeout_s):
            async for chunk in request.content.iter_chunked(1 << 16):
                size += len(chunk)
                if size > limit:
                    fail(413, "too_large", f"body exceeds the limit of {limit} bytes")
                chunks.append(chunk)
    except TimeoutError:
        fail(408, "timeout", f"the body did not arrive within {timeout_s:.0f} s")
    except (ConnectionResetError, HttpProcessingError, web.RequestPayloadError):  # a broken or cut body: the client's fault
        fail(400, "incomplete_body", f"the connection closed after {size} bytes, before the whole body arrived")
    return b"".join(chunks)


async def read_json(request: web.Request, limit: int = 16 << 10, timeout_s: float = 30.0) -> dict[str, Any]:
    raw = await read_body(request, limit, timeout_s)
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:  # RecursionError: nested too deep
        fail(400, "malformed", f"body is not valid JSON: {str(exc)[:200]}")
    if not isinstance(data, dict):
        fail(400, "malformed", "body must be a JSON object")
    return data


def authenticate(request: web.Request, store: Store) -> str:
    """Map ``Authorization: Bearer TOKEN`` to a registered phone, or 401."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        fail(401, "unauthenticated", "send 'Authorization: Bearer <token>' from /v1/register")
    phone = store.phone_for_token(token.strip())
    if phone is None:
        fail(401, "unknown_phone", "this token does not belong to a registered phone")
    request[PHONE_KEY] = phone
    return phone


def check_admin(request: web.Request, token: str | None) -> None:
    """Admin endpoints need ``Authorization: Bearer ADMIN_TOKEN`` (constant-time compare)."""
    if not token:
        fail(404, "no_admin", "admin endpoints are disabled (set admin_token)")
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        fail(403, "forbidden", "a valid admin token is required")
