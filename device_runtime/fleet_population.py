"""A bulk-registered fleet's run on the virtual clock: phones built when they first check in or wake,
released back to the columns when they go to sleep (fleet_release.py), so the phones built at any
moment are the phones doing something, not the population.

Every phone of the fleet is registered before the first check-in (fleet_bulk.py): its token is a
row of a column. A phone is built at its seeded start (fleet_activation.activate_in_time) and runs
until it ends (the server's task is done, or time is up) or is released; a released phone's state
goes to ``ParkedPhones`` and an alarm on the clock (``VirtualClock.alarm``, joined for the phone as
its own sleep would be) builds it again at its wake-up. A phone that ended is parked too: its
counters are what the fleet reports of it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any, Protocol

import aiohttp
import numpy as np

from fedfleet.device_runtime.emulated_device import PhoneClient
from fedfleet.device_runtime.fleet_activation import activate_in_time
from fedfleet.device_runtime.fleet_bulk import register_in_bulk
from fedfleet.device_runtime.fleet_parked import ParkedPhones
from fedfleet.device_runtime.fleet_plan import FleetConfig, FleetPlan
from fedfleet.device_runtime.fleet_release import ReleasablePhone, Released, ReleasingClock
from fedfleet.device_runtime.phone_stats import PhoneStats
from fedfleet.device_runtime.protocol_client import Trainer
from fedfleet.device_runtime.vclock import VirtualClock

RngOf = Callable[[np.random.Generator], np.random.Generator]


class BuildPhone(Protocol):
    """run_fleet's phone builder: phone ``i`` of the fleet, of class ``kind``, on ``phone_clock``."""

    def __call__(self, i: int, kind: type[PhoneClient] = ..., phone_clock: Any = ...,
                 rng_of: RngOf | None = ...) -> PhoneClient: ...


class PhoneNames(Sequence[str]):
    """The names of a fleet's phones ``indices``, made when asked for (a million strings are ~70 MB)."""

    def __init__(self, cfg: FleetConfig, indices: range) -> None:
        self.cfg, self.indices = cfg, indices

    def name(self, i: int) -> str:
        return self.cfg.phone_name or f"{self.cfg.name_prefix}-{i:05d}"

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: Any) -> Any:
        if isinstance(k, slice):
            return [self.name(i) for i in self.indices[k]]
        return self.name(self.indices[k])


async def bulk_registered(session: aiohttp.ClientSession, server: str, cfg: FleetConfig, plan: FleetPlan,
                          phone: BuildPhone) -> tuple[np.ndarray, PhoneClient]:
    """Register the fleet's phones (its shard) in bulk; their tokens, and the first phone built with
    the registration's answer (the others take its task)."""
    if not cfg.admin_token:
        raise ValueError("register_in_bulk needs the server's admin_token")
    names = PhoneNames(cfg, plan.shard)
    tokens, task = await register_in_bulk(session, server, cfg.admin_token, names, secret=plan.key_secret,
                                          indices=plan.shard, model_fingerprint=cfg.model_fingerprint)
    first = phone(plan.shard[0])
    first.registered({"phone_id": names[0], "token": tokens[0].decode(), "task": task})
    return tokens, first


def population_of(cfg: FleetConfig, clock: VirtualClock, phone: BuildPhone, tokens: np.ndarray, shard: range,
                  first: PhoneClient, pool: Trainer, failures: list[Any],
                  run_phone: Callable[[PhoneClient], Awaitable[None]]) -> Population:
    """The fleet's phones as a ``Population``: each built with its token from ``tokens`` (in the
    order of ``shard``) and ``first``'s task, on a ``ReleasingClock``, trained by ``pool``."""
    def build(i: int, rng_of: RngOf) -> ReleasablePhone:
        own = ReleasingClock(clock, cfg.release_after_s)
        p = phone(i, ReleasablePhone, own, rng_of)
        assert isinstance(p, ReleasablePhone)
        own.phone = p
        p.token = tokens[i - shard.start].decode()
        p.task, p.specs, p.local_state, p.pool = first.task, first.specs, first.local_state, pool
        return p

    async def run(p: ReleasablePhone) -> bool:
        gave_up = len(failures)
        await run_phone(p)
        return len(failures) == gave_up

    return Population(clock, cfg.phones, build, run)


