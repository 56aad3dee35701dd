"""Budgets for failed requests: a client that keeps sending bad requests is refused from its headers.

Every 4xx answer (except 429 itself) costs its client one token of a token bucket; a client whose
bucket is empty gets ``429`` + ``Retry-After`` before its body is read or decoded, so a flood of
malformed traffic costs the server a header lookup per request instead of a decode, a signature
check and a traceback. Successful requests cost nothing: honest phones, which almost never get a
4xx, are never throttled, however busy the attacker next to them is.

Clients are keyed by the authenticated phone and the peer address together when the
``Authorization`` token belongs to a phone (each phone has its own bucket, so one misbehaving phone
cannot use up another's; and whoever replays or forges a phone's requests from elsewhere, with a
captured token, spends the budget of that phone *at their own address*, not the phone's), and
otherwise by the peer address alone. Many phones can share one address (carrier-grade NAT, a
campus), so the per-address budget, which only meters unauthenticated failures (unknown tokens,
registrations, garbage), is much larger than the per-phone one; behind a reverse proxy the address
is taken from the header it sets (``ratelimit_peer_header``), never from a header a client could
forge on a direct connection. (A phone that changes address gets a fresh budget there: on a mobile
network that is a phone moving, and an attacker's own phone gains ``reject_burst`` failures per
address it can use.)

Registration has a budget of its own per address (``RegistrationBudget``): every registration,
successful or not, costs a token, so an attacker cannot enrol fresh identities to get a fresh
per-phone failure budget with each. Addresses in ``register_trusted`` (loopback by default: the
emulated fleet registers its 10,000 phones from 127.0.0.1) have no registration budget.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from fedfleet.server.config import ServerConfig
from fedfleet.server.http import JsonError, json_response
from fedfleet.server.state import COORD
from fedfleet.server.store import Store

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Clock = Callable[[], float]


@dataclass
class _Bucket:
    tokens: float
    stamp: float


class TokenBuckets:
    """One bucket per key: ``burst`` tokens at most, refilled at ``rate_per_s``. A key that was never
    charged (or whose bucket refilled) holds a full bucket; at most ``max_keys`` buckets are kept
    (full ones are dropped first, then the least recently charged), so a flood of new keys cannot
    grow memory without bound."""

    def __init__(self, burst: float, rate_per_s: float, max_keys: int = 100_000, clock: Clock = time.monotonic) -> None:
        if burst < 1 or rate_per_s <= 0 or max_keys < 1:
            raise ValueError("a token bucket needs burst >= 1, rate_per_s > 0 and max_keys >= 1")
        self.burst, self.rate, self.max_keys, self.clock = float(burst), float(rate_per_s), max_keys, clock
        self._buckets: dict[str, _Bucket] = {}

    def _level(self, b: _Bucket, now: float) -> float:
        return min(self.burst, b.tokens + (now - b.stamp) * self.rate)

    def retry_after(self, key: str) -> float:
        """0 if ``key`` may make a request now, else the seconds until its bucket holds a token."""
        b = self._buckets.get(key)
        if b is None:
            return 0.0
        level = self._level(b, self.clock())
        return 0.0 if level >= 1 else (1 - level) / self.rate

    def charge(self, key: str) -> None:
        now = self.clock()
        b = self._buckets.pop(key, None)  # re-inserted last: the dict stays ordered by last charge
        level = self.burst if b is None else self._level(b, now)
        self._buckets[key] = _Bucket(max(0.0, level - 1), now)
        if len(self._buckets) > self.max_keys:
            self._prune(now)

    def _prune(self, now: float) -> None:
        full = [k for k, b in self._buckets.items() if self._level(b, now) >= self.burst]
        for k in full:
            del self._buckets[k]
        while len(self._buckets) > self.max_keys * 3 // 4:  # forgive the longest-quiet clients
            del self._buckets[next(iter(self._buckets))]

    def __len__(self) -> int:
        return len(self._buckets)


class FailureLimits:
    """The per-phone and per-address budgets of failed requests (see the module docstring)."""

    def __init__(self, config: ServerConfig, store: Store, clock: Clock = time.monotonic) -> None:
        self.enabled = config.reject_burst > 0
        self.phones = TokenBuckets(max(1, config.reject_burst), config.reject_rate_per_s, clock=clock)
        self.peers = TokenBuckets(max(1, config.peer_reject_burst), config.peer_reject_rate_per_s, clock=clock)
        self.peer_header = config.ratelimit_peer_header
        self.store = store
        self.throttled = 0  # requests answered 429

    def client(self, request: web.Request) -> tuple[TokenBuckets, str]:
        """The bucket a request draws on: its phone's at its address when its bearer token is a
        phone's, else its address's."""
        address = self.address(request)
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and 0 < len(token) <= 512:
            phone = self.store.phone_for_token(token.strip())  # cached for known tokens
            if phone is not None:
                return self.phones, f"{phone}@{address}"
        return self.peers, address

    def address(self, request: web.Request) -> str:
        """The client's address: the trusted proxy's header when configured, else the peer's."""
        if self.peer_header:  # a trusted proxy in front appends the real client last
            forwarded = request.headers.get(self.peer_header, "")
            last = forwarded.rsplit(",", 1)[-1].strip()
            if last:
                return last[:64]
        return request.remote or "unknown"


