"""The emulated device a fleet's phones run on: its profile's compute and link times, its
availability, its dropouts and its attacks, on the fleet's clock (virtual or wall).

It plugs into the protocol client through ``protocol_client.Device``'s hooks and draws from the
phone's own generator, the one the protocol client trains and encodes with, so a seed reproduces
a phone's whole run. ``PhoneClient`` is a fleet's phone: the protocol client on such a device.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Mapping
from typing import Any

import aiohttp
import numpy as np

from fedfleet.device_runtime.attacks import Attack
from fedfleet.device_runtime.clock import PhoneClock, WallClock
from fedfleet.device_runtime.profiles import DeviceProfile
from fedfleet.device_runtime.protocol_client import (
    Examples,
    ModelMemo,
    Params,
    ProtocolClient,
    Trained,
    Trainer,
)
from fedfleet.protocol.signing import PhoneKey


class EmulatedDevice:
    """One emulated phone's hardware and conduct. Without a profile it adds no time and never
    drops out; it is still away with probability ``1 - availability`` at each check-in."""

    platform = "emulated"

    def __init__(self, rng: np.random.Generator, clock: PhoneClock, *, profile: DeviceProfile | None = None,
                 availability: float = 1.0, attack: Attack | None = None) -> None:
        self.rng, self.clock, self.profile, self.availability = rng, clock, profile, availability
        self.attack = attack or Attack()  # a Byzantine phone (tests, benchmarks); none by default
        self._vanish: str | None = None  # this task's dropout: "training", "upload" or None

    def away_s(self) -> float:
        away = self.profile.wait_until_available(self.clock.now()) if self.profile else 0.0
        if away > 0 or self.rng.random() >= self.availability:
            return away or 1.0
        return 0.0

    async def downloaded(self, inline_bytes: int, fetched_bytes: int) -> None:
        profile = self.profile
        if profile is not None:  # an inline model came with the check-in: its bytes, no round trip of its own
            await self.clock.sleep(profile.transfer_s(inline_bytes, uplink=False, round_trip=False) if inline_bytes
                                   else profile.transfer_s(fetched_bytes, uplink=False))

    async def train(self, training: Awaitable[Trained], examples: int, epochs: int) -> Trained | None:
        """The phone is busy for its profile's training time; a phone that drops out does so
        mid-training or mid-upload (even odds)."""
        profile, clock = self.profile, self.clock
        wall = time.monotonic()
        self._vanish = None
        if profile is not None and profile.dropout and self.rng.random() < profile.dropout:
            self._vanish = "training" if self.rng.random() < 0.5 else "upload"
        if self._vanish == "training" and profile is not None:
            # Vanishes mid-training (the arithmetic still runs; its result is dropped, so the
            # phone's random stream stays the same either way).
            await clock.sleep(profile.train_s(examples * epochs) * self.rng.random())
            await training
            return None
        if isinstance(clock, WallClock):
            delta, result = await training
            if profile is not None:  # the real compute already took part of the device's time
                await clock.sleep(profile.train_s(result.num_examples * epochs) - (time.monotonic() - wall))
        else:
            # Virtual time: the phone is busy for its device's training time while the
            # arithmetic runs beside the event loop; it needs the result only when done.
            await clock.sleep(profile.train_s(examples * epochs) if profile is not None else 0.0)
            delta, result = await training
        return delta, result

    def uploads(self, delta: Params) -> Params:
        return self.attack.apply_delta(delta, self.rng)

    def secure_drop(self) -> str | None:
        if self._vanish != "upload":
            return None
        return "share" if self.rng.random() < 0.5 else "masked"

    def link_breaks(self, nbytes: int) -> int | None:
        if self._vanish != "upload":
            return None
        return int(nbytes * self.rng.random())

    async def uploading(self, nbytes: int) -> None:
        if self.profile is not None:
            await self.clock.sleep(self.profile.transfer_s(nbytes, uplink=True))


class PhoneClient(ProtocolClient):
    """A phone of an emulated fleet: the protocol client on an ``EmulatedDevice`` (``profile``,
    ``availability``, ``attack``; a label-flipping attacker trains on its flipped labels, of
    ``num_classes``). Its next check-in rides on its upload only if it is always available."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        server: str,
        name: str,
        data: Examples,
        pool: Trainer | None,
        rng: np.random.Generator,
        *,
        ledger: Any = None,
        sign: bool = True,
        train_overrides: Mapping[str, Any] | None = None,
        availability: float = 1.0,
        profile: DeviceProfile | None = None,
        clock: PhoneClock | None = None,
        attack: Attack | None = None,
        num_classes: int = 0,
        poll_session: aiohttp.ClientSession | None = None,
        inline_model: bool = True,
        models: ModelMemo | None = None,
        chain_checkin: bool = True,
        key: PhoneKey | None = None,
        model_fingerprint: str | None = None,
        enrolment_code: str | None = None,
    ) -> None:
        clock = clock or WallClock()
        device = EmulatedDevice(rng, clock, profile=profile, availability=availability, attack=attack)
        if device.attack.poisons_data:
            x, y = data
            data = (x, device.attack.apply_labels(y, num_classes))
        super().__init__(session, server, name, data, pool, rng, device=device, clock=clock, ledger=ledger,
                         sign=sign, train_overrides=train_overrides, poll_session=poll_session,
                         inline_model=inline_model, models=models,
                         chain_checkin=chain_checkin and profile is None and availability >= 1.0, key=key,
                         model_fingerprint=model_fingerprint, enrolment_code=enrolment_code)