class Population:
    """``build(i, rng_of)``: phone ``i`` built from the columns, its generator passed through
    ``rng_of`` (its parked one, once it has been released). ``run(p)``: the phone's run (it leaves
    the clock when it ends); True when it ended without giving up."""

    def __init__(self, clock: VirtualClock, phones: int,
                 build: Callable[[int, RngOf], ReleasablePhone],
                 run: Callable[[ReleasablePhone], Awaitable[bool]]) -> None:
        self.clock, self.build, self.run = clock, build, run
        self.parked = ParkedPhones(phones)
        self.active: dict[int, ReleasablePhone] = {}  # built now
        self.ever = np.zeros(phones, dtype=bool)  # phones ever built (the fleet reports these)
        self.peak_active = 0
        self.releases = 0
        self._tasks: set[asyncio.Future[None]] = set()
        self._alarms = 0
        self._driving = True
        self._ended = False  # a phone's run ended: the server's task is done (or time is up)
        self._idle = asyncio.Event()
        self._error: BaseException | None = None

    async def run_all(self, phones: np.ndarray, starts: np.ndarray, until: float | None) -> None:
        """Start each phone at its start; return once every phone has ended (raise the first error)."""
        try:
            await activate_in_time(self.clock, phones, starts, self.start, lambda: self._ended, until)
        finally:
            self._driving = False
        self._check_idle()
        try:
            await self._idle.wait()
        except BaseException:  # the fleet is cancelled: so are its phones
            for t in list(self._tasks):
                t.cancel()
            raise
        if self._error is not None:
            raise self._error

    def start(self, i: int) -> asyncio.Future[None]:
        """Build and run phone ``i`` (the clock was joined for it)."""
        task = asyncio.ensure_future(self._activated(i))
        self._tasks.add(task)
        task.add_done_callback(self._finished)
        return task

    async def _activated(self, i: int) -> None:
        try:
            p = self.build(i, partial(self.parked.generator, i))
            self.parked.restore(i, p)
        except BaseException:
            self.clock.leave()
            raise
        self.active[i] = p
        self.ever[i] = True
        self.peak_active = max(self.peak_active, len(self.active))
        try:
            ended_well = await self.run(p)
        except Released as released:
            self._park(i, p)
            self.clock.join()  # for the phone, as its own sleep would hold the clock
            alarm = self.clock.alarm(released.wake)
            self._alarms += 1
            self.releases += 1
            alarm.add_done_callback(partial(self._woke, i))
            return
        self._park(i, p)
        if ended_well:
            self._ended = True

    def _park(self, i: int, p: ReleasablePhone) -> None:
        self.parked.save(i, p)
        del self.active[i]

    def _woke(self, i: int, alarm: asyncio.Future[None]) -> None:
        self._alarms -= 1
        if alarm.cancelled() or self._error is not None:
            self._check_idle()
            return
        self.start(i)

    def _finished(self, task: asyncio.Future[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None and self._error is None:
            self._error = task.exception()
            for t in list(self._tasks):
                t.cancel()
            self._idle.set()
        self._check_idle()

    def _check_idle(self) -> None:
        if not self._driving and not self._tasks and not self._alarms:
            self._idle.set()

    def stats(self, name: Callable[[int], str], examples: Callable[[int], int]) -> list[PhoneStats]:
        """Every phone ever built, in index order: what it saw (those still built, from themselves)."""
        return [self.active[i].stats if i in self.active else self.parked.stats(i, name(i), examples(i))
                for i in np.flatnonzero(self.ever).tolist()]
