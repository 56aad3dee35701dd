"""Synchronous FedAvg rounds: sample a cohort, wait for its updates or the deadline, merge.

The coordinator is the only mutable state of the server. It runs on the event loop and
never awaits inside a state change, so concurrent requests see consistent rounds.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from protocol import TensorSpec, encode_message
from server.aggregation import Params, apply_delta, example_weight, weighted_mean
from server.config import ServerConfig
from server.metrics import RoundRecord, percentile
from server.store import Store

Clock = Callable[[], float]


class UpdateRejected(Exception):
    """An upload the coordinator refuses; ``status`` is the HTTP code, ``reason`` a short tag."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message


@dataclass
class _Update:
    update_id: str
    delta: Params
    num_examples: int
    train_loss: float | None
    latency_s: float


@dataclass
class _Round:
    number: int
    opened_at: float
    target: int
    cohort: dict[str, float] = field(default_factory=dict)  # phone -> time the task was handed out
    updates: dict[str, _Update] = field(default_factory=dict)
    bytes_up: int = 0
    bytes_down: int = 0
    rejected: int = 0


@dataclass(frozen=True)
class Published:
    """A version that was just merged, for evaluation and the round record."""

    version: int
    params: Params
    record: RoundRecord


class SyncCoordinator:
    def __init__(self, config: ServerConfig, store: Store, params: Params, version: int, clock: Clock) -> None:
        self.config = config
        self.store = store
        self.clock = clock
        self.params = params
        self.version = version
        self.specs = {n: TensorSpec(tuple(p.shape), p.dtype.name) for n, p in params.items()}
        self.started_at = clock()
        self.model_blob = self._model_message()
        self.history: list[dict[str, Any]] = store.rounds()
        first_round = int(store.get_meta("next_round") or 1)
        self.round = _Round(first_round, clock(), self._target())

    # --- queries ------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        """All configured rounds are merged (never, with rounds = 0)."""
        return self.config.rounds > 0 and self.round.number > self.config.rounds

    def task(self) -> dict[str, Any]:
        return {
            "round": self.round.number,
            "version": self.version,
            "deadline_s": max(0.0, self.round.opened_at + self.config.round_timeout_s - self.clock()),
            "train": self.config.train_plan(),
        }

    def _target(self) -> int:
        registered = max(self.store.phone_count(), 1)
        return max(self.config.min_cohort, math.ceil(self.config.sample_fraction * registered))

    def _model_message(self) -> bytes:
        return encode_message("model", {"version": self.version, "model": self.config.model}, self.params)

    # --- phone actions ------------------------------------------------------------------
    def checkin(self, phone: str) -> dict[str, Any]:
        self.tick()
        if self.done:
            return {"action": "done", "version": self.version}
        rnd = self.round
        if not rnd.cohort:  # the first check-in of a round fixes its target size
            rnd.target = self._target()
        retry = {"action": "wait", "retry_after_s": self.config.checkin_retry_s, "version": self.version}
        if phone in rnd.updates:
            return retry
        if phone not in rnd.cohort:
            if len(rnd.cohort) >= math.ceil(rnd.target * self.config.over_selection):
                return retry
            rnd.cohort[phone] = self.clock()
        return {"action": "train", **self.task()}

    def add_update(self, phone: str, meta: dict[str, Any], delta: Params) -> dict[str, Any]:
        """Validate the update's metadata against the round and merge when the round is full."""
        self.tick()
        rnd = self.round
        if self.done:
            raise self._reject(409, "finished", "the task has finished; no more updates are merged")
        update_id = str(meta["update_id"])
        if phone in rnd.updates:
            if rnd.updates[phone].update_id == update_id:
                return {"accepted": True, "duplicate": True, "round": rnd.number, "version": self.version}
            raise self._reject(409, "duplicate", "this phone already uploaded a different update this round")
        if meta["base_version"] != self.version:
            raise self._reject(
                409, "stale", f"update is based on version {meta['base_version']}, current is {self.version}"
            )
        if phone not in rnd.cohort:
            raise self._reject(409, "not_selected", "this phone has no task in the current round; check in first")
        n = int(meta["num_examples"])
        now = self.clock()
        rnd.updates[phone] = _Update(update_id, delta, n, meta.get("train_loss"), now - rnd.cohort[phone])
        answer = {"accepted": True, "duplicate": False, "round": rnd.number, "version": self.version}
        return answer

    def ready(self) -> bool:
        """Whether the open round should be merged now (target reached or deadline passed)."""
        rnd = self.round
        if len(rnd.updates) >= rnd.target:
            return True
        expired = self.clock() - rnd.opened_at >= self.config.round_timeout_s
        return expired and len(rnd.updates) >= self.config.min_updates

    def tick(self) -> None:
        """Restart a round whose deadline passed with too few updates to merge."""
        rnd = self.round
        if self.clock() - rnd.opened_at >= self.config.round_timeout_s and len(rnd.updates) < self.config.min_updates:
            self.round = _Round(rnd.number, self.clock(), self._target(), bytes_up=rnd.bytes_up,
                                bytes_down=rnd.bytes_down, rejected=rnd.rejected)

    def count_bytes(self, up: int, down: int) -> None:
        self.round.bytes_up += up
        self.round.bytes_down += down

    def count_rejection(self) -> None:
        self.round.rejected += 1

    def _reject(self, status: int, reason: str, message: str) -> UpdateRejected:
        return UpdateRejected(status, reason, message)

    # --- merging ------------------------------------------------------------------------
    def merge(self) -> Published:
        """FedAvg over the round's updates; publish the next version durably; open the next round."""
        t0 = time.perf_counter()
        rnd = self.round
        ups = list(rnd.updates.values())
        mean = weighted_mean([(u.delta, example_weight(u.num_examples, self.config.example_cap)) for u in ups])
        self.params = apply_delta(self.params, mean, self.config.server_lr)
        self.version += 1
        self.model_blob = self._model_message()
        self.store.save_version(self.version, self.model_blob)
        self.store.set_meta("next_round", str(rnd.number + 1))
        latencies = [u.latency_s for u in ups]
        losses = [float(u.train_loss) for u in ups if u.train_loss is not None]
        record = RoundRecord(
            round=rnd.number,
            version=self.version,
            accuracy=None,
            loss=None,
            train_loss=float(np.mean(losses)) if losses else None,
            updates=len(ups),
            selected=len(rnd.cohort),
            dropped=len(rnd.cohort) - len(ups),
            rejected=rnd.rejected,
            bytes_up=rnd.bytes_up,
            bytes_down=rnd.bytes_down,
            latency_p50_s=percentile(latencies, 50),
            latency_p95_s=percentile(latencies, 95),
            wall_s=self.clock() - rnd.opened_at,
            aggregate_ms=(time.perf_counter() - t0) * 1e3,
            time_s=self.clock() - self.started_at,
        )
        self.round = _Round(rnd.number + 1, self.clock(), self._target())
        return Published(self.version, self.params, record)

    def record(self, record: RoundRecord) -> None:
        row = record.to_json()
        self.history.append(row)
        self.store.add_round(row)


def wall_clock() -> float:
    return time.monotonic()
