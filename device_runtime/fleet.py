"""Many emulated phones against one server, through the same client code real phones use."""

from __future__ import annotations

import asyncio
import gc
import tempfile
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from device_runtime.attacks import Attack, choose_attackers, parse_attack
from device_runtime.bundle_client import fetch_bundle
from device_runtime.client import ModelMemo, PhoneClient, PhoneStats
from device_runtime.data import Dataset, partition
from device_runtime.limits import open_file_limit
from device_runtime.profiles import DeviceProfile, ProfileSpec, load_profiles, sample_profiles
from device_runtime.runtimes import TrainingRuntime
from device_runtime.trainer import BatchedTrainer, RuntimePool
from device_runtime.vclock import PhoneClock, WallClock
from protocol.signing import PhoneKey

RuntimeFactory = Callable[[dict[str, Any]], TrainingRuntime]


WAVE = 256  # phones registered or started per pass of the event loop (see _in_waves)
# A phone keeps its connection from its registration to its first check-in. aiohttp's default closes
# it after 15 s idle: a fleet whose registrations take longer than that (5,000 phones under a
# profiler) set ~4,700 connections up a second time inside round 1. Below the server's idle limit (3,630 s).
POLL_KEEPALIVE_S = 600.0
CHAIN_MAX_PHONES = 1000  # FleetConfig.chain_checkin None: beyond this, only with the server in another process


@dataclass(frozen=True)
class FleetConfig:
    phones: int = 50
    partition: str = "iid"  # iid | dirichlet:ALPHA | shards:K
    quantity_skew: float = 0.0  # lognormal sigma of phone dataset sizes (iid)
    seed: int = 0
    workers: int = 2  # local trainings running at once (one runtime each)
    availability: float = 1.0  # probability a phone is available at a check-in
    name_prefix: str = "phone"
    max_rounds: int = 0  # stop after the server recorded this many rounds (0 = until it finishes)
    poll_s: float = 0.25
    hours: float = 0.0  # stop after this much (virtual) time; 0 = until the server's task is done
    devices: str = "none"  # none (no emulated delays) | default (drawn profiles) | PATH.csv (a trace)
    profile_spec: ProfileSpec = ProfileSpec()
    runtime: str = "torch"  # torch | executorch | onnx: executorch and onnx run the server's bundle
    trainer: str = "batched"  # batched (phones on the same version in one vmapped step) | pool (one by one)
    attack: str = "none"  # device_runtime.attacks: none | signflip | scale:F | noise:STD | labelflip
    attack_fraction: float = 0.0  # share of phones (drawn with the fleet seed) that run ``attack``
    shard_index: int = 0  # run only this shard's phones (see ``shard_phones``); data and names as if all ran
    shard_count: int = 1
    inline_model: bool = True  # phones ask for the model inside the check-in's answer (one request less)
    # Phones make their next check-in with their upload (one request less again); None: yes, unless the fleet
    # has more than CHAIN_MAX_PHONES and shares its process (its one core) with the server. Chained uploads go
    # on the phones' own connections, all at once after a batched step, and queue at the server: 10,000 phones
    # x 3 rounds, server in its own process: 505 and 565 updates/s chained vs 388 and 486 not; in one process
    # 203 vs 298 (round 1: 40 s vs 27 s).
    chain_checkin: bool | None = None
    start_spread_s: float = 60.0  # virtual clock: phones first check in at seeded times in [0, this)
    server_here: bool = True  # the server runs in this process (its sockets count against the same limit)

    def __post_init__(self) -> None:
        if self.phones < 1 or self.workers < 1:
            raise ValueError("phones and workers must be at least 1")
        if not 0 < self.availability <= 1:
            raise ValueError("availability must be in (0, 1]")
        parse_attack(self.attack)
        if self.runtime not in ("torch", "executorch", "onnx"):
            raise ValueError("runtime must be torch, executorch or onnx")
        if self.trainer not in ("batched", "pool"):
            raise ValueError("trainer must be 'batched' or 'pool'")
        if not 0 <= self.attack_fraction <= 1:
            raise ValueError("attack_fraction must be in [0, 1]")
        if not 0 <= self.shard_index < self.shard_count <= self.phones:
            raise ValueError(f"shard {self.shard_index} of {self.shard_count} is not a shard of {self.phones} phones")


def shard_phones(phones: int, shard_index: int, shard_count: int) -> range:
    """The phone indices of one shard: contiguous blocks, sizes differing by at most one."""
    size, extra = divmod(phones, shard_count)
    start = shard_index * size + min(shard_index, extra)
    return range(start, start + size + (shard_index < extra))


