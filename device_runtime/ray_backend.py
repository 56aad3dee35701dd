"""Scale a fleet out over Ray: shards of phones on the cluster's workers, all talking to one server.

Phone indices 0..N-1 are split into S contiguous shards (``fleet.shard_phones``). Each shard is
one Ray task that loads the dataset itself (nothing large leaves the driver), builds the same
seeded partition as a single-process fleet and runs only its own phones through ``run_fleet``;
phone names, data and random streams are therefore exactly those of ``--backend local``. The
shards wait for each other once their phones are registered (a barrier actor), so the server
sizes its first round on the whole fleet. The driver polls the server's rounds like a local fleet
and gathers every phone's statistics from the shards.

Ray runs on the wall clock: a virtual clock lives in one process and cannot be shared by phones
on several machines. Ray is an optional dependency: ``pip install 'fedfleet[ray]'``.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import aiohttp

from fedfleet.device_runtime import aio
from fedfleet.device_runtime.fleet import run_fleet
from fedfleet.device_runtime.fleet_monitor import _monitor
from fedfleet.device_runtime.fleet_plan import FleetConfig, shard_phones
from fedfleet.device_runtime.fleet_result import FleetResult
from fedfleet.device_runtime.phone_stats import PhoneStats

RAY_MISSING = "the ray backend needs Ray: pip install 'fedfleet[ray]'"
LOCAL_ADDRESSES = (None, "", "local")


class RayUnavailable(ValueError):
    """Ray is not installed (a ValueError so the CLI prints it as a plain error)."""


def import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise RayUnavailable(RAY_MISSING) from exc
    return ray


@contextmanager
def ray_cluster(address: str | None = "local", num_cpus: int | None = None, quiet: bool = True) -> Iterator[Any]:
    """Start a local Ray cluster (``address`` None, "" or "local") with ``num_cpus`` CPUs (default:
    this machine's), or connect to a running one ("auto", "HOST:PORT"); shut down (or disconnect) on exit."""
    ray = import_ray()
    import logging

    level = logging.WARNING if quiet else logging.INFO
    if address in LOCAL_ADDRESSES:
        # Ray renices its workers to 15 by default; on this machine the shards are the fleet itself
        # and should compete for the cores on equal terms with the server, as --backend local does.
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False,
                 logging_level=level, _system_config={"worker_niceness": 0})
    else:
        ray.init(address=address, logging_level=level)
    try:
        yield ray
    finally:
        ray.shutdown()


@dataclass(frozen=True)
class ShardSpec:
    """Everything one shard needs; small, so it travels to the worker with the task."""

    server: str
    dataset: str
    dataset_seed: int
    fleet: FleetConfig  # shard_index / shard_count say which phones are this shard's
    train_overrides: dict[str, Any] = field(default_factory=dict)
    torch_threads: int = 1
    barrier_timeout_s: float = 600.0


@dataclass
class ShardResult:
    shard: int
    host: str
    pid: int
    devices: list[PhoneStats]
    wall_s: float


def run_shard(spec: ShardSpec, barrier: Any = None) -> ShardResult:
    """Run one shard's phones to the end of the server's task (inside a Ray worker, or anywhere)."""
    import torch

    from fedfleet.device_runtime.data import load_dataset
    from fedfleet.device_runtime.limits import raise_open_file_limit
    from fedfleet.device_runtime.runtimes.torch_runtime import torch_runtime_for_task

    # A Ray worker is this shard's process: its settings are the shard's to make.
    torch.set_num_threads(spec.torch_threads)
    raise_open_file_limit()  # each phone's long poll holds a socket
    t0 = time.perf_counter()
    data = load_dataset(spec.dataset, seed=spec.dataset_seed)

    async def all_registered() -> None:
        if barrier is not None:  # every shard has registered its phones: start training together
            await asyncio.wait_for(asyncio.wrap_future(barrier.arrive.remote().future()), spec.barrier_timeout_s)

    result = aio.run(run_fleet(spec.server, data, spec.fleet, torch_runtime_for_task,
                               train_overrides=spec.train_overrides, registered=all_registered))
    return ShardResult(spec.fleet.shard_index, socket.gethostname(), os.getpid(), result.devices,
                       time.perf_counter() - t0)


