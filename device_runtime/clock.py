"""The time a phone runs on: ``PhoneClock``, what the protocol client waits with, and
``WallClock``, real time (a real phone's, and an emulated fleet's on the wall clock).
An emulated fleet's virtual time is ``vclock.VirtualClock``."""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class PhoneClock(Protocol):
    def now(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...

    def join(self) -> None: ...

    def leave(self) -> None: ...


class WallClock:
    """Real time: sleeping really waits."""

    def __init__(self) -> None:
        self._t0 = time.monotonic()

    def now(self) -> float:
        return time.monotonic() - self._t0

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(seconds, 0.0))

    def join(self) -> None:
        pass

    def leave(self) -> None:
        pass
