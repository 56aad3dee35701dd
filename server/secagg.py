"""One sync round's secure group: the state machine of SecAgg+'s four steps on the server.

The group is the round's cohort: phones handed the round's task advertise keys; the roster
closes when the round's target have advertised (or the step deadline passes), then each step
closes when every phone still in it has acted or its deadline passes. Phones that miss a step
are dropped. Every message is checked before it changes anything: bad input raises a named
``SecAggError`` (a 400 with its reason) and leaves the group as it was.

The group never holds a partial sum: ``unmask_sum`` runs once, when the unmask step closes,
and either returns the whole sum or raises ``BelowThreshold`` (the group aborts; the round
merges nothing). Steps time out on the coordinator's clock: ``tick`` closes a step whose deadline passed.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedfleet.protocol.secagg import (
    BadShare,
    BelowThreshold,
    DuplicateShare,
    GroupParams,
    NotANeighbour,
    PublicKeys,
    UnmaskShares,
    WrongStep,
    crypto,
    group_params,
    unmask_sum,
)
from fedfleet.protocol.secagg.coords import kept
from fedfleet.protocol.secagg.framing import unpack_sealed, unpack_unmask
from fedfleet.protocol.secagg.graph import neighbours
from fedfleet.protocol.secagg.integer import unpack
from fedfleet.protocol.secagg.params import params_json
from fedfleet.protocol.secagg.phone import SEALED_SHARE_BYTES, sync_group_name
from fedfleet.protocol.secagg.shamir import PRIME, SHARE_BYTES

_PROBE = bytes(range(1, 33))  # any scalar: X25519 of it with a low-order key is all zeros
SEALED_BYTES = SEALED_SHARE_BYTES  # two 16-byte shares + the 16-byte Poly1305 tag (FORMAT.md 12.2)
STEPS = ("advertise", "share", "masked", "unmask", "done", "aborted")


@dataclass(frozen=True)
class SecAggSettings:
    """What the server's configuration says about secure rounds."""

    threshold: float
    degree: int | None
    clip: float
    modulus_bits: int  # b; 0: the smallest b >= 12 at which the group's sum fits
    noise_multiplier: float
    step_timeout_s: float
    seed: int
    density: float = 1.0  # shared random-k: the fraction of coordinates every phone sends


