"""``fedfleet serve``: the aggregation server, every flag checked before it says it listens."""

from __future__ import annotations

import argparse
import asyncio
import socket
import sqlite3
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

from fedfleet.cli_errors import CliError, checking_input
from fedfleet.cli_flags import gossip_server_values, toml_values
from fedfleet.device_runtime import aio
from fedfleet.output import check_out_dir
from fedfleet.tuning import tune_process


def cmd_serve(args: argparse.Namespace) -> int:
    from aiohttp import web

    from fedfleet.device_runtime.data import check_dataset_name
    from fedfleet.device_runtime.limits import ACCEPT_BACKLOG
    from fedfleet.export.refs import check_model_name
    from fedfleet.server.app import make_app
    from fedfleet.server.config import ServerConfig
    from fedfleet.server.enrolment import read_codes
    from fedfleet.task import FINAL_WEIGHTS, prepare_task

    # Everything the user gave is checked before the banner, and before anything goes into --data-dir.
    values = toml_values(args, "server")
    dataset = args.dataset or values.pop("dataset", "digits")
    if not isinstance(dataset, str):
        raise CliError(f"--config {args.config}: dataset must be a string, got {dataset!r}")
    image_size = args.image_size or values.pop("image_size", 32)
    for key, flag in (("model", args.model), ("rounds", args.rounds), ("sample_fraction", args.sample),
                      ("seed", args.seed), ("mode", args.mode), ("data_dir", args.data_dir),
                      ("bundle_dir", args.bundle), ("strategy", args.strategy),
                      ("init_weights", args.init_weights), ("local_state", args.local_state),
                      ("secure_agg", args.secure_agg), ("secagg_threshold", args.secagg_threshold),
                      ("secagg_degree", args.secagg_degree),
                      ("distributed_noise_multiplier", args.distributed_noise_multiplier),
                      ("enrolment_codes", args.enrolment_codes), ("loss", args.loss), ("metrics", args.metrics)):
        if flag is not None:
            values[key] = flag
    values.update(gossip_server_values(args))  # --mode gossip: the relay (server/relay.py)
    with checking_input():
        config = ServerConfig().replace(**values)
        check_dataset_name(dataset)
        check_model_name(config.model)
        if config.enrolment_codes is not None:
            read_codes(config.enrolment_codes)  # a missing or malformed file: one line, before anything starts
    if config.data_dir is not None and Path(config.data_dir).exists() and not Path(config.data_dir).is_dir():
        raise CliError(f"--data-dir {config.data_dir}: exists and is not a folder")
    if config.bundle_dir is not None and not (Path(config.bundle_dir) / "manifest.json").is_file():
        raise CliError(f"--bundle {config.bundle_dir}: no manifest.json there; make the bundle with `fedfleet export`")
    ssl_context = _tls_context(args.tls_cert, args.tls_key)
    sock = _listen(args.host, args.port, ACCEPT_BACKLOG)
    try:
        with checking_input():
            if config.data_dir is not None:
                check_out_dir(config.data_dir, "--data-dir")
            data = prepare_task(config.model, dataset, config.seed, image_size, config.init_weights, config.loss,
                                config.metrics).data
            config = config.replace(input_shape=data.input_shape, num_classes=data.num_classes)
        try:
            app = make_app(config, test_data=(data.x_test, data.y_test))
        except sqlite3.DatabaseError as exc:  # the state in --data-dir, read back: at its header or past it
            if exc.sqlite_errorname not in ("SQLITE_NOTADB", "SQLITE_CORRUPT"):
                raise
            raise CliError(f"--data-dir {config.data_dir}: server.sqlite is not a fedfleet state database or is "
                           f"damaged ({exc}); move it away to start afresh, or restore it from a backup") from None
        app.cleanup_ctx.append(partial(_say_when_done, data.name))
        weights_out = args.weights_out or (str(Path(config.data_dir) / FINAL_WEIGHTS) if config.data_dir else None)
        if weights_out is not None:
            app.on_shutdown.append(final_weights_at_shutdown(config, weights_out))
        tune_process()  # this process serves thousands of phones: see fedfleet.tuning
    except BaseException:
        sock.close()
        raise
    scheme = "https" if ssl_context is not None else "http"
    host, port = sock.getsockname()[:2]
    mode = config.mode if config.topology == "none" else f"gossip relay ({config.topology}, {config.gossip_phones} phones)"
    print(f"fedfleet server: task {config.model} on {data.name}, {mode}, {config.rounds or 'unlimited'} "
          f"rounds, state in {config.data_dir or 'memory'}; listening on {scheme}://{_url_host(host)}:{port}",
          flush=True)
    web.run_app(app, sock=sock, access_log=None, print=None, ssl_context=ssl_context, loop=aio.new_event_loop())
    return 0


