"""A discrete-event virtual clock for emulated fleets.

Phones do their real work (HTTP requests with real bytes, real local training) at once and
then *sleep on the virtual clock* for the time that work would take on the device (from its
profile and the real payload size). Virtual time advances only when every emulated phone is
asleep, jumping to the earliest wake-up, so a day of a fleet runs as fast as the real work
allows, and event order is deterministic. The server reads ``now`` as its clock.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable


class VirtualClock:
    def __init__(self, start: float = 0.0) -> None:
        self.t = start
        self._heap: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()
        self._members = 0  # phones taking part
        self._sleeping = 0  # phones blocked in sleep()
        self._advance_scheduled = False
        # Called when every phone is asleep, before time moves on: work queued at this
        # instant (a batched trainer's groups) is released here, deterministically.
        self.before_advance: list[Callable[[], None]] = []

    def now(self) -> float:
        return self.t

    def join(self) -> None:
        self._members += 1

    def leave(self) -> None:
        self._members -= 1
        self._schedule_advance()

    async def sleep(self, seconds: float) -> None:
        fut = self._wake_at(self.t + max(seconds, 0.0))
        try:
            await fut
        except asyncio.CancelledError:
            self._cancelled(fut)
            raise

    async def sleep_until(self, when: float) -> None:
        """Sleep until virtual time ``when`` exactly (the next advance, if it has passed)."""
        fut = self._wake_at(max(when, self.t))
        try:
            await fut
        except asyncio.CancelledError:
            self._cancelled(fut)
            raise

    def alarm(self, when: float) -> asyncio.Future[None]:
        """A sleeper that is not a task: the future resolves at virtual time ``when``, as a member's
        ``sleep_until(when)`` would (join for it first; leave once done with it). A fleet parks its
        released phones on these (fleet_release.py) rather than on a task each."""
        return self._wake_at(max(when, self.t))

    def _wake_at(self, when: float) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._heap, (when, next(self._seq), fut))
        self._sleeping += 1
        self._schedule_advance()
        return fut

    def _cancelled(self, fut: asyncio.Future[None]) -> None:
        if fut.cancelled():  # woken futures were already uncounted in _advance
            self._sleeping -= 1
            self._schedule_advance()

    def _schedule_advance(self) -> None:
        if not self._advance_scheduled and self._heap:
            self._advance_scheduled = True
            asyncio.get_running_loop().call_soon(self._advance)

    def _advance(self) -> None:
        self._advance_scheduled = False
        while self._heap and self._heap[0][2].done():  # cancelled sleepers
            heapq.heappop(self._heap)
        if not self._heap or self._sleeping < self._members:
            return  # someone is still working; the last one to fall asleep advances time
        for hook in self.before_advance:
            hook()
        self.t = max(self.t, self._heap[0][0])
        while self._heap and self._heap[0][0] <= self.t:
            _, _, fut = heapq.heappop(self._heap)
            if not fut.done():
                fut.set_result(None)
                self._sleeping -= 1
