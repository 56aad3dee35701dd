"""Asynchronous, staleness-aware merging for intermittently connected phones (FedBuff).

Nguyen et al. 2022, "Federated Learning with Buffered Asynchronous Aggregation": phones
train on whatever version they downloaded; the server buffers K updates, down-weights each
by its staleness s = current - base, merges them into a new version, and keeps C phones
training at once. Huba et al. 2022 (Papaya) run this at production scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedfleet.server.aggregation import Params
from fedfleet.server.config import ServerConfig
from fedfleet.server.coordinator import Clock, Coordinator
from fedfleet.server.secagg_async import AsyncSecureGroups
from fedfleet.server.secagg_rounds import settings_of
from fedfleet.server.staleness import parse_staleness
from fedfleet.server.store import Store
from fedfleet.server.updates import Contribution, Published, UpdateRejected


@dataclass
class _Assignment:
    version: int
    at: float


class AsyncCoordinator(Coordinator):
    mode = "async"

    def __init__(self, config: ServerConfig, store: Store, params: Params, version: int, clock: Clock,
                 opt_state: Params | None = None) -> None:
        super().__init__(config, store, params, version, clock, opt_state)
        self.staleness_fn = parse_staleness(config.staleness)
        self.in_flight: dict[str, _Assignment] = {}
        self.buffer: list[Contribution] = self._restore()  # acknowledged before a crash
        self.assigned_since_merge = 0
        self.secure = (AsyncSecureGroups(settings_of(config), {n: s.shape for n, s in self.specs.items()}, clock,
                                         config.buffer_size, config.round_timeout_s, store)
                       if config.secure_agg else None)  # each group of K is one buffer (server/secagg_async.py)
        for phone, base in self.secure.members() if self.secure is not None else []:  # groups a restart rebuilt
            self.in_flight[phone] = _Assignment(base, clock())

    def openings(self) -> tuple[Any, ...]:
        return (*super().openings(), len(self.in_flight), self.secure.live() if self.secure is not None else 0)

    def staleness_weight(self, staleness: int) -> float:
        return self.staleness_fn(staleness)

    def tick(self) -> None:
        """Forget assignments older than the task timeout: those phones dropped out."""
        limit = self.clock() - self.config.round_timeout_s
        for phone in [p for p, a in self.in_flight.items() if a.at < limit]:
            del self.in_flight[phone]
        if self.secure is not None:
            for phone in self.secure.tick(self.version, self.config.max_staleness):
                self.in_flight.pop(phone, None)

    def checkin(self, phone: str) -> dict[str, Any]:
        self.tick()
        if self.done:
            return {"action": "done", "version": self.version}
        if not self.allowed(phone):
            return {"action": "done", "version": self.version, "reason": "privacy budget spent"}
        if phone not in self.in_flight:
            if len(self.in_flight) >= self.config.concurrency:
                return self.wait()
            self.assigned_since_merge += 1
        group = self.secure.assign(phone, self.version) if self.secure is not None else (0, self.version)
        if group is None:
            return self.wait()  # its secure group is under way
        self.in_flight[phone] = _Assignment(group[1], self.clock())
        task = self.train_task(self.config.round_timeout_s)
        return {**task, "round": group[0], "version": group[1]} if self.secure is not None else task

    def _admit(self, phone: str, update_id: str, base: int) -> float:
        if self.secure is not None:
            raise UpdateRejected(409, "secure_round", "this server takes masked updates at /v1/secagg/*")
        staleness = self.version - base
        if staleness > self.config.max_staleness:
            self.in_flight.pop(phone, None)
            raise UpdateRejected(409, "stale", f"update is {staleness} versions old (max {self.config.max_staleness}); "
                                               "download the current model and train again")
        assignment = self.in_flight.pop(phone, None)
        return assignment.at if assignment is not None else self.clock()

    def _hold(self, c: Contribution) -> None:
        self.buffer.append(c)

    def forget(self, phone: str, update_id: str) -> None:
        self.buffer = [c for c in self.buffer if (c.phone, c.update_id) != (phone, update_id)]

    def pending(self) -> list[Contribution]:
        return list(self.buffer)

    def ready(self) -> bool:
        if self.secure is not None:
            self.tick()  # a finished group that grew too stale is dropped, not merged
            return self.secure.finished() is not None
        return len(self.buffer) >= self.config.buffer_size

    def merge(self) -> Published:
        if self.secure is not None:
            c, freed, extra = self.secure.merged(self.version, lambda: self.ledger)
            for phone in freed:
                self.in_flight.pop(phone, None)
            extra.update(updates_rejected=self.period.rejected, in_flight=len(self.in_flight))
            published = self._publish([c], len(freed), extra)
            self.assigned_since_merge = 0
            return published
        contributions = self.buffer
        stale = [c.staleness for c in contributions]
        extra = {
            "staleness_mean": sum(stale) / len(stale),
            "staleness_max": max(stale),
            "updates_merged": len(contributions),
            "updates_rejected": self.period.rejected,
            "in_flight": len(self.in_flight),
        }
        published = self._publish(contributions, max(self.assigned_since_merge, len(contributions)), extra)
        self.buffer, self.assigned_since_merge = [], 0  # only once merged: a failed merge loses no update
        return published

    def status(self) -> dict[str, Any]:
        return {**super().status(), "phones": self.store.phone_count(), "in_flight": len(self.in_flight),
                "buffered": len(self.buffer), "concurrency": self.config.concurrency,
                "buffer_size": self.config.buffer_size}
