"""Phones built when they first become active (FleetConfig.register_when_active).

A fleet whose phones first check in over a long stretch of virtual time need not build and
register them all before the first check-in: until its seeded start a phone is a row of columns
(fleet_columns), and a phone that never becomes active in the run never registers. One driver,
a member of the virtual clock, sleeps until the next phone's start and activates it there. The
driver joins the clock on the phone's behalf before the phone's task exists, so virtual time stands
still while the phone registers and makes its first check-in, as if it had been asleep until then.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import numpy as np

from fedfleet.device_runtime.vclock import VirtualClock


async def activate_in_time(clock: VirtualClock, phones: np.ndarray, starts: np.ndarray,
                           activate: Callable[[int], Awaitable[None]], ended: Callable[[], bool],
                           until: float | None) -> list[asyncio.Future[None]]:
    """Start ``activate(i)`` for each of ``phones`` at its start (``starts[i]``, the virtual time the
    phones joined at being 0), in order of start; ``activate`` runs with the clock joined for it (it must leave, once).
    Stops early once ``ended()`` (the server's task is done) or at ``until``. Returns the tasks started."""
    order = phones[np.argsort(starts[phones], kind="stable")]
    started: list[asyncio.Future[None]] = []
    clock.join()
    try:
        for i in order.tolist():
            await clock.sleep_until(float(starts[i]))  # as the phone's own sleep from time 0 would
            if ended() or (until is not None and clock.now() >= until):
                break
            clock.join()  # for phone i, until its run ends
            started.append(asyncio.ensure_future(activate(i)))
    finally:
        clock.leave()
    return started
