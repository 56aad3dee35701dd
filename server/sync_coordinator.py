"""Synchronous FedAvg rounds: sample a cohort, wait for its updates or the deadline, merge."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from fedfleet.server.aggregation import Params
from fedfleet.server.appointments import Appointments, grace_of
from fedfleet.server.config import ServerConfig
from fedfleet.server.coordinator import Clock, Coordinator
from fedfleet.server.secagg import SecureGroup
from fedfleet.server.secagg_rounds import SecureRounds, settings_of
from fedfleet.server.store import Store
from fedfleet.server.updates import Contribution, Published, UpdateRejected


@dataclass
class _Round:
    number: int
    opened_at: float
    target: int
    cohort: dict[str, float] = field(default_factory=dict)  # phone -> time the task was handed out
    updates: dict[str, Contribution] = field(default_factory=dict)


class SyncCoordinator(Coordinator):
    """Synchronous FedAvg (McMahan et al. 2017) with over-selection (Bonawitz et al. 2019)."""

    mode = "sync"

    def __init__(self, config: ServerConfig, store: Store, params: Params, version: int, clock: Clock,
                 opt_state: Params | None = None) -> None:
        super().__init__(config, store, params, version, clock, opt_state)
        self.appointments = Appointments(grace_of(config.cohort_grace_s, config.round_timeout_s))
        self.appointments.started = clock()  # open() moves it to when serving starts
        self.round = _Round(self.merges + 1, clock(), self._target())
        shapes = {n: s.shape for n, s in self.specs.items()}
        self.secure = SecureRounds(settings_of(config), shapes, clock, store, self.round.number) if config.secure_agg \
            else None
        if self.secure is not None and self.secure.current is not None:  # the group a restart rebuilt
            self.round.cohort.update(dict.fromkeys(self.secure.current.keys, clock()))
        for c in self._restore():  # acknowledged before a crash: still part of this round
            if c.base_version == version:
                self.round.cohort[c.phone] = clock() - c.latency_s
                self.round.updates[c.phone] = c

    def open(self) -> None:
        super().open()
        self.round.opened_at = self.period.opened_at
        self.appointments.started = self.period.opened_at

    def _target(self) -> int:
        """The round's size, from the registered phones that are not away (server/appointments.py)."""
        phones = self.store.phone_count()
        registered = max(phones - self.appointments.away_count(self.clock(), phones), 1)
        return max(self.config.min_cohort, math.ceil(self.config.sample_fraction * registered))

    def checkin(self, phone: str) -> dict[str, Any]:
        self.appointments.arrived(phone, self.clock())  # present from now: it counts in a target set by this check-in
        answer = self._answer(phone)
        due = answer.get("deadline_s", answer.get("retry_after_s"))
        if due is not None:  # the phone's appointment: it uploads, or checks in again, by then
            self.appointments.book(phone, self.clock() + float(due))
        return answer

    def paused_wait(self, phone: str) -> dict[str, Any]:
        answer = self.wait()
        self.appointments.book(phone, self.clock() + float(answer["retry_after_s"]))
        return answer

    def _answer(self, phone: str) -> dict[str, Any]:
        self.tick()
        if self.done:
            return {"action": "done", "version": self.version}
        rnd = self.round
        if not rnd.cohort:  # the first check-in of a round fixes its target size
            rnd.target = self._target()
        if phone in rnd.updates or (self.secure is not None and self.secure.took_part(phone, rnd.number)):
            return self.wait()
        if not self.allowed(phone):
            return {"action": "done", "version": self.version, "reason": "privacy budget spent"}
        if phone not in rnd.cohort:
            if len(rnd.cohort) >= math.ceil(rnd.target * self.config.over_selection):
                return self.wait()
            rnd.cohort[phone] = self.clock()
        return self.train_task(rnd.opened_at + self.config.round_timeout_s - self.clock())

    def secure_group(self) -> SecureGroup:
        """This round's secure group (secure aggregation only; server/secagg_routes.py)."""
        assert self.secure is not None
        self.tick()
        return self.secure.group(self.round.number, self.round.target)

    def _admit(self, phone: str, update_id: str, base: int) -> float:
        rnd = self.round
        if self.secure is not None:
            raise UpdateRejected(409, "secure_round", "this round takes masked updates at /v1/secagg/*")
        if phone in rnd.updates:
            raise UpdateRejected(409, "duplicate", "this phone already uploaded a different update this round")
        if base != self.version:
            raise UpdateRejected(409, "stale", f"update is based on version {base}, current is {self.version}; "
                                               "check in again")
        if phone not in rnd.cohort:
            raise UpdateRejected(409, "not_selected", "this phone has no task in the current round; check in first")
        return rnd.cohort[phone]

    def _hold(self, c: Contribution) -> None:
        self.round.updates[c.phone] = c
        self.appointments.book(c.phone, self.clock() + self.config.rest_after_update_s)

    def forget(self, phone: str, update_id: str) -> None:
        c = self.round.updates.get(phone)
        if c is not None and c.update_id == update_id:
            del self.round.updates[phone]

    def pending(self) -> list[Contribution]:
        return list(self.round.updates.values())

    def is_pending(self, phone: str, update_id: str) -> bool:
        c = self.round.updates.get(phone)  # one update per phone per round: no scan of the round
        return c is not None and c.update_id == update_id

    def ready(self) -> bool:
        """Whether the open round should be merged now (target reached or deadline passed)."""
        rnd = self.round
        if self.secure is not None:
            return self.secure.done(rnd.number)
        if len(rnd.updates) >= rnd.target:
            return True
        expired = self.clock() - rnd.opened_at >= self.config.round_timeout_s
        return expired and len(rnd.updates) >= self.config.min_updates

    def tick(self) -> None:
        """Restart a round whose deadline passed with too few updates to merge."""
        rnd = self.round
        if self.secure is not None:  # steps time out in the group; an aborted group restarts the round
            if self.secure.tick():
                self.round = _Round(rnd.number, self.clock(), self._target())
            return
        if self.clock() - rnd.opened_at >= self.config.round_timeout_s and len(rnd.updates) < self.config.min_updates:
            self.round = _Round(rnd.number, self.clock(), self._target())

    def openings(self) -> tuple[Any, ...]:
        return (*super().openings(), self.round.number, self.round.opened_at)

    def merge(self) -> Published:
        rnd = self.round
        if self.secure is not None:
            secure, extra = self.secure.contribution(lambda: self.ledger, self.store)
            published = self._publish([secure], len(rnd.cohort), extra)
        else:
            published = self._publish(list(rnd.updates.values()), len(rnd.cohort), {})
        self.round = _Round(self.merges + 1, self.clock(), self._target())
        return published

    def status(self) -> dict[str, Any]:
        rnd = self.round
        return {**super().status(), "phones": self.store.phone_count(), "target": rnd.target,
                "away": self.appointments.away_count(self.clock(), self.store.phone_count()),
                "selected": len(rnd.cohort), "updates_in_round": len(rnd.updates)}