PhoneParts = tuple[tuple[np.ndarray, np.ndarray], np.random.Generator, PhoneKey]  # data, generator, key


@dataclass
class FleetPlan:
    """What a fleet takes from its configuration and data alone, before any server is up: the
    phones' shards, seeded generators (the fleet generator's ``spawn``, child by child), device
    profiles, attackers and first check-in times, drawn in that order from ``cfg.seed``. A phone's
    data, generator and key are made when it is first asked for (``phone``), or all at once by
    ``make_phones``: then before the server opens, outside round 1 (~0.1 ms a phone, mostly its
    Ed25519 key; 10,000 phones ~1 s)."""

    cfg: FleetConfig
    data: Dataset
    virtual: bool
    parts: list[np.ndarray]
    seeds: list[np.random.SeedSequence]
    bit_generator: type[np.random.BitGenerator]
    profiles: list[DeviceProfile] | None
    attack: Attack
    attackers: set[int]
    starts: np.ndarray
    shard: range
    made: dict[int, PhoneParts]

    def phone(self, i: int) -> PhoneParts:
        """Phone ``i``'s data, generator (the same stream as ``rng.spawn(phones)[i]``) and key; once."""
        made = self.made.pop(i, None)
        if made is not None:
            return made
        part = self.parts[i]
        return (self.data.x_train[part], self.data.y_train[part]), \
            np.random.Generator(self.bit_generator(self.seeds[i])), PhoneKey()

    def make_phones(self) -> FleetPlan:
        for i in self.shard:
            self.made[i] = self.phone(i)
        return self


def plan_fleet(data: Dataset, cfg: FleetConfig, virtual: bool = False) -> FleetPlan:
    """The fleet's draws from its seed (see FleetPlan); ``virtual``: it will run on a virtual clock."""
    rng = np.random.default_rng(cfg.seed)
    parts = partition(data.y_train, cfg.phones, cfg.partition, rng, cfg.quantity_skew)
    # rng.spawn(cfg.phones) without building the generators yet (~20 us each): their seed sequences
    seeds = rng.bit_generator.seed_seq.spawn(cfg.phones)  # type: ignore[attr-defined]
    profiles = fleet_profiles(cfg, rng)
    attack = parse_attack(cfg.attack)
    attackers = set(choose_attackers(cfg.phones, cfg.attack_fraction, rng).tolist())
    # On a virtual clock, requests at one instant race one another to the server (which phone takes
    # the last free slot depends on socket timing); at distinct instants they run strictly in
    # time order. So the fleet does not start at one instant: each phone's first check-in is
    # at its own seeded time (a real fleet does not wake in unison either).
    starts = rng.uniform(0.0, cfg.start_spread_s, cfg.phones) if virtual else np.zeros(cfg.phones)
    return FleetPlan(cfg, data, virtual, parts, seeds, type(rng.bit_generator), profiles, attack, attackers, starts,
                     shard_phones(cfg.phones, cfg.shard_index, cfg.shard_count), {})


@dataclass
class FleetResult:
    rounds: list[dict[str, Any]]
    devices: list[PhoneStats]
    train_compute_s: float = 0.0  # CPU time of the training arithmetic (the emulation's physical floor)


