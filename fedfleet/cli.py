"""``fedfleet`` subcommands: serve, phone, fleet, simulate (and export)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from device_runtime import aio
from fedfleet.output import check_out_dir
from server.config import load_toml


class CliError(Exception):
    """A user's mistake found by the command line itself: reported as one line, exit status 2."""


# Settings of the server's task: `simulate` starts its own server and takes them; `fleet` and `phone`
# join a running server whose task decides them, so there they are refused (see _refuse).
SERVER_SETTINGS = ("mode", "concurrency", "buffer", "staleness", "max_staleness", "server_optimizer", "server_lr",
                   "clip", "noise", "noise_multiplier", "epsilon", "delta", "topk", "randk", "quant_bits",
                   "error_feedback", "compress", "quant_rounding", "quant_scale", "epsilon_budget", "central_clip",
                   "central_noise_multiplier", "robust", "server_process")
# What only a fleet of several phones takes: refused on `phone`.
FLEET_SETTINGS = ("phones", "workers", "trainer", "attack", "attack_fraction")


def _phone_side_flags(p: argparse.ArgumentParser, fleet: bool) -> None:
    """The flags of the phones' side, for simulate and fleet (``fleet``) or one phone (not ``fleet``)."""
    p.add_argument("--config", help="TOML file with any of these settings (flags override it)")
    if fleet:
        p.add_argument("--phones", type=int, help="number of emulated phones (default 50)")
    p.add_argument("--dataset", help="the phones' data: digits | mnist5k | synthetic[:N[:SIDE]] | mnist:PATH | "
                                     "fashion:PATH | cifar10:PATH (default digits)")
    p.add_argument("--partition", help="how the training set is split among phones: iid | dirichlet:ALPHA | "
                                       "shards:K (default iid)")
    p.add_argument("--quantity-skew", type=float, help="iid: lognormal sigma of phone data sizes (default 0)")
    p.add_argument("--seed", type=int, help="seed of the phones' data split and every random choice (default 0)")
    if fleet:
        p.add_argument("--workers", type=int, help="local trainings in parallel with --trainer pool (default 2)")
        p.add_argument("--trainer", choices=["batched", "pool"], help="batched: phones on one version train in one "
                                                                       "vmapped step (default); pool: one by one")
    p.add_argument("--runtime", choices=["torch", "executorch", "onnx"], help="on-device runtime (default torch)")
    p.add_argument("--out", help="output folder for metrics.jsonl, summary.json, devices.csv (default runs/latest)")
    p.add_argument("--devices", help="none | default | PATH.csv: emulated device speeds, links, availability "
                                     "(default none)")
    p.add_argument("--compute-ms", type=float, help="default devices: mean ms per training sample (default 5)")
    p.add_argument("--diurnal", type=float, help="default devices: fraction available only at night (default 0)")
    p.add_argument("--dropout", type=float, help="default devices: probability of vanishing mid-task (default 0)")
    p.add_argument("--hours", type=float, help="stop after this much (virtual) time, e.g. 24 for a day "
                                               "(default 0: no limit)")
    if fleet:
        p.add_argument("--attack", help="Byzantine phones: none | signflip | scale:F | noise:STD | labelflip "
                                        "(default none)")
        p.add_argument("--attack-fraction", type=float, help="share of phones that attack (default 0)")
    p.add_argument("--inline-model", choices=["yes", "no"],
                   help="phones take the model in the check-in's answer (yes, default: one request per task "
                        "less) or download it with GET /v1/model (no)")
    p.add_argument("--chain-checkin", choices=["yes", "no"],
                   help="phones without an emulated device make their next check-in in the same request as "
                        "their upload (yes: one request per task less) or on its own (no); default: yes, except "
                        "for fleets of over 1,000 phones sharing their process with the server")


def _training_flags(p: argparse.ArgumentParser, server_here: bool) -> None:
    """Local training: the task's plan on a server of one's own, or overrides of a running server's plan."""
    what = "" if server_here else "override the server's plan on these phones: "
    p.add_argument("--local-epochs", type=int, help=f"{what}local epochs per task" + (" (default 5)" if server_here else ""))
    p.add_argument("--batch-size", type=int, help=f"{what}local batch size" + (" (default 8)" if server_here else ""))
    p.add_argument("--lr", type=float, help=f"{what}local SGD learning rate" + (" (default 0.1)" if server_here else ""))
    p.add_argument("--prox-mu", type=float, help=f"{what}FedProx proximal weight"
                                                 + (" (default 0 = FedAvg)" if server_here else ""))


