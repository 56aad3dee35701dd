"""Phones released back to the columns while they sleep, and built again when they wake.

A phone of a bulk-registered fleet on the virtual clock (FleetConfig.register_in_bulk) that is about
to sleep at least ``release_after_s`` between tasks (the rest the server asks for after an upload, a
"wait" check-in's retry, or a stretch away from its charger) is not kept as a Python object: what
it learned that must survive goes to columns (fleet_parked.ParkedPhones), the object is dropped, and
the clock holds an alarm for its wake-up (``VirtualClock.alarm``) instead of a sleeping task. At the
alarm the phone is built again from the fleet's columns and its parked state, equal to the phone that
slept (its random stream, counters, update numbers, signing nonce and encoder), and goes on.

A phone that holds state the columns do not keep stays built while it sleeps: an error-feedback
residual or an encoder that draws (the non-default codecs), statistics of its own (--local-state),
a model copy or a chained check-in's answer. Sleeps inside a task (training, transfers, upload
retries) never release a phone.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedfleet.device_runtime.emulated_device import PhoneClient
from fedfleet.device_runtime.vclock import VirtualClock

RELEASE_AFTER_S = 60.0  # virtual seconds of sleep from which a phone is released (FleetConfig.release_after_s)


class Released(Exception):
    """The phone left the run to sleep until ``wake`` (virtual time), released to the columns."""

    def __init__(self, wake: float) -> None:
        super().__init__(wake)
        self.wake = wake


class ReleasablePhone(PhoneClient):
    """A fleet's phone that knows when it is inside a task (from its check-in's "train" answer to
    its upload's acknowledgement): only outside one is a long sleep a release."""

    in_task = False

    async def _train_and_upload(self, task: dict[str, Any]) -> None:
        self.in_task = True
        try:
            await super()._train_and_upload(task)
        finally:
            self.in_task = False

    async def _upload(self, body: bytes, meta: dict[str, Any], attempts: int = 8) -> dict[str, Any]:
        answer = await super()._upload(body, meta, attempts)
        self.in_task = False  # what follows is the rest the server asked for
        return answer

    def may_release(self) -> bool:
        """Outside a task, and holding nothing the columns do not keep (see the module's doc)."""
        encoder = self.encoder
        return (not self.in_task and self._next is None and self._model is None and not self.own_state
                and (encoder is None or encoder._plain) and type(self.rng.bit_generator) is np.random.PCG64)


class ReleasingClock:
    """The fleet's virtual clock as one phone sees it: a sleep of ``after_s`` or more, when the phone
    ``may_release``, raises ``Released`` instead of sleeping (the fleet parks the phone on an alarm)."""

    __slots__ = ("after_s", "clock", "phone")

    def __init__(self, clock: VirtualClock, after_s: float) -> None:
        self.clock, self.after_s = clock, after_s
        self.phone: ReleasablePhone | None = None

    def now(self) -> float:
        return self.clock.now()

    def join(self) -> None:
        self.clock.join()

    def leave(self) -> None:
        self.clock.leave()

    async def sleep(self, seconds: float) -> None:
        phone = self.phone
        if seconds >= self.after_s and phone is not None and phone.may_release():
            raise Released(self.clock.now() + max(seconds, 0.0))
        await self.clock.sleep(seconds)
