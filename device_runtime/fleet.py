"""Many emulated phones against one server, through the same client code real phones use."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Awaitable, Callable, Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from fedfleet.device_runtime import aio
from fedfleet.device_runtime.bundle_client import fetch_bundle
from fedfleet.device_runtime.clock import PhoneClock, WallClock
from fedfleet.device_runtime.data import Dataset
from fedfleet.device_runtime.emulated_device import PhoneClient
from fedfleet.device_runtime.fleet_activation import activate_in_time
from fedfleet.device_runtime.fleet_monitor import _monitor
from fedfleet.device_runtime.fleet_plan import FleetConfig, plan_fleet
from fedfleet.device_runtime.fleet_population import Population, bulk_registered, population_of
from fedfleet.device_runtime.fleet_result import FleetError, FleetResult, NamesTaken, ServerGone, _why
from fedfleet.device_runtime.limits import open_file_limit
from fedfleet.device_runtime.protocol_client import ModelMemo, ServerError
from fedfleet.device_runtime.runtimes import TrainingRuntime
from fedfleet.device_runtime.trainer import BatchedTrainer, RuntimePool
from fedfleet.device_runtime.vclock import VirtualClock

RuntimeFactory = Callable[[dict[str, Any]], TrainingRuntime]


WAVE = 256  # phones registered or started per pass of the event loop (see _in_waves)
# A phone keeps its connection from its registration to its first check-in. aiohttp's default closes
# it after 15 s idle: a fleet whose registrations take longer than that (5,000 phones under a
# profiler) set ~4,700 connections up a second time inside round 1. Below the server's idle limit (3,630 s).
POLL_KEEPALIVE_S = 600.0
CHAIN_MAX_PHONES = 1000  # FleetConfig.chain_checkin None: beyond this, only with the server in another process


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
) -> FleetResult:
    """Register ``cfg.phones`` phones holding disjoint shards of ``data``, run them until the
    server's task finishes, and report every round record as it is published. With
    ``cfg.shard_count`` > 1 only shard ``cfg.shard_index`` of the phones runs; ``registered`` is
    awaited once they are registered, before any trains (a barrier across shards)."""
    virtual = clock is not None and not isinstance(clock, WallClock)
    plan = plan_fleet(data, cfg, virtual)
    attack, attackers, starts = plan.attack, plan.attackers, plan.starts
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
            from fedfleet.protocol.privacy import PrivacyLedger

            ledger = PrivacyLedger(float(task.get("dp_delta", 1e-5)))
        models = ModelMemo()  # the phones handed tasks together decode their common model once

        def phone(i: int, kind: type[PhoneClient] = PhoneClient, phone_clock: PhoneClock | None = None,
                  rng_of: Callable[[np.random.Generator], np.random.Generator] | None = None) -> PhoneClient:
            shard_data, phone_rng, key = plan.phone(i)
            return kind(
                session,
                server,
                cfg.phone_name or f"{cfg.name_prefix}-{i:05d}",
                shard_data,
                None,
                rng_of(phone_rng) if rng_of is not None else phone_rng,
                ledger=ledger,
                train_overrides=train_overrides,
                availability=cfg.availability,
                profile=plan.profile(i),
                clock=phone_clock or clock,
                attack=attack if i in attackers else None,
                num_classes=data.num_classes,
                poll_session=polls,
                inline_model=cfg.inline_model,
                chain_checkin=_chains(cfg),
                models=models,
                key=key,
                model_fingerprint=cfg.model_fingerprint,
                enrolment_code=cfg.enrolment_codes[i] if cfg.enrolment_codes else None,
            )

        phones: list[PhoneClient] = []
        population: Population | None = None  # FleetConfig.register_in_bulk: phones built when active
        register_s = 0.0
        stop = asyncio.Event()
        pool: RuntimePool | BatchedTrainer | None = None
        phones_done = asyncio.Event()
        loop = asyncio.get_running_loop()
        # --hours on the wall clock: the fleet ends then, whatever its phones are waiting for (a held
        # check-in, a back-off sleep), rather than after finishing those (up to the server's 25 s hold).
        deadline = loop.time() + cfg.hours * 3600 if cfg.hours > 0 and not virtual else None
        joined: list[int] = []  # the monitor's: rounds the server had merged before this fleet
        monitor = asyncio.create_task(_monitor(session, server, cfg, on_round, stop, phones_done, virtual,
                                               joined=joined))
        failures: list[tuple[str, BaseException]] = []  # phones that gave up, and why
        gone: ServerGone | None = None
        rounds: list[dict[str, Any]] = []
        try:
            # At most 256 registrations in flight: each opens its phone's connection, and 10,000 connects
            # at once overflow the server's accept backlog (connection reset by peer).
            enrolling = asyncio.Semaphore(256)
            tasks = SharedTasks()

            async def register(p: PhoneClient) -> None:
                async with enrolling:
                    await p.register()
                tasks.share(p)

            # FleetConfig.register_when_active: only the first phone now, the others at their first check-ins
            lazy = cfg.register_when_active and isinstance(clock, VirtualClock) and registered is None
            bulk = cfg.register_in_bulk and isinstance(clock, VirtualClock)

            def built_and_registered() -> Iterator[Awaitable[None]]:
                for i in shard[:1] if lazy else shard:  # each phone registers as soon as it is built (~60 us each)
                    phones.append(phone(i))
                    yield register(phones[-1])

            registrations = built_and_registered()
            try:
                if bulk:  # every phone at once, in requests of 10,000 (fleet_bulk.py); tokens in a column
                    t0 = loop.time()
                    tokens, first = await bulk_registered(session, server, cfg, plan, phone)
                    register_s = loop.time() - t0
                    tasks.share(first)
                    phones.append(first)
                else:
                    # The first phone alone: names taken by an earlier fleet are refused before any other
                    # phone of this one registers (each would stay registered, counted in the cohorts).
                    await next(registrations)
                    await _in_waves(registrations, WAVE)
            except ServerError as exc:
                if exc.status == 409 and exc.reason == "name_taken":
                    raise _names_taken(server, cfg.phone_name or f"{cfg.name_prefix}-NNNNN",
                                       sum(1 for p in phones if p.token)) from None
                raise
            if registered is not None:
                await registered()
            if cfg.runtime != "torch":  # the exported artifacts a phone would run, hash-checked
                bundle_dir = Path(tempfile.mkdtemp(prefix="fedfleet-bundle-"))
                await fetch_bundle(session, server, phones[0].token, bundle_dir)
                runtime_factory = partial(_bundle_runtime, cfg.runtime, bundle_dir)
            pool = _trainer(cfg, task, runtime_factory)
            if clock is not None:
                pool.bind(clock)
            for p in phones:
                p.pool = pool
            until = cfg.hours * 3600 if cfg.hours > 0 else None
            if bulk and isinstance(clock, VirtualClock):
                def run_phone(p: PhoneClient) -> Awaitable[None]:
                    return _run_phone(p, stop, until, 0.0, failures, cfg.phone_max_errors, joined=True)

                population = population_of(cfg, clock, phone, tokens, shard, phones[0], pool, failures, run_phone)
                await population.run_all(np.asarray(shard), starts, until)
            elif lazy and isinstance(clock, VirtualClock):
                active: dict[int, PhoneClient] = {shard[0]: phones[0]}
                ended: list[bool] = []  # a phone's run ended: the server's task is done (or time is up)

                async def activated(i: int) -> None:
                    try:  # the clock was joined for this phone (fleet_activation)
                        p = active.get(i) or phone(i)
                        if not p.token:
                            await register(p)
                            p.pool = pool
                            active[i] = p
                    except BaseException:
                        clock.leave()
                        ended.append(True)  # no more phones: the error ends the fleet
                        raise
                    gave_up = len(failures)
                    await _run_phone(p, stop, until, 0.0, failures, cfg.phone_max_errors, joined=True)
                    if len(failures) == gave_up:
                        ended.append(True)

                started = await activate_in_time(clock, np.asarray(shard), starts, activated, lambda: bool(ended), until)
                await _in_waves(started, 0)
                phones[:] = [active[i] for i in sorted(active)]
            else:
                first_checkin = [float(starts[i]) for i in shard]
                # On a virtual clock every phone must have joined it before any time passes: all in one pass.
                await _in_waves((_run_phone(p, stop, until, t, failures, cfg.phone_max_errors)
                                 for p, t in zip(phones, first_checkin, strict=True)),
                                WAVE if not virtual else 0, deadline=deadline)
            phones_done.set()
            try:
                rounds = await asyncio.wait_for(monitor, timeout=120)
            except ServerGone as exc:
                gone, rounds = exc, exc.result.rounds if exc.result is not None else []
        finally:
            stop.set()
            monitor.cancel()
            if pool is not None:
                pool.close()
    devices = [p.stats for p in phones] if population is None else population.stats(
        lambda i: cfg.phone_name or f"{cfg.name_prefix}-{i:05d}", lambda i: len(plan.shards.index(i)))
    if ledger is not None:
        for d in devices:
            d.epsilon = ledger.epsilon(d.phone)
    result = FleetResult(rounds=rounds, devices=devices,
                         train_compute_s=pool.busy_s if pool is not None else 0.0, task=task,
                         joined_after_round=joined[0] if joined else 0, event_loop=aio.running_loop_name(),
                         population={} if population is None else {
                             "register_s": round(register_s, 2), "peak_built": population.peak_active,
                             "releases": population.releases})
    if gone is not None:
        raise ServerGone(str(gone), result)
    if failures:
        name, why = failures[0]
        raise FleetError(f"{len(failures)} of {len(devices)} phones gave up; the first, {name}: {_why(why)}", result)
    return result


async def _run_phone(p: PhoneClient, stop: asyncio.Event, until: float | None, start_after: float,
                     failures: list[tuple[str, BaseException]], max_errors: int, joined: bool = False) -> None:
    """One phone's run; a phone that gives up (see PhoneClient.run) is noted in ``failures`` while
    the others go on (the fleet reports it at the end, after the rounds and counts it saw)."""
    try:
        await p.run(stop, max_errors=max_errors, until=until, start_after=start_after, joined=joined)
    except (TimeoutError, aiohttp.ClientError, ServerError) as exc:
        failures.append((p.name, exc))


def _names_taken(server: str, names: str, registered: int) -> NamesTaken:
    extra = f" ({registered} phones of this fleet registered before that and stay registered)" if registered else ""
    return NamesTaken(
        f"the server at {server.rstrip('/')} already has phones named {names}: an earlier fleet or phone "
        f"registered them and was given their tokens, which the server hands out once, so these phones cannot "
        f"act as them{extra}; pick another --name-prefix (fedfleet phone: --name)")


async def _in_waves(coros: Iterable[Awaitable[Any]], wave: int, deadline: float | None = None) -> None:
    """Await every one of ``coros``, started ``wave`` at a time with a pass of the event loop between
    waves (0: all in one pass). Started in one pass, 10,000 phones each ran to its first wait before
    any request went out: ~2 s of the fleet setting up check-ins (or building phones) with the server
    idle. Between waves, the requests already started go out and their answers come in. At
    ``deadline`` (the event loop's time) those still running are cancelled. The first error raised
    by one of them cancels the others and is raised."""
    tasks: list[asyncio.Future[Any]] = []
    try:
        for coro in coros:
            tasks.append(asyncio.ensure_future(coro))
            if wave and len(tasks) % wave == 0:
                await asyncio.sleep(0)
        if deadline is None:
            await asyncio.gather(*tasks)
            return
        timeout = max(deadline - asyncio.get_running_loop().time(), 0.0)
        if tasks:
            await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_EXCEPTION)
    except BaseException:
        for t in tasks:
            t.cancel()
        raise
    for t in tasks:
        t.cancel()  # time is up (a no-op for those already done)
    for outcome in await asyncio.gather(*tasks, return_exceptions=True):
        if isinstance(outcome, BaseException) and not isinstance(outcome, asyncio.CancelledError):
            raise outcome


class SharedTasks:
    """One copy of the task the server hands every phone at registration: each phone parsed its
    own (~6 KB of dicts and specs a phone, the largest part of an idle phone's memory)."""

    def __init__(self) -> None:
        self.task: dict[str, Any] | None = None
        self.specs: dict[str, Any] = {}

    def share(self, p: PhoneClient) -> None:
        if self.task is None:
            self.task, self.specs = p.task, p.specs
        elif p.task == self.task and p.specs == self.specs:
            p.task, p.specs = self.task, self.specs


def _chains(cfg: FleetConfig) -> bool:
    if cfg.chain_checkin is not None:
        return cfg.chain_checkin
    return cfg.phones <= CHAIN_MAX_PHONES or not cfg.server_here


def _bundle_runtime(kind: str, bundle_dir: Path, task: dict[str, Any]) -> TrainingRuntime:
    from fedfleet.device_runtime.runtimes.loader import load_runtime

    return load_runtime(kind, bundle_dir)


# Phones of a finished vmapped group woken per loop pass when the server has a process of its own
# (BatchedTrainer.release_every): 100 phones x 10 rounds, medians of 7 alternating runs, 611 updates/s
# woken all at once, 665 four at a time (2 and 16 about the same; at 10,000 phones, where the server is
# the bottleneck, within noise). With the server on this loop it is slower (~600 -> ~450): there its
# group commit gets cut into more transactions.
RELEASE_EVERY = 4


def _trainer(cfg: FleetConfig, task: dict[str, Any], factory: RuntimeFactory) -> RuntimePool | BatchedTrainer:
    if cfg.trainer == "batched" and cfg.runtime == "torch":
        runtime = factory(task)
        model = getattr(runtime, "model", None)
        if model is not None:  # the eager runtime: vectorize across phones
            # a server in another process takes each upload while the next phones encode
            return BatchedTrainer(model, release_every=0 if cfg.server_here else RELEASE_EVERY, device=cfg.device,
                                  loss=getattr(runtime, "loss", None), workers=cfg.workers)
    return RuntimePool(lambda: factory(task), size=cfg.workers)


def _check_task(task: dict[str, Any], data: Dataset) -> None:
    shape = tuple(task["input_shape"])
    if shape != data.input_shape:
        raise FleetError(f"the server trains on inputs {shape} but dataset {data.name} has {data.input_shape}")