def _server_task_flags(p: argparse.ArgumentParser) -> None:
    """The task of simulate's own server: rounds, cohorts, merging, codec and privacy, robustness."""
    p.add_argument("--rounds", type=int, help="federated rounds (default 10; 0 = until stopped with Ctrl-C)")
    p.add_argument("--sample", type=float, help="fraction of the phones whose updates each round waits for "
                                                "(default 0.5)")
    p.add_argument("--model", help="mlp | cnn | mobilenet (default cnn)")
    p.add_argument("--mode", choices=["sync", "async"], help="synchronous rounds or FedBuff (default sync)")
    p.add_argument("--concurrency", type=int, help="async: phones training at once (default 20)")
    p.add_argument("--buffer", type=int, help="async: updates per merge, K (default 10)")
    p.add_argument("--staleness", help="async: constant | inverse | poly:A | hinge:A:B (default poly:0.5)")
    p.add_argument("--max-staleness", type=int, help="async: older updates are refused (default 20)")
    p.add_argument("--server-optimizer", choices=["fedavg", "fedavgm", "fedadam", "fedyogi"],
                   help="how the server applies the mean update (default fedavg)")
    p.add_argument("--server-lr", type=float, help="server learning rate (default 1.0)")
    p.add_argument("--clock", choices=["auto", "wall", "virtual"],
                   help="virtual time (default auto: virtual when devices are emulated)")
    p.add_argument("--clip", type=float, help="L2 clipping norm C of each update (default: none)")
    p.add_argument("--noise", choices=["gaussian", "laplace"], help="local DP mechanism (default gaussian)")
    p.add_argument("--noise-multiplier", type=float, help="local DP noise = z * C per update")
    p.add_argument("--epsilon", type=float, help="...or calibrate the noise to this epsilon per update")
    p.add_argument("--delta", type=float, help="delta for calibration and reporting (default 1e-5)")
    p.add_argument("--topk", type=float, help="send this fraction of each tensor (largest magnitudes)")
    p.add_argument("--randk", type=float, help="send a random fraction of each tensor (unbiased)")
    p.add_argument("--quant-bits", type=int, choices=[32, 8, 4, 2, 1], help="bits per value sent (default 32)")
    p.add_argument("--error-feedback", action="store_true", default=None, help="carry unsent residuals forward")
    p.add_argument("--compress", action="store_true", default=None, help="zlib over the update payload and header")
    p.add_argument("--quant-rounding", choices=["stochastic", "nearest"],
                   help="stochastic (unbiased, default) or nearest (deterministic; pair with --error-feedback)")
    p.add_argument("--quant-scale", choices=["max", "fit"],
                   help="per-chunk scale: max|x| (default) or fit (least squares; needs --quant-rounding nearest; "
                        "at 1 bit: sign x mean|x|, STC)")
    p.add_argument("--epsilon-budget", type=float, help="stop scheduling phones past this local epsilon")
    p.add_argument("--central-clip", type=float, help="central DP: clip each update on the server")
    p.add_argument("--central-noise-multiplier", type=float, help="central DP: noise on the clipped sum")
    p.add_argument("--robust", help="none | normbound[:C|:median*K] | median | trimmed[:B] | krum[:F|:P%%] | "
                                    "multikrum[:F|:P%%][:M], chained with '+' (default none; bare forms need no "
                                    "attacker count)")
    p.add_argument("--server-process", choices=["auto", "yes", "no"],
                   help="run the server in its own process (wall clock only; auto, the default: for 1,000+ "
                        "phones on 2+ cores)")


class _Refused(argparse.Action):
    """A flag this subcommand does not take: a clear error instead of "unrecognized arguments"."""

    def __init__(self, option_strings: list[str], dest: str, reason: str = "", **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs="?", help=argparse.SUPPRESS, **kwargs)
        self.reason = reason

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        parser.error(f"{option_string} {self.reason}")


