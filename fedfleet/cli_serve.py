"""``fedfleet serve``: the aggregation server, every flag checked before it says it listens."""

from __future__ import annotations

import argparse
import socket
from pathlib import Path
from typing import Any

from fedfleet.cli_errors import CliError
from fedfleet.cli_flags import _file_values
from fedfleet.device_runtime import aio
from fedfleet.output import check_out_dir


def cmd_serve(args: argparse.Namespace) -> int:
    from aiohttp import web

    from fedfleet.device_runtime.data import check_dataset_name, load_dataset
    from fedfleet.device_runtime.limits import ACCEPT_BACKLOG, open_file_limit
    from fedfleet.server.app import make_app
    from fedfleet.server.config import ServerConfig

    # Everything the user gave is checked before the banner, and before anything goes into --data-dir.
    values = _file_values(args, "server")
    dataset = args.dataset or values.pop("dataset", "digits")
    if not isinstance(dataset, str):
        raise CliError(f"--config {args.config}: dataset must be a string, got {dataset!r}")
    for key, flag in (("model", args.model), ("rounds", args.rounds), ("sample_fraction", args.sample),
                      ("seed", args.seed), ("mode", args.mode), ("data_dir", args.data_dir),
                      ("bundle_dir", args.bundle), ("secure_agg", args.secure_agg),
                      ("secagg_threshold", args.secagg_threshold), ("secagg_degree", args.secagg_degree),
                      ("distributed_noise_multiplier", args.distributed_noise_multiplier)):
        if flag is not None:
            values[key] = flag
    config = ServerConfig().replace(**values)
    check_dataset_name(dataset)
    if config.data_dir is not None and Path(config.data_dir).exists() and not Path(config.data_dir).is_dir():
        raise CliError(f"--data-dir {config.data_dir}: exists and is not a folder")
    if config.bundle_dir is not None and not (Path(config.bundle_dir) / "manifest.json").is_file():
        raise CliError(f"--bundle {config.bundle_dir}: no manifest.json there; make the bundle with `fedfleet export`")
    ssl_context = _tls_context(args.tls_cert, args.tls_key)
    sock = _listen(args.host, args.port, ACCEPT_BACKLOG)
    try:
        if config.data_dir is not None:
            check_out_dir(config.data_dir, "--data-dir")
        open_file_limit()  # each long-polling phone holds a socket: go up to the hard limit
        data = load_dataset(dataset, seed=config.seed)
        config = config.replace(input_shape=data.input_shape, num_classes=data.num_classes)
        app = make_app(config, test_data=(data.x_test, data.y_test))
    except BaseException:
        sock.close()
        raise
    scheme = "https" if ssl_context is not None else "http"
    host, port = sock.getsockname()[:2]
    print(f"fedfleet server: task {config.model} on {data.name}, {config.mode}, {config.rounds or 'unlimited'} "
          f"rounds, state in {config.data_dir or 'memory'}; listening on {scheme}://{_url_host(host)}:{port}",
          flush=True)
    web.run_app(app, sock=sock, access_log=None, print=None, ssl_context=ssl_context, loop=aio.new_event_loop())
    return 0


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
