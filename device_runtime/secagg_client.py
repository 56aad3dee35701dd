"""The phone's side of a secure round over HTTP (FORMAT.md section 12, server/secagg_routes.py):
advertise keys, share them, upload the masked integer update, answer the unmask request
(``secure_round``, after training; or ``SecureSession`` in two halves, keys while training).

The arithmetic is ``protocol.secagg.SecAggPhone``; this module only moves its messages and
waits for each step to close. ``drop_after`` ("share" or "masked") makes the phone vanish
after that step, as a phone that loses its connection would (emulation and tests).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedfleet.protocol.secagg import GroupParams, PublicKeys, SecAggPhone
from fedfleet.protocol.secagg.coords import shared_coordinates
from fedfleet.protocol.secagg.framing import pack_keys, pack_sealed, pack_unmask
from fedfleet.protocol.secagg.integer import flatten, pack, to_integers
from fedfleet.protocol.secagg.params import params_from_json
from fedfleet.protocol.secagg.phone import keys_for, sync_group_name

# send(method, path, json body or None, raw body or None) -> the JSON answer; raises on a 4xx
Send = Callable[[str, str, Any, bytes | None], Awaitable[dict[str, Any]]]
Sleep = Callable[[float], Awaitable[None]]
DROP_POINTS = (None, "share", "masked")


class SecureRoundAborted(Exception):
    """The group fell below its threshold, or closed without this phone: nothing of this phone
    was merged; check in again."""


@dataclass
class SecureOutcome:
    """What the phone did in one secure round (its own view)."""

    params: GroupParams | None = None  # what its group agreed on
    values: np.ndarray | None = None  # the integer update it masked (None: it never got that far)
    masked: np.ndarray | None = None  # what it uploaded
    bytes_up: int = 0
    bytes_down: int = 0
    cpu_ms: float = 0.0  # time in the protocol's arithmetic (keys, shares, masks)
    dropped: bool = False


class SecureSession:
    """One phone in one secure group, in two halves. ``keys()`` advertises and shares keys; it
    needs no update, so a phone can run it while it trains (async groups wait for the masked
    uploads until the task's deadline). ``upload(delta)`` masks and uploads the update and answers
    the unmask request. ``rng`` draws the phone's entropy (here), its rounding and its noise."""

    def __init__(self, send: Send, sleep: Sleep, round_number: int, names: Sequence[str], rng: np.random.Generator,
                 *, poll_s: float = 0.05) -> None:
        self.send, self.sleep, self.round, self.names, self.rng, self.poll_s = send, sleep, round_number, names, rng, poll_s
        self.out = SecureOutcome()
        self.entropy = rng.bytes(32)  # a real phone draws it from the OS; emulated phones reproduce a seed
        self.phone: SecAggPhone | None = None

    async def _call(self, method: str, path: str, body: Any = None, raw: bytes | None = None) -> dict[str, Any]:
        self.out.bytes_up += len(raw) if raw is not None else len(repr(body)) if body is not None else 0
        answer = await self.send(method, path, body, raw)
        self.out.bytes_down += len(repr(answer))
        return answer

    async def _until_ready(self, path: str) -> dict[str, Any]:
        while True:
            answer = await self._call("GET", f"{path}?round={self.round}")
            if answer.get("state") == "ready":
                return answer
            if answer.get("state") == "aborted":
                raise SecureRoundAborted(str(answer.get("message", "the group aborted")))
            await self.sleep(min(float(answer.get("retry_after_s", self.poll_s)), self.poll_s))

    async def keys(self) -> None:
        """Steps 1 and 2: advertise keys, wait for the roster, share keys with the neighbours."""
        out, t = self.out, time.perf_counter()
        probe = keys_for(self.entropy, sync_group_name(self.round).encode())
        out.cpu_ms += (time.perf_counter() - t) * 1e3
        joined = await self._call("POST", f"/v1/secagg/advertise?round={self.round}", None, pack_keys(probe))
        if not joined.get("accepted"):
            raise SecureRoundAborted(f"round {self.round}'s group closed its roster before this phone joined")
        roster = await self._until_ready("/v1/secagg/roster")
        params = out.params = params_from_json(roster["params"])
        t = time.perf_counter()
        phone = self.phone = SecAggPhone(params, int(roster["index"]), self.entropy)
        if phone.keys != probe:
            raise SecureRoundAborted(f"the server's group {params.group!r} is not round {self.round}'s")
        keys = {int(j): PublicKeys(bytes.fromhex(c), bytes.fromhex(m)) for j, (c, m) in roster["keys"].items()}
        sealed = phone.share_keys(keys)
        out.cpu_ms += (time.perf_counter() - t) * 1e3
        await self._call("POST", f"/v1/secagg/shares?round={self.round}", None, pack_sealed(sealed))

    async def upload(self, delta: Mapping[str, np.ndarray], *, drop_after: str | None = None) -> SecureOutcome:
        """Steps 3 and 4, after ``keys()``: ``delta`` is the float update (tensors named ``names``)."""
        out, phone, params = self.out, self.phone, self.out.params
        assert phone is not None and params is not None, "keys() first"
        inbox = await self._until_ready("/v1/secagg/inbox")
        t = time.perf_counter()
        x = flatten(delta, self.names)
        if params.dim < params.model_dim:  # shared random-k: the group's coordinates only
            x = x[shared_coordinates(params.graph_seed, params.context, params.model_dim, params.dim)]
        out.values = to_integers(x, params, self.rng)
        out.masked = phone.masked_upload({int(j): bytes.fromhex(s) for j, s in inbox["shares"].items()}, out.values)
        body = pack(out.masked, params.modulus_bits)
        out.cpu_ms += (time.perf_counter() - t) * 1e3
        await self._call("POST", f"/v1/secagg/masked?round={self.round}", None, body)
        if drop_after == "masked":
            out.dropped = True
            return out
        request = await self._until_ready("/v1/secagg/unmask")
        shares = phone.unmask(request["survivors"], request["dropped"])
        await self._call("POST", f"/v1/secagg/unmask?round={self.round}", None, pack_unmask(shares))
        return out


async def secure_round(
    send: Send,
    sleep: Sleep,
    round_number: int,
    delta: Mapping[str, np.ndarray],
    names: Sequence[str],
    rng: np.random.Generator,
    *,
    drop_after: str | None = None,
    poll_s: float = 0.05,
) -> SecureOutcome:
    """One round's four steps, after training. ``delta``: the float update (tensors named
    ``names``, the task's order); ``rng``: draws the phone's entropy, its rounding and its noise."""
    if drop_after not in DROP_POINTS:
        raise ValueError(f"drop_after must be one of {DROP_POINTS}, got {drop_after!r}")
    session = SecureSession(send, sleep, round_number, names, rng, poll_s=poll_s)
    await session.keys()
    if drop_after == "share":
        session.out.dropped = True
        return session.out
    return await session.upload(delta, drop_after=drop_after)