async def _say_when_done(dataset: str, app: Any) -> AsyncIterator[None]:
    """One line on stdout each time the task's rounds are all merged (an admin may add rounds later):
    the server keeps serving its final model, rounds and metrics until it is stopped."""
    watcher = asyncio.create_task(_watch_rounds(app, dataset))
    yield
    watcher.cancel()


async def _watch_rounds(app: Any, dataset: str, every_s: float = 0.5) -> None:
    from fedfleet.server.state import COORD

    said = 0
    while True:
        await asyncio.sleep(every_s)
        coord = app[COORD]
        if coord.done and coord.merges != said and len(coord.history) >= coord.merges:
            said = coord.merges
            accuracy = coord.history[-1].get("accuracy") if coord.history else None
            print(f"fedfleet server: {said} rounds done" + (f", accuracy {accuracy:.4f} on {dataset}"
                                                            if accuracy is not None else "")
                  + "; still serving the final model, GET /v1/rounds and /metrics until stopped (Ctrl-C)",
                  flush=True)


def final_weights_at_shutdown(config: Any, path: str) -> Any:
    """An on_shutdown hook writing the newest version as the task's model, a safetensors state_dict, to
    ``path``: the trained model of a `fedfleet serve` comes out when it stops (its versions are also in
    --data-dir's store, which `fedfleet export --from-run DATA_DIR` reads after a crash)."""
    from aiohttp import web

    async def write(app: web.Application) -> None:
        from fedfleet.protocol import decode_message
        from fedfleet.server.state import STORE
        from fedfleet.task import save_trained

        latest = app[STORE].latest_version()
        if latest is not None:
            from fedfleet.server.kept_state import KEPT_STATE, restore_state  # --local-state: the kept state

            save_trained(config, restore_state(decode_message(latest[1]).tensors, app[STORE].get_meta(KEPT_STATE)), path)
            print(f"fedfleet server: wrote version {latest[0]} to {path}", flush=True)

    return write


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _tls_context(cert: str | None, key: str | None) -> Any:
    if not (cert or key):
        return None
    import ssl

    if not (cert and key):
        raise CliError("--tls-cert and --tls-key go together")
    for flag, path in (("--tls-cert", cert), ("--tls-key", key)):
        if not Path(path).is_file():
            raise CliError(f"{flag} {path}: no such file")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        raise CliError(f"--tls-cert {cert} / --tls-key {key}: not a PEM certificate and its private key "
                       f"({exc.reason or exc})") from None
    except OSError as exc:
        raise CliError(f"--tls-cert {cert} / --tls-key {key}: {exc.strerror or exc}") from None
    return context


def _listen(host: str, port: int, backlog: int) -> socket.socket:
    """A listening TCP socket on ``host``:``port`` (bound here, so that a port in use is a one-line
    error before the server says it listens)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise CliError(f"--host {host}: {exc.strerror}") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as aiohttp does: restarts need no wait
        sock.bind(address)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise CliError(f"--host {host} --port {port}: {exc.strerror or exc}") from None
    sock.setblocking(False)
    return sock
