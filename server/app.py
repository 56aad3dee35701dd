"""The app factory: ``make_app(config) -> aiohttp.web.Application``."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from fedfleet.export.accelerator import resolve_device
from fedfleet.protocol import ProtocolError, decode_message, encode_message
from fedfleet.server.admin import with_stored_plan
from fedfleet.server.async_coordinator import AsyncCoordinator
from fedfleet.server.bundles import check_bundle, setup_bundle
from fedfleet.server.config import ServerConfig
from fedfleet.server.coordinator import Clock, wall_clock
from fedfleet.server.enrolment import read_codes, setup_enrolment
from fedfleet.server.evaluation import Evaluator
from fedfleet.server.http import COUNTED_KEY, JsonError, json_response
from fedfleet.server.kept_state import KEPT_STATE, restore_state
from fedfleet.server.observability import setup_observability
from fedfleet.server.ratelimit import setup_failure_limits
from fedfleet.server.relay import setup_relay
from fedfleet.server.routes import setup_routes
from fedfleet.server.secagg_routes import setup_secagg_routes
from fedfleet.server.security import NonceBook
from fedfleet.server.state import (
    CONFIG,
    COORD,
    EVALUATOR,
    MODEL_FINGERPRINT,
    NONCES,
    STORE,
    UPLOADS,
    WORK,
    UploadGate,
    WorkSignal,
    background,
    stop_holding,
)
from fedfleet.server.store import Store
from fedfleet.server.sync_coordinator import SyncCoordinator
from fedfleet.server.updates import UpdateRejected
from fedfleet.server.webphone import setup_webphone

log = logging.getLogger("fedfleet.server")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
PHONE_PATHS = ("/v1/register", "/v1/checkin", "/v1/model", "/v1/update", "/v1/task", "/v1/bundle", "/v1/secagg/")


def make_app(
    config: ServerConfig = ServerConfig(),
    *,
    test_data: tuple[np.ndarray, np.ndarray] | None = None,
    clock: Clock = wall_clock,
) -> web.Application:
    """Build the server. ``test_data`` (x, y) enables evaluation of every version;
    ``clock`` is injectable so that emulation can run on virtual time."""
    app = web.Application(
        middlewares=[bytes_middleware, errors_middleware],
        client_max_size=config.max_update_bytes + (1 << 16),
        # no HTTP-level inflation (see server.http.read_body); idle and slow-loris connections closed early
        handler_args={"auto_decompress": False, "keepalive_timeout": config.idle_timeout_s},
    )
    codes = read_codes(config.enrolment_codes) if config.enrolment_codes is not None else None  # before the store
    store = Store(_db_path(config), keep_versions=max(16, config.max_staleness + 2), sync=config.sqlite_sync)
    version, params, fingerprint = _initial_state(config, store)
    opt_blob = store.optimizer_state(version)
    opt_state = decode_message(opt_blob).tensors if opt_blob else None
    coordinator = AsyncCoordinator if config.mode == "async" else SyncCoordinator
    app[CONFIG] = config
    app[STORE] = store
    # the admin's stored plan changes win over the start-up plan (server/admin.py)
    app[COORD] = coordinator(with_stored_plan(config, store), store, params, version, clock, opt_state)
    app[UPLOADS] = UploadGate()
    app[WORK] = WorkSignal()
    app[NONCES] = NonceBook(config.signature_skew_s)
    if fingerprint is not None:
        app[MODEL_FINGERPRINT] = fingerprint
    if test_data is not None:
        task = (config.model, config.input_shape, config.num_classes)  # torch loads at the first evaluation
        app[EVALUATOR] = Evaluator(task, test_data[0], test_data[1], seed=config.seed, init_weights=config.init_weights,
                                   device=resolve_device(config.device), loss=config.loss, metrics=config.metrics)
    if config.bundle_dir is not None:
        manifest = check_bundle(Path(config.bundle_dir), config.model, app[COORD].specs)
        bundle_fp = manifest.model_fingerprint
        if bundle_fp is not None and fingerprint is not None and bundle_fp != fingerprint:
            raise ValueError(f"bundle {config.bundle_dir} is for another model than the task's (fingerprint "
                             f"{bundle_fp[:12]} vs {fingerprint[:12]})")
    setup_enrolment(app, codes, store)
    setup_routes(app)
    if config.topology != "none":  # gossip mode: the server relays phones' messages (server/relay.py)
        setup_relay(app)
    if config.secure_agg:
        setup_secagg_routes(app)
    setup_bundle(app, Path(config.bundle_dir) if config.bundle_dir else None)
    setup_failure_limits(app, config, store)
    setup_observability(app)
    setup_webphone(app)
    app.cleanup_ctx.append(background)
    app.on_shutdown.append(stop_holding)
    _quiet_parser_errors()
    return app


class _ClientParseErrors(logging.Filter):
    """aiohttp answers malformed HTTP (bad request line, headers, chunking) with a 400 itself and logs
    each with a full traceback at ERROR: the client's fault, and formatting a traceback per request
    is work an attacker can make the server do. Such records are dropped; other errors pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, HttpProcessingError)