async def run_fleet(
    server: str,
    data: Dataset,
    cfg: FleetConfig,
    runtime_factory: RuntimeFactory,
    *,
    on_round: Callable[[dict[str, Any]], None] = lambda r: None,
    train_overrides: dict[str, Any] | None = None,
    clock: PhoneClock | None = None,
    registered: Callable[[], Awaitable[Any]] | None = None,
    plan: FleetPlan | None = None,
) -> FleetResult:
    """Register ``cfg.phones`` phones holding disjoint shards of ``data``, run them until the
    server's task finishes, and report every round record as it is published. With
    ``cfg.shard_count`` > 1 only shard ``cfg.shard_index`` of the phones runs; ``registered`` is
    awaited once they are registered, before any trains (a barrier across shards). ``plan``:
    ``plan_fleet(data, cfg, virtual)`` made beforehand (its phones made, before the server opens)."""
    virtual = clock is not None and not isinstance(clock, WallClock)
    if plan is None:
        plan = plan_fleet(data, cfg, virtual)
    elif plan.cfg != cfg or plan.data is not data or plan.virtual != virtual:
        raise ValueError("the fleet plan was made for another configuration, dataset or clock")
    profiles, attack, attackers, starts = plan.profiles, plan.attack, plan.attackers, plan.starts
    ledger = None
    connector = aiohttp.TCPConnector(limit=256)
    timeout = aiohttp.ClientTimeout(total=300)
    # Check-ins get their own connections, one per phone as on real phones (as many as the open-file
    # limit allows): a long poll holds its connection until work appears, and with a shared pool of
    # 256 a crowd of held polls kept the phones that had work from checking in at all.
    shard = plan.shard
    budget = open_file_limit() - 1024
    polls_limit = max(256, min(len(shard), budget // 2 if cfg.server_here else budget))  # a server here holds the other ends
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session, \
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=polls_limit, keepalive_timeout=POLL_KEEPALIVE_S),
                                  timeout=timeout) as polls:
        async with session.get(f"{server.rstrip('/')}/v1/task") as resp:
            resp.raise_for_status()
            task = await resp.json()
        _check_task(task, data)
        if task["train"].get("codec", {}).get("noise"):
            from protocol.privacy import PrivacyLedger

            ledger = PrivacyLedger(float(task.get("dp_delta", 1e-5)))
        models = ModelMemo()  # the phones handed tasks together decode their common model once

        def phone(i: int) -> PhoneClient:
            shard_data, phone_rng, key = plan.phone(i)
            return PhoneClient(
                session,
                server,
                f"{cfg.name_prefix}-{i:05d}",
                shard_data,
                None,
                phone_rng,
                ledger=ledger,
                train_overrides=train_overrides,
                availability=cfg.availability,
                profile=profiles[i] if profiles else None,
                clock=clock,
                attack=attack if i in attackers else None,
                num_classes=data.num_classes,
                poll_session=polls,
                inline_model=cfg.inline_model,
                chain_checkin=_chains(cfg),
                models=models,
                key=key,
            )

        phones: list[PhoneClient] = []
        stop = asyncio.Event()
        pool: RuntimePool | BatchedTrainer | None = None
        phones_done = asyncio.Event()
        monitor = asyncio.create_task(_monitor(session, server, cfg, on_round, stop, phones_done, virtual))
        thresholds = gc.get_threshold()
        # Thousands of requests in flight survive every young collection, so at Python's default
        # thresholds (700, 10, 10) a 10,000-phone fleet spent ~5 s of a 30 s run collecting (14 full
        # collections of ~0.18 s, 415 middle ones); collecting 70x less often, full ones about never
        # while the fleet runs, its steady rounds went from ~740 to ~1,000+ updates/s.
        gc.set_threshold(max(thresholds[0], 50_000), max(thresholds[1], 20), max(thresholds[2], 1000))
        try:
            # At most 256 registrations in flight: each opens its phone's connection, and 10,000 connects
            # at once overflow the server's accept backlog (connection reset by peer).
            enrolling = asyncio.Semaphore(256)

            async def register(p: PhoneClient) -> None:
                async with enrolling:
                    await p.register()

            def built_and_registered() -> Iterator[Awaitable[None]]:
                for i in shard:  # each phone registers as soon as it is built (~60 us each)
                    phones.append(phone(i))
                    yield register(phones[-1])

            await _in_waves(built_and_registered(), WAVE)
            if registered is not None:
                await registered()
            if cfg.runtime != "torch":  # the exported artifacts a phone would run, hash-checked
                bundle_dir = Path(tempfile.mkdtemp(prefix="fedfleet-bundle-"))
                await fetch_bundle(session, server, phones[0].token, bundle_dir)
                runtime_factory = partial(_bundle_runtime, cfg.runtime, bundle_dir)
            first_checkin = [float(starts[i]) for i in shard]
            pool = _trainer(cfg, task, runtime_factory)
            if clock is not None:
                pool.bind(clock)
            for p in phones:
                p.pool = pool
            # The phones, their data and keys live as long as the fleet: freeze them out of the
            # collections' walks.
            gc.freeze()
            until = cfg.hours * 3600 if cfg.hours > 0 else None
            # On a virtual clock every phone must have joined it before any time passes: all in one pass.
            await _in_waves((p.run(stop, until=until, start_after=t) for p, t in zip(phones, first_checkin, strict=True)),
                            WAVE if not virtual else 0)
            phones_done.set()
            rounds = await asyncio.wait_for(monitor, timeout=120)
        finally:
            gc.unfreeze()  # what the fleet froze can be collected once it is over
            gc.set_threshold(*thresholds)
            stop.set()
            monitor.cancel()
            if pool is not None:
                pool.close()
    if ledger is not None:
        for p in phones:
            p.stats.epsilon = ledger.epsilon(p.name)
    return FleetResult(rounds=rounds, devices=[p.stats for p in phones],
                       train_compute_s=pool.busy_s if pool is not None else 0.0)


