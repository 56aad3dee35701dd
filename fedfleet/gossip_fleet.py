"""``fedfleet fleet --gossip dpsgd|choco``: emulated phones gossiping through the relay of a running
``fedfleet serve --mode gossip`` (docs/gossip.md). The phones' loop is fedfleet.gossip_run's; here,
on the wall clock, against a server elsewhere, with the training plan of the server's task unless
the flags override it."""

from __future__ import annotations

import argparse
import time
from typing import TYPE_CHECKING, Any

from fedfleet.cli_errors import CliError
from fedfleet.device_runtime import aio
from fedfleet.output import RoundTable
from fedfleet.simulate_config import SimulateConfig

if TYPE_CHECKING:
    from fedfleet.gossip_run import Stop

TRAIN_KEYS = ("local_epochs", "batch_size", "lr", "prox_mu")


def run_gossip_fleet(args: argparse.Namespace, server: str, cfg: SimulateConfig, task: dict[str, Any],
                     rounds: int) -> int:
    if getattr(args, "backend", "local") != "local":
        raise CliError("--gossip runs its phones in this process: drop --backend ray")
    if getattr(args, "sample", None) not in (None, 1.0):
        raise CliError("--sample is not taken with --gossip: phones are away as their device profiles say (--devices)")
    plan = {k: getattr(args, k) if getattr(args, k) is not None else task["train"][k] for k in TRAIN_KEYS}
    cfg = cfg.replace(mode="gossip", model=str(task["model"]), rounds=rounds or 10, **plan)
    print(f"fedfleet fleet: {cfg.phones} phones gossiping ({cfg.gossip}) through {server} for {cfg.rounds} rounds, "
          f"{cfg.dataset}, partition {cfg.partition}", flush=True)
    t0 = time.perf_counter()
    table = RoundTable(total=cfg.rounds)
    from fedfleet.gossip_run import until_signal, write_gossip_run

    try:
        (rows, fleet), signum = aio.run(until_signal(lambda stop: _phones(cfg, server, task, table, args.name_prefix,
                                                                          stop), "fleet"))
    finally:
        table.close()

    result = write_gossip_run(cfg, rows, fleet, time.perf_counter() - t0, signum)
    s = result.summary
    accuracy = s["final_accuracy"]
    print(f"final accuracy {'-' if accuracy is None else f'{accuracy:.4f}'} (average model) after {s['rounds']} "
          f"rounds, {s['bytes_up']} bytes up, {s['bytes_down']} bytes down; wrote {cfg.out}/metrics.jsonl, "
          "summary.json, devices.csv", flush=True)
    return 128 + signum if signum else 0


async def _phones(cfg: SimulateConfig, server: str, task: dict[str, Any], table: RoundTable, prefix: str,
                  stop: Stop) -> Any:
    import aiohttp

    from fedfleet.device_runtime.clock import WallClock
    from fedfleet.device_runtime.data import load_dataset
    from fedfleet.gossip_run import run_phones

    data = load_dataset(cfg.dataset, seed=cfg.seed)
    if tuple(task["input_shape"]) != data.input_shape:
        raise CliError(f"--dataset {cfg.dataset}: inputs {data.input_shape}, but the server trains on "
                       f"{tuple(task['input_shape'])}")
    async with aiohttp.ClientSession() as session:
        return await run_phones(cfg, data, server, session, WallClock(), table, prefix, stop)