class RegistrationBudget:
    """Registrations per address: ``register_burst`` at once, then ``register_rate_per_s``; none for
    the ``register_trusted`` networks."""

    def __init__(self, config: ServerConfig, clock: Clock = time.monotonic) -> None:
        self.enabled = config.register_burst > 0
        self.buckets = TokenBuckets(max(1, config.register_burst), config.register_rate_per_s, clock=clock)
        self.trusted = [ipaddress.ip_network(n, strict=False) for n in config.register_trusted]
        self.throttled = 0

    def is_trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False  # "unknown" or a proxy's odd header: budgeted
        return any(ip in net for net in self.trusted)

    def charge(self, address: str) -> float:
        """0 and one registration charged to ``address``, or the seconds until it may register."""
        if not self.enabled or self.is_trusted(address):
            return 0.0
        wait = self.buckets.retry_after(address)
        if wait > 0:
            self.throttled += 1
            return wait
        self.buckets.charge(address)
        return 0.0


LIMITS = web.AppKey("failure_limits", FailureLimits)
REGISTRATIONS = web.AppKey("registration_budget", RegistrationBudget)


def check_registration_budget(request: web.Request) -> None:
    """Charge a registration to its address, or refuse it with 429 + Retry-After (before its body is read)."""
    address = request.app[LIMITS].address(request)
    wait = request.app[REGISTRATIONS].charge(address)
    if wait > 0:
        raise JsonError(429, "registration_rate_limited",
                        f"too many registrations from this address; retry in {wait:.1f} s",
                        headers={"Retry-After": str(max(1, round(wait + 0.5)))})


@web.middleware
async def failure_limit_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse a client out of failure budget from its headers alone; charge it for each 4xx it gets."""
    limits = request.app[LIMITS]
    if not limits.enabled:
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return _as_response(exc)
    buckets, key = limits.client(request)
    wait = buckets.retry_after(key)
    if wait > 0:
        limits.throttled += 1
        if request.path == "/v1/update":
            request.app[COORD].count_rejection("rate_limited")
        refusal = json_response(
            {"error": "rate_limited", "message": f"too many failed requests from this {_who(buckets, limits)}; "
                                                 f"retry in {wait:.1f} s"},
            status=429, headers={"Retry-After": str(max(1, round(wait + 0.5)))})
        if request.can_read_body:  # the unread body is not worth draining: close instead
            refusal.force_close()
        return refusal
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = _as_response(exc)
    if 400 <= response.status < 500 and response.status != 429:
        buckets.charge(key)
    return response


def _as_response(exc: web.HTTPException) -> web.Response:
    """A raised error answer, returned instead: aiohttp keeps a raised one as the response in the
    frame its traceback holds, a reference cycle of ~50 objects (the request, its headers, every
    middleware's frame) per failed request that only the cyclic GC frees, so a flood of 4xx meant
    frequent full collections, each a pause of the event loop for every honest phone."""
    headers = {k: v for k, v in exc.headers.items() if k.lower() not in ("content-length", "content-type")}
    response = web.Response(status=exc.status, reason=exc.reason, body=exc.body, headers=headers,
                            content_type=exc.content_type)
    exc.__traceback__ = None
    return response


def _who(buckets: TokenBuckets, limits: FailureLimits) -> str:
    return "phone" if buckets is limits.phones else "address"


def setup_failure_limits(app: web.Application, config: ServerConfig, store: Store) -> None:
    """Install before ``setup_observability`` (whose middleware must stay outermost to see the 429s)."""
    app[LIMITS] = FailureLimits(config, store)
    app[REGISTRATIONS] = RegistrationBudget(config)
    app.middlewares.insert(0, failure_limit_middleware)


__all__ = ["FailureLimits", "RegistrationBudget", "TokenBuckets", "check_registration_budget",
           "failure_limit_middleware", "setup_failure_limits"]