async def _in_waves(coros: Iterable[Awaitable[Any]], wave: int) -> None:
    """Await every one of ``coros``, started ``wave`` at a time with a pass of the event loop between
    waves (0: all in one pass). Started in one pass, 10,000 phones each ran to its first wait before
    any request went out: ~2 s of the fleet setting up check-ins (or building phones) with the server
    idle. Between waves, the requests already started go out and their answers come in."""
    tasks: list[asyncio.Future[Any]] = []
    try:
        for coro in coros:
            tasks.append(asyncio.ensure_future(coro))
            if wave and len(tasks) % wave == 0:
                await asyncio.sleep(0)
    except BaseException:
        for t in tasks:
            t.cancel()
        raise
    await asyncio.gather(*tasks)


def _chains(cfg: FleetConfig) -> bool:
    if cfg.chain_checkin is not None:
        return cfg.chain_checkin
    return cfg.phones <= CHAIN_MAX_PHONES or not cfg.server_here


def _bundle_runtime(kind: str, bundle_dir: Path, task: dict[str, Any]) -> TrainingRuntime:
    from device_runtime.runtimes.loader import load_runtime

    return load_runtime(kind, bundle_dir)


# Phones of a finished vmapped group woken per loop pass when the server has a process of its own
# (BatchedTrainer.release_every): 100 phones x 10 rounds, medians of 7 alternating runs, 611 updates/s
# woken all at once, 665 four at a time (2 and 16 about the same; at 10,000 phones, where the server is
# the bottleneck, within noise). With the server on this loop it was slower (~600 -> ~450): there its
# group commit gets cut into more transactions.
RELEASE_EVERY = 4


def _trainer(cfg: FleetConfig, task: dict[str, Any], factory: RuntimeFactory) -> RuntimePool | BatchedTrainer:
    if cfg.trainer == "batched" and cfg.runtime == "torch":
        runtime = factory(task)
        model = getattr(runtime, "model", None)
        if model is not None:  # the eager runtime: vectorize across phones
            # a server in another process takes each upload while the next phones encode
            return BatchedTrainer(model, release_every=0 if cfg.server_here else RELEASE_EVERY)
    return RuntimePool(lambda: factory(task), size=cfg.workers)


def fleet_profiles(cfg: FleetConfig, rng: np.random.Generator) -> list[DeviceProfile] | None:
    """One profile per phone: none, drawn from ``cfg.profile_spec``, or cycled from a trace."""
    if cfg.devices == "none":
        return None
    if cfg.devices == "default":
        return sample_profiles(cfg.phones, rng, cfg.profile_spec)
    trace = load_profiles(cfg.devices)
    return [trace[i % len(trace)] for i in range(cfg.phones)]


def _check_task(task: dict[str, Any], data: Dataset) -> None:
    shape = tuple(task["input_shape"])
    if shape != data.input_shape:
        raise ValueError(f"the server trains on inputs {shape} but dataset {data.name} has {data.input_shape}")


async def _monitor(
    session: aiohttp.ClientSession,
    server: str,
    cfg: FleetConfig,
    on_round: Callable[[dict[str, Any]], None],
    stop: asyncio.Event,
    phones_done: asyncio.Event,
    virtual: bool = False,
) -> list[dict[str, Any]]:
    """Poll the server's round records; set ``stop`` when the run is over. When the phones
    stop first (``hours`` elapsed), wait for the merges in flight to be recorded, then return.
    On a virtual clock a finished server does not stop the phones: each leaves when its own next
    check-in hears "done". Stopped by this wall-clock poll, how many had checked in after the last
    merge depended on the machine's load (devices.csv differed between runs of one seed)."""
    seen: list[dict[str, Any]] = []
    quiet = 0
    while True:
        async with session.get(f"{server.rstrip('/')}/v1/rounds", params={"since": str(seen[-1]["round"] if seen else 0)}) as resp:
            answer = await resp.json()
        for row in answer["rounds"]:
            seen.append(row)
            on_round(row)
        quiet = quiet + 1 if phones_done.is_set() and not answer["rounds"] else 0
        if answer["finished"] and virtual:
            return seen
        if answer["finished"] or (cfg.max_rounds and len(seen) >= cfg.max_rounds) or quiet >= 4:
            stop.set()  # phones leave after their current step
            return seen
        await asyncio.sleep(cfg.poll_s)