def _refuse(p: argparse.ArgumentParser, names: tuple[str, ...], reason: str) -> None:
    for name in names:
        p.add_argument("--" + name.replace("_", "-"), action=_Refused, reason=reason, dest="refused_" + name)


PHONE_ONLY = "is a setting of a fleet of phones: `fedfleet phone` runs one (use `fedfleet fleet`)"
SERVER_SIDE = ("is a setting of the server's task: give it to `fedfleet serve` (or its [server] TOML); "
               "phones follow the task of the server they join")


def _run_values(args: argparse.Namespace) -> dict[str, Any]:
    """The SimulateConfig values given as flags (None: not given) of whichever subcommand ran."""
    from fedfleet.simulate import SimulateConfig

    values = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(SimulateConfig)}
    for key in ("inline_model", "chain_checkin"):
        values[key] = None if values[key] is None else values[key] == "yes"
    values.pop("server")
    values.pop("start_spread_s")
    return values


def _file_values(args: argparse.Namespace, section: str) -> dict[str, Any]:
    return load_toml(args.config, section) if args.config else {}


def cmd_simulate(args: argparse.Namespace) -> int:
    from fedfleet.simulate import Interrupt, merge_config, run

    cfg = merge_config(_file_values(args, "simulate"), _run_values(args), args.config)
    check_out_dir(cfg.out, create=False)
    _ = cfg.use_server_process  # raises for --server-process yes on a virtual clock
    print(f"fedfleet simulate: {cfg.phones} phones, {cfg.dataset}, {cfg.model}, {cfg.rounds or 'unlimited'} rounds, "
          f"sample {cfg.sample}, partition {cfg.partition}, runtime {cfg.runtime}", flush=True)
    interrupt = Interrupt()
    summary = run(cfg, interrupt)
    accuracy = summary["final_accuracy"]
    print(f"final accuracy {'-' if accuracy is None else f'{accuracy:.4f}'} after {summary['rounds']} rounds, "
          f"{summary['bytes_up']} bytes up, {summary['bytes_down']} bytes down, {summary['wall_s']:.1f} s; "
          f"wrote {cfg.out}/metrics.jsonl, summary.json" + (", devices.csv" if summary["phones"] else ""), flush=True)
    if interrupt.signum:
        print(f"fedfleet simulate: stopped by {summary['interrupted']} after {summary['rounds']} rounds",
              file=sys.stderr, flush=True)
        return 128 + interrupt.signum
    return 0


def _phone_side_config(args: argparse.Namespace, section: str) -> tuple[Any, dict[str, Any]]:
    """The SimulateConfig of a fleet or phone's side (with its TOML section), and its file values."""
    from fedfleet.simulate import merge_config

    file_values = _file_values(args, section)
    for keys, reason in ((SERVER_SETTINGS, SERVER_SIDE), (FLEET_SETTINGS if section == "phone" else (), PHONE_ONLY)):
        given = [k for k in file_values if k in keys]
        if given:
            raise CliError(f"--config {args.config}: [{section}] {', '.join(given)}: {reason}")
    values = _run_values(args)
    for key in ("rounds", "sample", "model"):  # what these mean for a fleet differs: see cmd_fleet
        file_values.pop(key, None)
        values.pop(key, None)
    return merge_config(file_values, values, args.config), file_values


def _fleet_setting(args: argparse.Namespace, key: str, file_values: dict[str, Any], default: Any) -> Any:
    value = getattr(args, key, None)
    return value if value is not None else file_values.get(key, default)


