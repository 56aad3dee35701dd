"""``fedfleet fleet`` and ``fedfleet phone``: emulated phones against a running server."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from fedfleet.cli_errors import CliError, checking_input
from fedfleet.cli_flags import (
    FLEET_SETTINGS,
    PHONE_ONLY,
    SERVER_SETTINGS,
    SERVER_SIDE,
    enrolment_codes_of,
    run_values,
    toml_values,
)
from fedfleet.device_runtime import aio
from fedfleet.output import check_out_dir
from fedfleet.tuning import tune_process


def _phone_side_config(args: argparse.Namespace, section: str) -> tuple[Any, dict[str, Any]]:
    """The SimulateConfig of a fleet or phone's side (with its TOML section), and its file values."""
    from fedfleet.simulate_config import merge_config

    file_values = toml_values(args, section)
    for keys, reason in ((SERVER_SETTINGS, SERVER_SIDE), (FLEET_SETTINGS if section == "phone" else (), PHONE_ONLY)):
        given = [k for k in file_values if k in keys]
        if given:
            raise CliError(f"--config {args.config}: [{section}] {', '.join(given)}: {reason}")
    values = run_values(args)
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
    from fedfleet.device_runtime.fleet_plan import FleetConfig
    from fedfleet.simulate_config import SimulateConfig

    with checking_input():  # everything up to the phones' start judges what the user gave
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
        codes = enrolment_codes_of(args, cfg.phones)
        if backend == "ray":
            from fedfleet.device_runtime.ray_backend import import_ray

            if args.shards is not None and not 1 <= args.shards <= cfg.phones:
                raise CliError(f"--shards must be between 1 and the number of phones ({cfg.phones})")
            import_ray()
        check_out_dir(cfg.out, create=False)
        task = aio.run(_server_task(server))
        phone_model, prepared = _phones_model(model, task, server, cfg)
        note = ""
        if section == "phone":
            fleet_cfg, note = _phone_fleet_config(args, cfg, prepared.data)
        else:
            fleet_cfg = dataclasses.replace(cfg.fleet_config(), server_here=False, name_prefix=args.name_prefix)
        fleet_cfg = dataclasses.replace(fleet_cfg, max_rounds=rounds, availability=availability,
                                        model_fingerprint=prepared.fingerprint,
                                        # a phone's one code, whatever its index in the split
                                        enrolment_codes=codes * fleet_cfg.phones if section == "phone" else codes)
        assert isinstance(fleet_cfg, FleetConfig)
        if note:
            print(note, flush=True)
        if getattr(args, "gossip", None) is not None:  # phones gossip through the server's relay (docs/gossip.md)
            from fedfleet.gossip_fleet import run_gossip_fleet

            return run_gossip_fleet(args, server, cfg, task, rounds)
        # Training settings the user gave explicitly override the server's plan on these phones.
        overrides = {k: getattr(args, k) for k in ("local_epochs", "batch_size", "lr", "prox_mu")
                     if getattr(args, k) is not None}
    return _run_phones(args, section, server, cfg, fleet_cfg, overrides, rounds, backend, prepared.data, phone_model)


def _phones_model(model: str | None, task: dict[str, Any], server: str, cfg: Any) -> tuple[str, Any]:
    """The phones' own model (``--model``, or the server's built-in one) and the task prepared with it.
    A phone imports only model code given here: a server's MODULE:ATTR must be named by ``--model`` too.
    Its fingerprint goes with each registration, and the server refuses a model that is not its own."""
    from fedfleet.export.refs import BUILTIN_MODELS
    from fedfleet.task import prepare_task

    if model is None:
        if task["model"] not in BUILTIN_MODELS:
            raise CliError(f"the server at {server} trains the model {task['model']}; give --model MODULE:ATTR, "
                           "the phones' own import of it (phones import only model code given to them here)")
        model = str(task["model"])
    elif task.get("model_fingerprint") is None and task["model"] != model:  # a server without fingerprints
        raise CliError(f"--model {model}: the server at {server} trains {task['model']!r}")
    if task.get("loss") not in (None, "cross_entropy") and cfg.loss is None:
        raise CliError(f"the server at {server} trains with the loss {task['loss']}; give --loss {task['loss']}, "
                       "the phones' own import of it")
    return model, prepare_task(model, cfg.dataset, cfg.seed, cfg.image_size, loss=cfg.loss, partition=cfg.partition,
                               runtime=cfg.runtime, attack=cfg.attack)


def _phone_fleet_config(args: argparse.Namespace, cfg: Any, data: Any) -> tuple[Any, str]:
    """One phone: shard I of an N-phone split of the training set (the same draw as phone I of a fleet
    of N with this --partition and --seed); and a line saying so."""
    import numpy as np

    from fedfleet.device_runtime.data import partition

    index, count = args.shard
    fleet_cfg = dataclasses.replace(cfg.fleet_config(), phones=count, shard_index=index, shard_count=count,
                                    server_here=False, name_prefix=args.name, phone_name=args.name)
    part = partition(data.y_train, count, cfg.partition, np.random.default_rng(cfg.seed), cfg.quantity_skew)[index]
    return fleet_cfg, (f"fedfleet phone: {args.name} trains on shard {index} of {count} of "
                       f"{cfg.dataset} ({len(part)} of {len(data.y_train)} examples, partition {cfg.partition}, "
                       f"seed {cfg.seed})")


def _run_phones(args: argparse.Namespace, section: str, server: str, cfg: Any, fleet_cfg: Any,
                overrides: dict[str, Any], rounds: int, backend: str, prepared_data: Any, model: str) -> int:
    from fedfleet.device_runtime.fleet import run_fleet
    from fedfleet.device_runtime.fleet_result import FleetError, NamesTaken, fleet_summary
    from fedfleet.device_runtime.task_runtime import task_runtime_factory
    from fedfleet.output import RoundTable, summarize, write_run

    tune_process(torch_threads=1)  # this process emulates many phones: see fedfleet.tuning
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
            data = prepared_data
            result, signum = aio.run(_until_signal(run_fleet(
                server, data, fleet_cfg, task_runtime_factory(model, loss=cfg.loss), on_round=on_round,
                train_overrides=overrides),
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
    from fedfleet.device_runtime.ray_backend import LOCAL_ADDRESSES, ray_cluster, run_ray_fleet

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
