"""Seeing a running server: Prometheus metrics, a live dashboard, and its server-sent events.

``setup_observability(app)`` adds an outermost middleware that counts every request, plus
``GET /metrics`` (Prometheus text format, a registry per app), ``GET /`` (the dashboard page with
its static files under ``/static/``), ``GET /v1/dashboard`` (the dashboard's data as JSON) and
``GET /v1/events`` (the same snapshot pushed as server-sent events on every new round record and
about once a second). Event streams end when the app shuts down, so ``runner.cleanup()`` never
waits on an open browser tab.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from fedfleet.server.http import NEW_UPDATE_KEY, PHONE_KEY, json_response
from fedfleet.server.state import COORD, STORE

STATIC_DIR = Path(__file__).with_name("static")
WINDOW_S = 10.0  # "online" = a phone request within this window; updates/s is averaged over it
PUSH_EVERY_S = 1.0  # an event stream sends a snapshot at least this often
POLL_S = 0.2  # how soon a stream notices a new round record
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
SWEEP_MIN = 4096  # per-phone books are swept of phones gone quiet from this size on
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})  # others count as "other"


@dataclass
class Observability:
    """Per-app metrics and the live counters the dashboard shows (no process-wide state)."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    closing: asyncio.Event = field(default_factory=asyncio.Event)  # set on shutdown: streams end
    last_seen: dict[str, float] = field(default_factory=dict)  # phone -> monotonic time of last request
    accepted: deque[float] = field(default_factory=deque)  # monotonic times of accepted updates

    def __post_init__(self) -> None:
        labels = ["method", "endpoint", "status"]
        r = self.registry
        self.requests = Counter("fedfleet_http_requests", "HTTP requests answered", labels, registry=r)
        self.latency = Histogram("fedfleet_http_request_duration_seconds", "time to answer a request", labels,
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.bytes_in = Counter("fedfleet_http_request_bytes", "request body bytes", ["endpoint"], registry=r)
        self.bytes_out = Counter("fedfleet_http_response_bytes", "response body bytes", ["endpoint"], registry=r)
        self.rejected = Counter("fedfleet_rejected_requests", "4xx answers by their JSON 'error' reason",
                                ["endpoint", "reason"], registry=r)
        # Labelled children by their labels: ``labels()`` takes a lock and builds a tuple each time
        # (~15 us per request for the four of them); the label values are bounded (route patterns).
        self._children: dict[tuple[str, str, int], tuple[Any, Any, Any, Any]] = {}
        self._sweep_at = SWEEP_MIN  # last_seen's size that triggers the next sweep (see seen)

    def children(self, method: str, endpoint: str, status: int) -> tuple[Any, Any, Any, Any]:
        """(requests, latency, bytes_in, bytes_out) children for one method, route and status."""
        key = (method, endpoint, status)
        got = self._children.get(key)
        if got is None:
            got = self._children[key] = (
                self.requests.labels(method, endpoint, str(status)), self.latency.labels(method, endpoint, str(status)),
                self.bytes_in.labels(endpoint), self.bytes_out.labels(endpoint))
        return got

    def online(self, now: float) -> int:
        return sum(1 for t in self.last_seen.values() if now - t <= WINDOW_S)

    def seen(self, phone: str, now: float) -> None:
        """``phone`` made a request at ``now``. Phones quiet for longer than the window are forgotten
        once the book has doubled since it was last swept: it holds the phones online lately, not
        every phone registered (amortised O(1) a request)."""
        last_seen = self.last_seen
        last_seen[phone] = now
        if len(last_seen) >= self._sweep_at:
            for quiet in [p for p, t in last_seen.items() if now - t > WINDOW_S]:
                del last_seen[quiet]
            self._sweep_at = max(2 * len(last_seen), SWEEP_MIN)

    def updates_per_s(self, now: float) -> float:
        while self.accepted and now - self.accepted[0] > WINDOW_S:
            self.accepted.popleft()
        return len(self.accepted) / WINDOW_S


OBS = web.AppKey("observability", Observability)


# --- counting every request ----------------------------------------------------------------
def _endpoint(request: web.Request) -> str:
    """The route's path pattern (bounded label values), not the raw path."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


def _body_size(response: web.StreamResponse) -> int:
    if isinstance(response, web.Response) and isinstance(response.body, bytes | bytearray):
        return len(response.body)
    if response.prepared:  # streamed (event stream, files): what was written
        return response.body_length
    return response.content_length or 0


def _json_body(response: web.StreamResponse) -> dict[str, Any]:
    if not isinstance(response, web.Response) or response.content_type != "application/json":
        return {}
    try:
        data = json.loads(response.body) if isinstance(response.body, bytes | bytearray) else {}
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


@web.middleware
async def observe_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    t0 = time.perf_counter()
    try:
        response = await handler(request)
    except web.HTTPException as exc:  # JsonError and aiohttp's own 404/405/413 are responses too
        _observe(request, exc, time.perf_counter() - t0)
        raise
    _observe(request, response, time.perf_counter() - t0)
    return response


def _observe(request: web.Request, response: web.StreamResponse, elapsed: float) -> None:
    obs, endpoint, status = request.app[OBS], _endpoint(request), response.status
    method = request.method if request.method in METHODS else "other"  # WebDAV, PRI, ...: one label
    requests, latency, bytes_in, bytes_out = obs.children(method, endpoint, status)
    requests.inc()
    latency.observe(elapsed)
    bytes_in.inc(request.content_length or 0)
    bytes_out.inc(_body_size(response))
    now = time.monotonic()
    if (phone := request.get(PHONE_KEY)) is not None:
        obs.seen(phone, now)
    if 400 <= status < 500:
        obs.rejected.labels(endpoint, str(_json_body(response).get("error", f"http_{status}"))).inc()
    elif status == 200 and request.get(NEW_UPDATE_KEY):
        obs.accepted.append(now)


# --- the server's state, read at scrape time ------------------------------------------------
class StateCollector(Collector):
    """Gauges and counters that are facts of the coordinator and store, not of requests."""

    def __init__(self, app: web.Application) -> None:
        self.app = app

    def collect(self) -> Iterator[Metric]:
        coord, obs = self.app[COORD], self.app[OBS]
        history, live = coord.history, _live(coord.status())
        yield GaugeMetricFamily("fedfleet_model_version", "current model version", value=coord.version)
        yield GaugeMetricFamily("fedfleet_round", "number of the open round (next merge)", value=live["round"])
        yield CounterMetricFamily("fedfleet_rounds_recorded", "merges recorded (metrics.jsonl rows)",
                                  value=len(history))
        yield CounterMetricFamily("fedfleet_updates_merged", "updates merged into published versions",
                                  value=sum(int(r.get("updates", 0)) for r in history))
        yield GaugeMetricFamily("fedfleet_phones_registered", "phones registered", value=self.app[STORE].phone_count())
        yield GaugeMetricFamily("fedfleet_phones_active", "phones handed work in the open round (sync) or "
                                "training now (async)", value=live["phones_active"])
        yield GaugeMetricFamily("fedfleet_round_updates", "updates waiting for the next merge",
                                value=live["updates_in_round"])
        yield GaugeMetricFamily("fedfleet_phones_online", f"phones with a request in the last {WINDOW_S:g} s",
                                value=obs.online(time.monotonic()))
        for key in ("accuracy", "loss", "epsilon_max"):
            value = _latest(history, key)
            if value is not None:
                yield GaugeMetricFamily(f"fedfleet_model_{key}", f"{key} of the newest recorded version", value=value)


def _live(status: dict[str, Any]) -> dict[str, Any]:
    """The open round, from ``Coordinator.status()`` of either mode (sync: a cohort selected
    for the round; async: phones in flight and a buffer of updates)."""
    if "selected" in status:
        active, waiting = int(status["selected"]), int(status.get("updates_in_round", 0))
        training = active - waiting
    else:
        active = training = int(status.get("in_flight", 0))
        waiting = int(status.get("buffered", 0))
    return {"mode": status.get("mode", "sync"), "round": status["round"], "done": status["done"],
            "phones_active": active, "phones_training": training, "updates_in_round": waiting}


def _latest(history: list[dict[str, Any]], key: str) -> float | None:
    for record in reversed(history):
        value = record.get(key)
        if isinstance(value, int | float) and math.isfinite(value):
            return float(value)
    return None


# --- the dashboard's data --------------------------------------------------------------------
def _finite(value: Any) -> Any:
    """JSON for browsers: NaN and infinities become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def dashboard_snapshot(app: web.Application, since: int = 0) -> dict[str, Any]:
    """Server state now, plus the round records after the first ``since`` (all by default)."""
    coord, obs = app[COORD], app[OBS]
    history, now = coord.history, time.monotonic()
    return _finite({
        "version": coord.version,
        **_live(coord.status()),
        "rounds_recorded": len(history),
        "phones_registered": app[STORE].phone_count(),
        "phones_online": obs.online(now),
        "updates_per_s": obs.updates_per_s(now),
        "accuracy": _latest(history, "accuracy"),
        "loss": _latest(history, "loss"),
        "epsilon_max": _latest(history, "epsilon_max"),
        "latency_p50_s": _latest(history, "latency_p50_s"),
        "latency_p95_s": _latest(history, "latency_p95_s"),
        "bytes_up": sum(int(r.get("bytes_up", 0)) for r in history) + coord.period.bytes_up,
        "bytes_down": sum(int(r.get("bytes_down", 0)) for r in history) + coord.period.bytes_down,
        "since": since,
        "records": history[since:],
    })


def _since(value: str | None, recorded: int) -> int:
    """A record offset from the client; one from an earlier server (too large) starts over."""
    try:
        since = int(value or 0)
    except ValueError:
        return 0
    return since if 0 <= since <= recorded else 0


# --- handlers --------------------------------------------------------------------------------
async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[OBS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def dashboard_page(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC_DIR / "dashboard.html", headers={"Cache-Control": "no-cache"})


async def dashboard_json(request: web.Request) -> web.Response:
    app = request.app
    return json_response(dashboard_snapshot(app, _since(request.query.get("since"), len(app[COORD].history))))


async def events(request: web.Request) -> web.StreamResponse:
    """Server-sent events: a snapshot with the new records on every round record, and every
    ``PUSH_EVERY_S``; the event id is the number of records sent, so a reconnecting browser
    (``Last-Event-ID``) gets only what it missed."""
    app, obs = request.app, request.app[OBS]
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    sent = _since(request.headers.get("Last-Event-ID"), len(app[COORD].history))
    pushed_at = -math.inf
    with contextlib.suppress(ConnectionError):  # the browser went away
        while not obs.closing.is_set():
            recorded = len(app[COORD].history)
            if recorded != sent or time.monotonic() - pushed_at >= PUSH_EVERY_S:
                snapshot = dashboard_snapshot(app, min(sent, recorded))
                sent, pushed_at = recorded, time.monotonic()
                data = json.dumps(snapshot, separators=(",", ":"), allow_nan=False)
                await response.write(f"id: {sent}\nevent: snapshot\ndata: {data}\n\n".encode())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(obs.closing.wait(), POLL_S)
    return response


async def _end_streams(app: web.Application) -> None:
    app[OBS].closing.set()


def setup_observability(app: web.Application) -> None:
    """Call last in ``make_app``: the middleware goes first so it sees every final answer."""
    app[OBS] = Observability()
    app[OBS].registry.register(StateCollector(app))
    app.middlewares.insert(0, observe_middleware)
    app.on_shutdown.append(_end_streams)
    app.router.add_routes([
        web.get("/metrics", metrics),
        web.get("/", dashboard_page),
        web.get("/v1/dashboard", dashboard_json),
        web.get("/v1/events", events),
        web.static("/static", STATIC_DIR),
    ])