def _quiet_parser_errors() -> None:
    logger = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, _ClientParseErrors) for f in logger.filters):
        logger.addFilter(_ClientParseErrors())


def _db_path(config: ServerConfig) -> str:
    if config.data_dir is None:
        return ":memory:"
    path = Path(config.data_dir)
    path.mkdir(parents=True, exist_ok=True)
    return str(path / "server.sqlite")


class OtherTask(ValueError):
    """The data dir holds the state of another task (model, input shape, classes or loss): nothing to
    resume. The CLI reports it in one line."""


def _initial_state(config: ServerConfig, store: Store) -> tuple[int, dict[str, np.ndarray], str | None]:
    """Resume from the newest durable version, or make version 0: drawn from the seed, or the user's
    ``init_weights``. Only a fresh start imports torch: a restart after a crash serves in well under 2 s.
    Also the model's fingerprint (None for a data dir written before fingerprints were kept)."""
    spec: dict[str, Any] = {"model": config.model, "input_shape": list(config.input_shape),
                            "classes": config.num_classes}
    if config.loss not in (None, "cross_entropy"):  # phones train it: resuming with another is another task
        spec["loss"] = config.loss
    fingerprint = json.dumps(spec)
    saved = store.get_meta("model_spec")
    if saved is not None and saved != fingerprint:
        raise OtherTask(f"data dir {config.data_dir} holds a different task ({saved}); use a fresh --data-dir")
    latest = store.latest_version()
    if latest is not None:
        version, blob = latest
        # --local-state: the version ships no state; the state it was evaluated with is kept beside it
        tensors = restore_state(decode_message(blob).tensors, store.get_meta(KEPT_STATE))
        return version, tensors, store.get_meta("model_fingerprint")
    from fedfleet.export.model_state import initial_state
    from fedfleet.export.models import trainable_params
    from fedfleet.export.task_model import model_fingerprint, task_model
    from fedfleet.protocol.state import with_state

    model = task_model(config.model, config.input_shape, config.num_classes, config.seed, config.init_weights)
    params = {n: p.detach().numpy().copy() for n, p in trainable_params(model).items()}
    params = with_state(params, initial_state(model))  # batch norm statistics travel as "state:" tensors
    store.set_meta("model_spec", fingerprint)
    store.set_meta("model_fingerprint", model_fingerprint(model, config.loss))
    store.save_version(0, encode_message("model", {"version": 0, "model": config.model}, params))
    return 0, params, store.get_meta("model_fingerprint")


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Named errors become 4xx JSON; nothing unexpected leaks as an HTML 500."""
    try:
        return await handler(request)
    except JsonError as exc:
        _count_rejection(request, exc.status, exc.reason_tag)
        raise
    except ProtocolError as exc:
        _count_rejection(request, 400, exc.reason)
        return json_response({"error": exc.reason, "message": str(exc)}, status=400)
    except UpdateRejected as exc:
        _count_rejection(request, exc.status, exc.reason)
        return json_response({"error": exc.reason, "message": exc.message}, status=exc.status)
    except web.HTTPRequestEntityTooLarge as exc:
        return json_response({"error": "too_large", "message": exc.text or "body too large"}, status=413)
    except web.HTTPException:
        raise
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return json_response({"error": "internal", "message": "internal server error"}, status=500)


def _count_rejection(request: web.Request, status: int, reason: str) -> None:
    if request.path == "/v1/update" and 400 <= status < 500:
        request.app[COORD].count_rejection(reason)


@web.middleware
async def bytes_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Charge the HTTP bodies of phone traffic to the open round (real bytes, not estimates)."""
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        _charge(request, exc)
        raise
    _charge(request, response)
    return response


def _charge(request: web.Request, response: web.StreamResponse) -> None:
    if request.path.startswith(PHONE_PATHS) and not request.get(COUNTED_KEY):
        body = getattr(response, "body", None)
        down = len(body) if isinstance(body, bytes | bytearray) else 0
        request.app[COORD].count_bytes(request.content_length or 0, down)


__all__ = ["make_app"]