def check_server_url(url: str) -> str:
    """``--server``: an http(s) URL with a host; CliError otherwise."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise CliError(f"--server {url}: give the server's URL with http:// or https://, e.g. http://127.0.0.1:8080")
    try:
        parts.port  # noqa: B018  (raises on a port that is not a number or out of range)
    except ValueError as exc:
        raise CliError(f"--server {url}: {exc}") from None
    return url.rstrip("/")


async def _server_task(url: str) -> dict[str, Any]:
    """The running server's task (GET /v1/task), or CliError saying why it cannot be had."""
    import aiohttp

    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session, \
                session.get(f"{url}/v1/task") as resp:
            if resp.status != 200:
                raise CliError(f"--server {url}: GET /v1/task answered {resp.status} {resp.reason}; "
                               "is this a fedfleet server?")
            task = await resp.json(content_type=None)
    except aiohttp.ClientConnectorError as exc:
        raise CliError(f"--server {url}: cannot connect ({exc.os_error.strerror or exc.os_error})") from None
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise CliError(f"--server {url}: {type(exc).__name__}: {exc or 'no answer'}") from None
    except ValueError:
        raise CliError(f"--server {url}: GET /v1/task did not answer JSON; is this a fedfleet server?") from None
    if not isinstance(task, dict) or "model" not in task:
        raise CliError(f"--server {url}: GET /v1/task did not answer a task; is this a fedfleet server?")
    return task