class _Barrier:
    """A Ray async actor: ``arrive`` returns once ``parties`` callers have arrived."""

    def __init__(self, parties: int) -> None:
        self.parties, self.arrived = parties, 0
        self.event = asyncio.Event()

    async def arrive(self) -> int:
        self.arrived += 1
        if self.arrived >= self.parties:
            self.event.set()
        await self.event.wait()
        return self.arrived


def default_shards(ray: Any, phones: int) -> int:
    """One shard per CPU of the cluster (at least one), never more shards than phones."""
    return max(1, min(int(ray.cluster_resources().get("CPU", 1)), phones))


async def run_ray_fleet(
    server: str,
    dataset: str,
    cfg: FleetConfig,
    *,
    shards: int | None = None,
    dataset_seed: int | None = None,
    train_overrides: dict[str, Any] | None = None,
    on_round: Any = lambda r: None,
    on_shard: Any = lambda s: None,
) -> FleetResult:
    """``run_fleet`` sharded over the Ray cluster this process is connected to (``ray_cluster``).

    Every shard gets min(1, cluster CPUs / shards) CPUs so that all of them run at once; they are
    spread over the cluster's nodes. ``on_shard`` is called with each ``ShardResult`` as it ends."""
    ray = import_ray()
    if not ray.is_initialized():
        raise ValueError("run_ray_fleet needs a Ray connection: use ray_cluster() or ray.init() first")
    if cfg.shard_count != 1:
        raise ValueError("run_ray_fleet shards the fleet itself: pass a whole fleet (shard_count 1)")
    n = shards or default_shards(ray, cfg.phones)
    if not 1 <= n <= cfg.phones:
        raise ValueError(f"--shards must be between 1 and the number of phones ({cfg.phones}), got {n}")
    cpus = min(1.0, float(ray.cluster_resources().get("CPU", 1)) / n)
    barrier = ray.remote(num_cpus=0)(_Barrier).remote(n)
    task = ray.remote(run_shard).options(num_cpus=cpus, max_retries=0, scheduling_strategy="SPREAD")
    specs = [ShardSpec(server, dataset, cfg.seed if dataset_seed is None else dataset_seed,
                       replace(cfg, shard_index=i, shard_count=n), dict(train_overrides or {}),
                       torch_threads=max(1, int(cpus)))
             for i in range(n)]
    refs = [task.remote(spec, barrier) for spec in specs]
    results: list[ShardResult] = []

    async def collect(ref: Any) -> ShardResult:
        res: ShardResult = await asyncio.wrap_future(ref.future())
        on_shard(res)
        return res

    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        stop, phones_done = asyncio.Event(), asyncio.Event()
        monitor = asyncio.create_task(_monitor(session, server, cfg, on_round, stop, phones_done))
        try:
            results = list(await asyncio.gather(*(collect(r) for r in refs)))
            phones_done.set()
            rounds = await asyncio.wait_for(monitor, timeout=120)
        finally:
            monitor.cancel()
            for ref in refs:  # a shard failed or we were interrupted: stop the others too
                ray.cancel(ref, force=True)
            ray.kill(barrier)
    results.sort(key=lambda r: r.shard)
    devices = [d for r in results for d in r.devices]
    expected = cfg.phones
    if len(devices) != expected:
        raise RuntimeError(f"the shards reported {len(devices)} phones, expected {expected}")
    return FleetResult(rounds=rounds, devices=devices)


__all__ = ["RAY_MISSING", "RayUnavailable", "ShardResult", "ShardSpec", "default_shards", "import_ray",
           "ray_cluster", "run_ray_fleet", "run_shard", "shard_phones"]
