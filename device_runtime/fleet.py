"""Many emulated phones against one server, through the same client code real phones use."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import tempfile
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from device_runtime import aio
from device_runtime.attacks import Attack, choose_attackers, parse_attack
from device_runtime.bundle_client import fetch_bundle
from device_runtime.client import ModelMemo, PhoneClient, PhoneStats, ServerError
from device_runtime.data import Dataset, partition
from device_runtime.limits import open_file_limit
from device_runtime.profiles import DeviceProfile, ProfileSpec, load_profiles, sample_profiles
from device_runtime.runtimes import TrainingRuntime
from device_runtime.trainer import BatchedTrainer, RuntimePool
from device_runtime.vclock import PhoneClock, WallClock
from protocol import EncoderConfig
from protocol.codec.encoder import resolve_noise_multiplier
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
    phone_name: str | None = None  # one phone (fedfleet phone --name): it registers as exactly this
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
    # failed steps in a row after which a phone gives up (PhoneClient.run: backoff 0.2 s doubled up to
    # 10 s, so 20 is ~2.5 min of a server gone: time for it to be restarted on its data dir)
    phone_max_errors: int = 20

    def __post_init__(self) -> None:
        if self.phones < 1 or self.workers < 1 or self.phone_max_errors < 0:
            raise ValueError("phones and workers must be at least 1, phone_max_errors at least 0")
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
        if self.phone_name is not None and len(shard_phones(self.phones, self.shard_index, self.shard_count)) != 1:
            raise ValueError("phone_name names one phone: the shard that runs must hold exactly one")


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
    rounds: list[dict[str, Any]]  # the round records published after the fleet joined, in order
    devices: list[PhoneStats]
    train_compute_s: float = 0.0  # CPU time of the training arithmetic (the emulation's physical floor)
    task: dict[str, Any] = dataclasses.field(default_factory=dict)  # the server's task as it served it
    joined_after_round: int = 0  # rounds the server had merged when the fleet joined (not counted)
    event_loop: str = ""  # uvloop | asyncio


class FleetError(Exception):
    """The fleet could not run to its end. ``result``: what it saw until then (its rounds and its
    phones' counts), to be written out like any run's; None when nothing ran."""

    def __init__(self, message: str, result: FleetResult | None = None) -> None:
        super().__init__(message)
        self.result = result


class NamesTaken(FleetError):
    """The server already has phones of these names (registered by an earlier fleet or phone, which
    was given their tokens: a name's token is handed out once, so nobody else can act as it)."""


class ServerGone(FleetError):
    """The server stopped answering and did not come back while the phones kept trying."""


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
                cfg.phone_name or f"{cfg.name_prefix}-{i:05d}",
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
        loop = asyncio.get_running_loop()
        # --hours on the wall clock: the fleet ends then, whatever its phones are waiting for (a held
        # check-in, a back-off sleep); they used to finish those first, up to the server's 25 s hold.
        deadline = loop.time() + cfg.hours * 3600 if cfg.hours > 0 and not virtual else None
        joined: list[int] = []  # the monitor's: rounds the server had merged before this fleet
        monitor = asyncio.create_task(_monitor(session, server, cfg, on_round, stop, phones_done, virtual,
                                               joined=joined))
        failures: list[tuple[str, BaseException]] = []  # phones that gave up, and why
        gone: ServerGone | None = None
        rounds: list[dict[str, Any]] = []
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

            registrations = built_and_registered()
            try:
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
            await _in_waves((_run_phone(p, stop, until, t, failures, cfg.phone_max_errors) for p, t in zip(phones, first_checkin, strict=True)),
                            WAVE if not virtual else 0, deadline=deadline)
            phones_done.set()
            try:
                rounds = await asyncio.wait_for(monitor, timeout=120)
            except ServerGone as exc:
                gone, rounds = exc, exc.result.rounds if exc.result is not None else []
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
    result = FleetResult(rounds=rounds, devices=[p.stats for p in phones],
                         train_compute_s=pool.busy_s if pool is not None else 0.0, task=task,
                         joined_after_round=joined[0] if joined else 0, event_loop=aio.running_loop_name())
    if gone is not None:
        raise ServerGone(str(gone), result)
    if failures:
        name, why = failures[0]
        raise FleetError(f"{len(failures)} of {len(phones)} phones gave up; the first, {name}: {_why(why)}", result)
    return result


async def _run_phone(p: PhoneClient, stop: asyncio.Event, until: float | None, start_after: float,
                     failures: list[tuple[str, BaseException]], max_errors: int) -> None:
    """One phone's run; a phone that gives up (see PhoneClient.run) is noted in ``failures`` while
    the others go on (the fleet reports it at the end, after the rounds and counts it saw)."""
    try:
        await p.run(stop, max_errors=max_errors, until=until, start_after=start_after)
    except (TimeoutError, aiohttp.ClientError, ServerError) as exc:
        failures.append((p.name, exc))


def _names_taken(server: str, names: str, registered: int) -> NamesTaken:
    extra = f" ({registered} phones of this fleet registered before that and stay registered)" if registered else ""
    return NamesTaken(
        f"the server at {server.rstrip('/')} already has phones named {names}: an earlier fleet or phone "
        f"registered them and was given their tokens, which the server hands out once, so these phones cannot "
        f"act as them{extra}; pick another --name-prefix (fedfleet phone: --name)")


def _why(exc: BaseException) -> str:
    """An error in a few words: its text, or its type when it has none (aiohttp's often have none)."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect to {exc.host}:{exc.port} ({exc.os_error.strerror or exc.os_error})"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text and not isinstance(exc, ServerError) else text or type(exc).__name__


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


MONITOR_TIMEOUT = aiohttp.ClientTimeout(total=30)  # one poll of the round records
MONITOR_MAX_BACKOFF_S = 5.0  # between polls of a server that does not answer
MONITOR_GIVE_UP = 4  # failed polls in a row, once the phones have stopped, before the server counts as gone


async def _monitor(
    session: aiohttp.ClientSession,
    server: str,
    cfg: FleetConfig,
    on_round: Callable[[dict[str, Any]], None],
    stop: asyncio.Event,
    phones_done: asyncio.Event,
    virtual: bool = False,
    *,
    joined: list[int] | None = None,
) -> list[dict[str, Any]]:
    """Poll the server's round records; set ``stop`` when the run is over. When the phones
    stop first (``hours`` elapsed, or they heard "done"), wait until every merge the server made
    is recorded (GET /v1/status), then return.
    On a virtual clock a finished server does not stop the phones: each leaves when its own next
    check-in hears "done". Stopped by this wall-clock poll, how many had checked in after the last
    merge depended on the machine's load (devices.csv differed between runs of one seed).

    Only the rounds merged after the fleet joined are reported and counted (``max_rounds`` of
    them): those the server had merged already (GET /v1/status, before any phone registers; put
    in ``joined``) are another fleet's. A server that does not answer (killed, restarting on its
    data dir) is polled again with backoff for as long as the phones run; once they have
    stopped, ``ServerGone`` (its ``result`` holding the rounds seen) after MONITOR_GIVE_UP
    failures in a row."""
    url = server.rstrip("/")
    seen: list[dict[str, Any]] = []
    failures = 0

    async def get(path: str, params: dict[str, str] | None = None) -> dict[str, Any]:
        nonlocal failures
        while True:
            try:
                async with session.get(url + path, params=params, timeout=MONITOR_TIMEOUT) as resp:
                    if 400 <= resp.status < 500:
                        raise FleetError(f"GET {url}{path} answered {resp.status} {resp.reason}",
                                         FleetResult(seen, []))
                    resp.raise_for_status()  # 5xx: retried
                    answer = await resp.json()
                failures = 0
                if not isinstance(answer, dict):
                    raise FleetError(f"GET {url}{path} did not answer a JSON object", FleetResult(seen, []))
                return answer
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                failures += 1
                if phones_done.is_set() and failures >= MONITOR_GIVE_UP:
                    raise ServerGone(f"the server at {url} stopped answering ({_why(exc)})",
                                     FleetResult(seen, [])) from None
                await asyncio.sleep(min(cfg.poll_s * 2 ** min(failures, 8), MONITOR_MAX_BACKOFF_S))

    status = await get("/v1/status")
    since = max(int(status.get("round", 1)) - 1, 0)
    if joined is not None:
        joined.append(since)
    quiet = 0
    while True:
        answer = await get("/v1/rounds", {"since": str(since)})
        for row in answer["rounds"]:
            if cfg.max_rounds and len(seen) >= cfg.max_rounds:
                break  # merged in the same poll as the fleet's last: not its own any more
            seen.append(row)
            on_round(row)
        if seen:
            since = seen[-1]["round"]
        quiet = quiet + 1 if phones_done.is_set() and not answer["rounds"] else 0
        if answer["finished"] and virtual:
            return seen
        # Phones gone and nothing new twice in a row: over once every merge the server made is recorded
        # (its publisher evaluates each first: a server just restarted imports torch for that, ~4 s).
        settled = quiet >= 2 and since >= int((await get("/v1/status")).get("round", 1)) - 1
        if answer["finished"] or (cfg.max_rounds and len(seen) >= cfg.max_rounds) or settled:
            stop.set()  # phones leave after their current step
            return seen
        await asyncio.sleep(cfg.poll_s)


def fleet_summary(result: FleetResult, cfg: FleetConfig, data: Dataset, wall_s: float, *, server: str,
                  train_overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """What ``fedfleet simulate`` adds to summary.json (fedfleet.output.summarize's keys), for a fleet
    against a running server: the same keys where they apply (config, dataset_sizes, clock,
    event_loop, emulation, privacy), and ``server`` in place of ``server_process`` (the server is
    not this command's): its URL, the rounds it had merged before the fleet joined, and the task
    it served (which a fleet does not configure: its model, mode, plan, codec, rounds)."""
    task = result.task
    codec = dict((task.get("train") or {}).get("codec") or {})
    enc = EncoderConfig.from_mapping(codec)
    z = resolve_noise_multiplier(enc)
    noised = enc.noise is not None and z is not None
    last = result.rounds[-1] if result.rounds else {}
    return {
        "config": {**dataclasses.asdict(cfg), "dataset": data.name, "train_overrides": dict(train_overrides or {})},
        "dataset_sizes": {"train": len(data.y_train), "test": len(data.y_test)},
        "clock": "wall",
        "event_loop": result.event_loop,
        "emulation": {
            "checkins": sum(d.checkins for d in result.devices),
            "train_compute_s": round(result.train_compute_s, 3),
            "train_fraction": round(result.train_compute_s / wall_s, 4) if wall_s else None,
        },
        "privacy": {
            "mechanism": enc.noise if noised else None,
            "clip": codec.get("clip"),
            "noise_multiplier": z if noised else None,
            "delta": task.get("dp_delta"),
            "epsilon_max": last.get("epsilon_max"),
            "epsilon_median": last.get("epsilon_median"),
            # central DP is the server's setting, not in its task: what its records say it spent
            "central": {"epsilon": last["central_epsilon"]} if last.get("central_epsilon") is not None else None,
            "codec": codec,
        },
        "server": {
            "url": server.rstrip("/"),
            "joined_after_round": result.joined_after_round,
            "task": {k: v for k, v in task.items() if k != "params"},
        },
    }