async def _until_signal(coro: Any, command: str) -> tuple[Any, int]:
    """Await ``coro`` until it ends or SIGINT/SIGTERM arrives, which cancels it (its cleanups run);
    returns (its result or None, the signal or 0). A second signal exits at once (128 + signal)."""
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(coro)
    got: list[int] = []

    def on_signal(signum: int) -> None:
        name = signal.Signals(signum).name
        if got:
            print(f"fedfleet {command}: {name} again: exiting now", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        got.append(signum)
        print(f"\nfedfleet {command}: {name}: stopping the phones, then writing the rounds seen "
              f"({'Ctrl-C' if signum == signal.SIGINT else 'the signal'} again to exit at once)",
              file=sys.stderr, flush=True)
        task.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        return await task, 0
    except asyncio.CancelledError:
        if not got:
            raise
        return None, got[0]
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def cmd_fleet(args: argparse.Namespace) -> int:
    from device_runtime.fleet import FleetConfig
    from fedfleet.simulate import SimulateConfig

    section = "phone" if args.command == "phone" else "fleet"
    cfg, file_values = _phone_side_config(args, section)
    backend = getattr(args, "backend", "local")
    if backend != "ray" and (getattr(args, "address", None) or getattr(args, "shards", None)):
        raise CliError("--address and --shards go with --backend ray")
    if backend == "ray" and cfg.clock == "virtual":
        raise CliError("--backend ray runs on the wall clock: a virtual clock cannot be shared by phones in "
                       "several processes; drop --clock virtual or use --backend local")
    if cfg.clock == "virtual":
        raise CliError("--clock virtual: phones on a virtual clock need their server on the same clock; "
                       "use `fedfleet simulate` (a fleet against a running server runs on the wall clock)")
    rounds = _fleet_setting(args, "rounds", file_values, 0)
    availability = _fleet_setting(args, "sample", file_values, 1.0)
    model = _fleet_setting(args, "model", file_values, None)
    # The same checks and messages as simulate's for these two (SimulateConfig names them as flags).
    SimulateConfig(rounds=rounds, sample=availability)
    server = check_server_url(args.server)
    if backend == "ray":
        from device_runtime.ray_backend import import_ray

        if args.shards is not None and not 1 <= args.shards <= cfg.phones:
            raise CliError(f"--shards must be between 1 and the number of phones ({cfg.phones})")
        import_ray()
    check_out_dir(cfg.out, create=False)
    note = ""
    if section == "phone":
        fleet_cfg, note = _phone_fleet_config(args, cfg)
    else:
        fleet_cfg = dataclasses.replace(cfg.fleet_config(), server_here=False, name_prefix=args.name_prefix)
    fleet_cfg = dataclasses.replace(fleet_cfg, max_rounds=rounds, availability=availability)
    assert isinstance(fleet_cfg, FleetConfig)
    task = aio.run(_server_task(server))
    if model is not None and task["model"] != model:
        raise CliError(f"--model {model}: the server at {server} trains {task['model']!r}")
    if note:
        print(note, flush=True)
    # Training settings the user gave explicitly override the server's plan on these phones.
    overrides = {k: getattr(args, k) for k in ("local_epochs", "batch_size", "lr", "prox_mu")
                 if getattr(args, k) is not None}
    return _run_phones(args, section, server, cfg, fleet_cfg, overrides, rounds, backend)


def _phone_fleet_config(args: argparse.Namespace, cfg: Any) -> tuple[Any, str]:
    """One phone: shard I of an N-phone split of the training set (the same draw as phone I of a fleet
    of N with this --partition and --seed); and a line saying so."""
    import numpy as np

    from device_runtime.data import load_dataset, partition

    index, count = args.shard
    fleet_cfg = dataclasses.replace(cfg.fleet_config(), phones=count, shard_index=index, shard_count=count,
                                    server_here=False, name_prefix=args.name, phone_name=args.name)
    data = load_dataset(cfg.dataset, seed=cfg.seed)
    part = partition(data.y_train, count, cfg.partition, np.random.default_rng(cfg.seed), cfg.quantity_skew)[index]
    return fleet_cfg, (f"fedfleet phone: {args.name} trains on shard {index} of {count} of "
                       f"{cfg.dataset} ({len(part)} of {len(data.y_train)} examples, partition {cfg.partition}, "
                       f"seed {cfg.seed})")


def _run_phones(args: argparse.Namespace, section: str, server: str, cfg: Any, fleet_cfg: Any,
                overrides: dict[str, Any], rounds: int, backend: str) -> int:
    from device_runtime.data import load_dataset
    from device_runtime.fleet import FleetError, NamesTaken, fleet_summary, run_fleet
    from device_runtime.runtimes.torch_runtime import torch_runtime_for_task
    from fedfleet.output import RoundTable, summarize, write_run

    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    table = RoundTable(stream=sys.stdout, total=rounds)

    def on_round(row: dict[str, Any]) -> None:
        rows.append(row)
        table(row)

    data = None
    failure: FleetError | None = None
    try:
        if backend == "ray":
            result, signum = _fleet_on_ray(args, cfg.dataset, cfg.seed, fleet_cfg, overrides, on_round)
        else:
            data = load_dataset(cfg.dataset, seed=cfg.seed)
            result, signum = aio.run(_until_signal(run_fleet(
                server, data, fleet_cfg, torch_runtime_for_task, on_round=on_round, train_overrides=overrides),
                section))
    except FleetError as exc:
        if isinstance(exc, NamesTaken) or exc.result is None:
            raise CliError(str(exc)) from None
        failure, result, signum = exc, exc.result, 0
    finally:
        table.close()
    devices = result.devices if result is not None else []
    wall_s = time.perf_counter() - t0
    summary = summarize(result.rounds if result is not None else rows, devices, wall_s)
    if result is not None and data is not None:
        summary.update(fleet_summary(result, fleet_cfg, data, wall_s, server=server, train_overrides=overrides))
    if signum:
        summary["interrupted"] = signal.Signals(signum).name
    write_run(Path(cfg.out), result.rounds if result is not None else rows, devices, summary)
    print(json.dumps({k: summary[k] for k in ("rounds", "final_accuracy", "bytes_up", "bytes_down")}))
    if failure is not None:  # what the phones saw is written: the error is the server's, not the user's
        print(f"fedfleet {section}: error: {failure}; wrote its {summary['rounds']} rounds to {cfg.out}",
              file=sys.stderr, flush=True)
        return 1
    if signum:
        print(f"fedfleet {section}: stopped by {summary['interrupted']} after {summary['rounds']} rounds; wrote "
              f"{cfg.out}/metrics.jsonl and summary.json (no devices.csv: the phones' counts end with them)",
              file=sys.stderr, flush=True)
        return 128 + signum
    return 0


def _fleet_on_ray(args: argparse.Namespace, dataset: str, seed: int, fleet_cfg: Any, overrides: dict[str, Any],
                  table: Any) -> tuple[Any, int]:
    """The same fleet, sharded over a Ray cluster (started locally unless --address names one)."""
    from device_runtime.ray_backend import LOCAL_ADDRESSES, ray_cluster, run_ray_fleet

    host = args.server.split("://", 1)[-1].split("/", 1)[0].rsplit(":", 1)[0]
    if args.address not in LOCAL_ADDRESSES and host in ("127.0.0.1", "localhost", "[::1]"):
        print(f"fedfleet: warning: --server {args.server} is a loopback address; shards on other machines "
              "will not reach it", file=sys.stderr, flush=True)

    def shard_done(s: Any) -> None:
        print(f"shard {s.shard}: {len(s.devices)} phones on {s.host} (pid {s.pid}) done in {s.wall_s:.1f} s",
              flush=True)

    with ray_cluster(args.address, quiet=not args.verbose) as ray:
        print(f"ray: {ray.cluster_resources().get('CPU', 0):g} CPUs on {len(ray.nodes())} node(s)", flush=True)
        return aio.run(_until_signal(run_ray_fleet(args.server, dataset, fleet_cfg, shards=args.shards,
                                                   dataset_seed=seed, train_overrides=overrides, on_round=table,
                                                   on_shard=shard_done), "fleet"))


def cmd_phone(args: argparse.Namespace) -> int:
    return cmd_fleet(args)


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a TCP port (1-65535)")
    return port


def _shard(text: str) -> tuple[int, int]:
    index, sep, count = text.partition("/")
    if not (sep and index.isdigit() and count.isdigit() and int(index) < int(count)):
        raise argparse.ArgumentTypeError(f"{text!r}: give I/N with 0 <= I < N, e.g. 3/50")
    return int(index), int(count)


def cmd_serve(args: argparse.Namespace) -> int:
    from aiohttp import web

    from device_runtime.data import check_dataset_name, load_dataset
    from device_runtime.limits import ACCEPT_BACKLOG, open_file_limit
    from server.app import make_app
    from server.config import ServerConfig

    # Everything the user gave is checked before the banner, and before anything goes into --data-dir.
    values = _file_values(args, "server")
    dataset = args.dataset or values.pop("dataset", "digits")
    if not isinstance(dataset, str):
        raise CliError(f"--config {args.config}: dataset must be a string, got {dataset!r}")
    for key, flag in (("model", args.model), ("rounds", args.rounds), ("sample_fraction", args.sample),
                      ("seed", args.seed), ("mode", args.mode), ("data_dir", args.data_dir),
                      ("bundle_dir", args.bundle)):
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedfleet", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log server and client details")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the aggregation server")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0: every "
                                                        "IPv4 interface)")
    p.add_argument("--port", type=_port, default=8080, help="TCP port to listen on (default 8080)")
    p.add_argument("--data-dir", help="where the server keeps its state (SQLite, metrics.jsonl); a restarted "
                                      "server resumes from it (default: in memory, lost on exit)")
    p.add_argument("--config", help="TOML with a [server] table of ServerConfig fields (server/config.py); "
                                    "flags override it (default: none)")
    p.add_argument("--dataset", help="held-out split for evaluation, and the input shape (default digits)")
    p.add_argument("--model", help="mlp | cnn | mobilenet (default cnn)")
    p.add_argument("--mode", choices=["sync", "async"], help="sync: FedAvg rounds; async: FedBuff merges "
                                                            "(default sync)")
    p.add_argument("--rounds", type=int, help="rounds (merges) to run (default 10; 0 = until stopped)")
    p.add_argument("--sample", type=float, help="sync: fraction of the registered phones whose updates each "
                                                "round waits for (default 0.5)")
    p.add_argument("--seed", type=int, help="seed of the initial model, the test split and the server's random "
                                            "choices (default 0)")
    p.add_argument("--bundle", help="the task's exported bundle directory (fedfleet export), served to phones "
                                    "(default: none)")
    p.add_argument("--tls-cert", help="serve HTTPS with this certificate (PEM) ... (default: plain HTTP)")
    p.add_argument("--tls-key", help="... and this private key (PEM) (default: none)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("simulate", help="a server on loopback plus an emulated fleet")
    _phone_side_flags(p, fleet=True)
    _training_flags(p, server_here=True)
    _server_task_flags(p)
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("fleet", help="an emulated fleet against a running server")
    p.add_argument("--server", required=True, help="server URL, e.g. http://127.0.0.1:8080")
    p.add_argument("--name-prefix", default="phone", help="phones are named PREFIX-00000, ... (default phone)")
    p.add_argument("--backend", choices=["local", "ray"], default="local",
                   help="local: every phone in this process (default); ray: phones sharded over a Ray cluster")
    p.add_argument("--address", help="ray: 'local' (default) starts a Ray cluster on this machine; 'auto' or "
                                      "HOST:PORT joins a running one (`ray start --head`)")
    p.add_argument("--shards", type=int, help="ray: shards of phones, one Ray task each (default: one per CPU)")
    _fleet_task_flags(p)
    _phone_side_flags(p, fleet=True)
    _training_flags(p, server_here=False)
    p.add_argument("--clock", choices=["auto", "wall", "virtual"], help=argparse.SUPPRESS)  # only to refuse virtual
    _refuse(p, SERVER_SETTINGS, SERVER_SIDE)
    p.set_defaults(func=cmd_fleet)

    p = sub.add_parser("phone", help="one phone against a running server")
    p.add_argument("--server", required=True, help="server URL, e.g. http://127.0.0.1:8080")
    p.add_argument("--name", default="phone", help="the phone registers as NAME-I, I its shard (default phone); "
                                                   "names are unique on a server")
    p.add_argument("--shard", type=_shard, default=(0, 50),
                   help="train on shard I of the training set split N ways (--partition, --seed), as phone I "
                        "of an N-phone fleet would (default 0/50)")
    _fleet_task_flags(p)
    _phone_side_flags(p, fleet=False)
    _training_flags(p, server_here=False)
    p.add_argument("--clock", choices=["auto", "wall", "virtual"], help=argparse.SUPPRESS)
    _refuse(p, SERVER_SETTINGS, SERVER_SIDE)
    _refuse(p, FLEET_SETTINGS + ("name_prefix", "backend", "address", "shards"), PHONE_ONLY)
    p.set_defaults(func=cmd_phone)
    _register_optional(sub)
    return parser


def _fleet_task_flags(p: argparse.ArgumentParser) -> None:
    """What --rounds, --sample and --model mean against a running server (see run_fleet, _monitor)."""
    p.add_argument("--rounds", type=int, help="leave after N rounds merged since these phones joined (rounds the "
                                              "server ran before are not counted; default 0: until the server's "
                                              "task is done)")
    p.add_argument("--sample", type=float, help="probability that a phone is available at each check-in; the "
                                                "server decides cohorts (default 1)")
    p.add_argument("--model", help="refuse to run unless the server trains this model (default: the server's "
                                   "model, whatever it is)")


def _register_optional(sub: Any) -> None:
    from fedfleet.report import register as register_report

    register_report(sub)
    try:
        from export.cli import register
    except ImportError:
        return
    register(sub)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    command = f"fedfleet {args.command}"
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print(f"\n{command}: interrupted", file=sys.stderr, flush=True)
        return 128 + signal.SIGINT
    except Exception as exc:
        interrupted = sys.modules.get("fedfleet.simulate")
        if interrupted is not None and isinstance(exc, interrupted.Interrupted):
            print(f"{command}: {exc}", file=sys.stderr, flush=True)
            return 128 + exc.signum
        message = _user_error(exc)
        if message is None:
            raise  # a fault of ours, not the user's: its traceback is the report
        print(f"{command}: error: {message}", file=sys.stderr, flush=True)
        return 2


def _user_error(exc: Exception) -> str | None:
    """The one-line message of an exception caused by what the user gave (a flag, a file, a server
    to reach), or None for anything else. Only classes of modules already loaded are looked up."""
    if isinstance(exc, (CliError, ValueError, FileNotFoundError)):
        return str(exc)
    mods = sys.modules
    if "export.manifest" in mods and isinstance(exc, mods["export.manifest"].BundleError):
        return f"bundle: {exc}"
    if "device_runtime.client" in mods and isinstance(exc, mods["device_runtime.client"].ServerError):
        return f"the server refused: {exc}"
    if "aiohttp" in mods:
        aiohttp = mods["aiohttp"]
        if isinstance(exc, aiohttp.ClientConnectorError):
            return f"cannot reach the server at {exc.host}:{exc.port} ({exc.os_error.strerror or exc.os_error})"
        if isinstance(exc, aiohttp.ClientResponseError):
            return f"the server answered {exc.status} {exc.message} to {exc.request_info.method} {exc.request_info.url}"
        if isinstance(exc, aiohttp.InvalidURL):
            return f"not a server URL: {exc}"
    return None


if __name__ == "__main__":
    sys.exit(main())