@dataclass
class SecureGroup:
    round: int
    target: int  # the roster closes once this many phones advertised
    dim: int
    settings: SecAggSettings
    clock: Callable[[], float]
    step: str = "advertise"
    opened_at: float = 0.0
    step_opened_at: float = 0.0
    keys: dict[str, PublicKeys] = field(default_factory=dict)  # U1, by phone name
    params: GroupParams | None = None
    index: dict[str, int] = field(default_factory=dict)  # phone -> 1..n, sorted by name
    graph: dict[int, frozenset[int]] = field(default_factory=dict)
    sealed: dict[int, dict[int, bytes]] = field(default_factory=dict)  # U2: sender -> recipient -> sealed
    masked: dict[int, np.ndarray] = field(default_factory=dict)  # U3
    responses: dict[int, UnmaskShares] = field(default_factory=dict)  # U4
    total: np.ndarray | None = None  # the unmasked sum, once done
    abort_reason: str = ""
    unmask_ms: float = 0.0
    bytes_up: int = 0
    bytes_down: int = 0
    # Called with (kind, phone, body) once a message has passed every check and before it changes
    # the group: async groups write it to the store first (server/secagg_journal.py).
    journal: Callable[[str, str, bytes], None] | None = None
    # Async groups: phones may share keys before they train, so the masked step waits for the
    # first upload until the members' task deadline (clock time), then step_timeout_s more.
    training_until: float | None = None
    first_upload_at: float | None = None

    @property
    def name(self) -> str:
        return sync_group_name(self.round)

    # --- step 1: advertise ---------------------------------------------------------------
    def advertise(self, phone: str, keys: PublicKeys) -> None:
        self._expect("advertise")
        if phone in self.keys:
            raise WrongStep(f"{phone} already advertised keys for {self.name}")
        for key in (keys.channel, keys.mask):
            crypto.agree(_PROBE, key)  # a low-order point (all-zero secret) is BadShare before anyone uses it
        self._log("advertise", phone, keys.channel + keys.mask)
        self.keys[phone] = keys
        if len(self.keys) >= self.target:
            self._close_roster()

    def seal(self, size: int) -> None:
        """No more phones will be handed this group's task (async: the buffer is full or the model
        moved on): the roster closes once ``size`` have advertised."""
        self.target = size
        if self.step == "advertise" and len(self.keys) >= size:
            self._close_roster()

    def _close_roster(self) -> None:
        if len(self.keys) < 2:
            self._abort(f"{len(self.keys)} phones advertised keys, a group needs 2")
            return
        s = self.settings
        seed = hashlib.sha256(f"fedfleet graph {s.seed} {self.name}".encode()).digest()
        try:
            self.params = group_params(self.name, len(self.keys), kept(self.dim, s.density), clip=s.clip,
                                       threshold=s.threshold, degree=s.degree,
                                       noise_multiplier=s.noise_multiplier, graph_seed=seed, full_dim=self.dim,
                                       modulus_bits=s.modulus_bits or None)
        except ValueError as exc:  # SumMayWrap too: settings that fail at this group's size
            self._abort(f"no parameters for {len(self.keys)} phones: {exc}")
            return
        self.index = {phone: i for i, phone in enumerate(sorted(self.keys), start=1)}
        self.graph = neighbours(self.params.size, self.params.degree, self.params.graph_seed)
        self._enter("share")

    def roster_for(self, phone: str) -> dict[str, Any] | None:
        """The group's parameters and the keys of the phone and its neighbours, or None while the
        roster is open."""
        if self.step == "advertise":
            return None
        i = self._member(phone)
        p = self._params()
        near = self.graph[i] | {i}
        by_index = {self.index[ph]: k for ph, k in self.keys.items() if self.index[ph] in near}
        return {"index": i, "params": params_json(p), "neighbours": sorted(self.graph[i]),
                "keys": {str(j): [k.channel.hex(), k.mask.hex()] for j, k in sorted(by_index.items())}}

    # --- step 2: share keys ---------------------------------------------------------------
    def share(self, phone: str, sealed: Mapping[int, bytes]) -> None:
        self._expect("share")
        i = self._member(phone)
        if i in self.sealed:
            raise DuplicateShare(f"{phone} already shared its keys in {self.name}")
        outside = set(sealed) - self.graph[i]
        if outside:
            raise NotANeighbour(f"shares for phones {sorted(outside)}, not neighbours of phone {i}")
        if set(sealed) != set(self.graph[i]):
            raise BadShare(f"phone {i} must send one share to each neighbour {sorted(self.graph[i])}")
        for j, blob in sealed.items():
            if len(blob) != SEALED_BYTES:
                raise BadShare(f"a sealed share is {SEALED_BYTES} bytes, got {len(blob)} for phone {j}")
        self._log("share", phone, json.dumps({str(j): b.hex() for j, b in sealed.items()}).encode())
        self.sealed[i] = dict(sealed)
        self.bytes_up += SEALED_BYTES * len(sealed)
        if len(self.sealed) == len(self.index):
            self._enter("masked")

    def share_packed(self, phone: str, body: bytes) -> None:
        """``share`` from the binary body (protocol/secagg/framing.py): one sealed share per neighbour."""
        self._expect("share")
        self.share(phone, unpack_sealed(body, sorted(self.graph[self._member(phone)])))

    def inbox_for(self, phone: str) -> dict[str, Any] | None:
        """The sealed shares addressed to ``phone`` from neighbours that shared, once the step closed."""
        if self.step in ("advertise", "share"):
            return None
        i = self._member(phone)
        if i not in self.sealed:
            raise WrongStep(f"{phone} did not share its keys in time and is out of {self.name}")
        inbox = {j: out[i] for j, out in self.sealed.items() if i in out}
        self.bytes_down += SEALED_BYTES * len(inbox)
        return {"shares": {str(j): blob.hex() for j, blob in sorted(inbox.items())}}

    # --- step 3: masked upload --------------------------------------------------------------
    def upload(self, phone: str, body: bytes) -> None:
        self._expect("masked")
        i = self._member(phone)
        if i not in self.sealed:
            raise WrongStep(f"{phone} did not share its keys and cannot upload in {self.name}")
        if i in self.masked:
            raise WrongStep(f"{phone} already sent its masked update in {self.name}")
        p = self._params()
        if len(body) != p.upload_bytes:
            raise BadShare(f"a masked update is {p.rotated_dim} values of {p.modulus_bits} bits, {p.upload_bytes} "
                           f"bytes, got {len(body)}")
        spare = 8 * p.upload_bytes - p.rotated_dim * p.modulus_bits
        if spare and body[-1] >> (8 - spare):
            raise BadShare("the padding bits after the last masked value must be zero")
        y = unpack(body, p.rotated_dim, p.modulus_bits)
        self._log("masked", phone, body)
        self.masked[i] = y
        if self.first_upload_at is None:
            self.first_upload_at = self.clock()
        self.bytes_up += len(body)
        if len(self.masked) == len(self.sealed):
            self._close_uploads()

    def _close_uploads(self) -> None:
        p = self._params()
        if len(self.masked) < p.min_survivors:
            self._abort(f"{len(self.masked)} masked uploads, fewer than {p.min_survivors}")
        else:
            self._enter("unmask")

    def unmask_request_for(self, phone: str) -> dict[str, Any] | None:
        if self.step in ("advertise", "share", "masked"):
            return None
        if self.step == "aborted":
            raise BelowThreshold(f"{self.name} aborted: {self.abort_reason}")
        i = self._member(phone)
        if i not in self.masked:
            raise WrongStep(f"{phone} sent no masked update in {self.name}")
        return {"survivors": sorted(self.masked), "dropped": sorted(set(self.sealed) - set(self.masked))}

    # --- step 4: unmask ---------------------------------------------------------------------
    def unmask_packed(self, phone: str, body: bytes) -> None:
        """``unmask`` from the binary body: one share per neighbour whose sealed share the phone got."""
        if self.step == "aborted":
            raise BelowThreshold(f"{self.name} aborted ({self.abort_reason}): nothing is unmasked")
        self._expect("unmask")
        i = self._member(phone)
        senders = [j for j, out in self.sealed.items() if i in out]
        self.unmask(phone, unpack_unmask(body, senders, self.masked))

    def unmask(self, phone: str, shares: UnmaskShares) -> None:
        if self.step == "aborted":
            raise BelowThreshold(f"{self.name} aborted ({self.abort_reason}): nothing is unmasked")
        self._expect("unmask")
        i = self._member(phone)
        if i not in self.masked:
            raise WrongStep(f"{phone} sent no masked update in {self.name}")
        if i in self.responses:
            raise DuplicateShare(f"{phone} already sent its unmask shares in {self.name}")
        survivors, dropped = set(self.masked), set(self.sealed) - set(self.masked)
        near = self.graph[i] & set(self.sealed)
        for about, group, what in ((shares.seeds, survivors, "seed"), (shares.keys, dropped, "key")):
            outside = set(about) - near
            if outside:
                raise NotANeighbour(f"{what} shares about phones {sorted(outside)}, not neighbours of phone {i}")
            wrong = set(about) - group
            if wrong:
                raise BadShare(f"{what} shares about phones {sorted(wrong)}, which are not {what}-holders here")
            if any(not 0 <= y < PRIME for y in about.values()):
                raise BadShare("a share is not a field element")
        self._log("unmask", phone, json.dumps({"seeds": {str(j): y for j, y in shares.seeds.items()},
                                                "keys": {str(j): y for j, y in shares.keys.items()}}).encode())
        self.responses[i] = shares
        self.bytes_up += SHARE_BYTES * (len(shares.seeds) + len(shares.keys))
        if len(self.responses) == len(self.masked):
            self._finish()

    def _finish(self) -> None:
        p = self._params()
        by_index = {self.index[ph]: k for ph, k in self.keys.items()}
        t0 = time.perf_counter()
        try:
            self.total = unmask_sum(p, by_index, frozenset(self.sealed), self.masked, self.responses)
        except (BelowThreshold, BadShare) as exc:
            self._abort(str(exc))
            return
        finally:
            self.unmask_ms = (time.perf_counter() - t0) * 1e3
        self._enter("done")

    # --- deadlines and bookkeeping -------------------------------------------------------------
    def tick(self) -> None:
        """Close the open step if its deadline passed: who has not acted by then is dropped."""
        start = self.step_opened_at
        if self.step == "masked" and self.training_until is not None:
            start = self.first_upload_at if self.first_upload_at is not None else \
                max(start, self.training_until - self.settings.step_timeout_s)
        if self.clock() - start < self.settings.step_timeout_s:
            return
        self._log("close", "", self.step.encode())
        self.close_step()

    def close_step(self) -> None:
        """Close the open step now, with whoever has acted."""
        if self.step == "advertise":
            self._close_roster()
        elif self.step == "share":
            if len(self.sealed) < self._params().min_survivors:
                self._abort(f"{len(self.sealed)} phones shared keys, fewer than {self._params().min_survivors}")
            else:
                self._enter("masked")
        elif self.step == "masked":
            self._close_uploads()
        elif self.step == "unmask":
            self._finish()

    def __post_init__(self) -> None:
        self.opened_at = self.step_opened_at = self.clock()

    def _enter(self, step: str) -> None:
        self.step, self.step_opened_at = step, self.clock()

    def _log(self, kind: str, phone: str, body: bytes) -> None:
        if self.journal is not None:
            self.journal(kind, phone, body)

    def _abort(self, reason: str) -> None:
        self.step, self.abort_reason, self.total = "aborted", reason, None

    def _expect(self, step: str) -> None:
        if self.step != step:
            raise WrongStep(f"{self.name} is at step {self.step!r}, not {step!r}")

    def _member(self, phone: str) -> int:
        if phone not in self.index:
            raise WrongStep(f"{phone} is not in the roster of {self.name}")
        return self.index[phone]

    def _params(self) -> GroupParams:
        assert self.params is not None, "the roster is closed before any later step"
        return self.params

    def dropped(self) -> int:
        return len(self.keys) - len(self.masked) if self.step in ("done", "aborted") else 0

