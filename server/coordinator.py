"""The coordinator: the only mutable state of the server.

``Coordinator`` holds what both modes share (parameters, versions, the strategy's state, traffic
and records, accepting an update and publishing a merge; the merge itself is the strategy's,
server/strategy.py). ``SyncCoordinator``
(server/sync_coordinator.py) runs FedAvg rounds (sample a cohort, wait for its updates or the
deadline, merge). ``AsyncCoordinator`` (server/async_coordinator.py) merges a buffer of K
updates whatever version they started from (FedBuff). Both run on the event loop and never
await inside a state change, so concurrent requests see consistent state.
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedfleet.protocol import TensorSpec, decode_message, dense_float32_nbytes, encode_message
from fedfleet.protocol.state import STATE_PREFIX, split_state, with_state
from fedfleet.protocol.wire import WireTensor, encode_wire, wire_tensors
from fedfleet.server.aggregation import Params, example_weight
from fedfleet.server.config import ServerConfig
from fedfleet.server.kept_state import kept_state_meta
from fedfleet.server.metrics import RoundRecord, percentile
from fedfleet.server.model_state import merge_state
from fedfleet.server.pacing import PaceSteering
from fedfleet.server.privacy import task_release
from fedfleet.server.store import Store
from fedfleet.server.strategies import CentralDP, config_strategy
from fedfleet.server.strategy import MergeContext, Update, check_result
from fedfleet.server.updates import Contribution, Published, UpdateRejected

Clock = Callable[[], float]
DRAFT = "_draft"  # marks a stored round record committed with its version but not yet evaluated and recorded


@dataclass
class _Period:
    """Traffic since the last published version."""

    opened_at: float
    bytes_up: int = 0
    bytes_down: int = 0
    rejected: int = 0


class Coordinator:
    """What both modes share: parameters, versions, the strategy and its state, traffic and records."""

    mode = "base"

    def __init__(self, config: ServerConfig, store: Store, params: Params, version: int, clock: Clock,
                 opt_state: Params | None = None) -> None:
        self.config, self.store, self.clock = config, store, clock
        self.params, self.state = split_state(params)  # state: batch norm statistics (server/model_state.py)
        self.version = version
        self.strategy = config_strategy(config)
        self.opt_state: Params = opt_state or {}  # the strategy's state (e.g. optimizer moments)
        self.specs = {n: TensorSpec(tuple(p.shape), p.dtype.name) for n, p in self.params.items()}
        # An update carries the phone's state beside its delta (FORMAT.md section 11).
        self.update_specs = {**self.specs, **{STATE_PREFIX + n: TensorSpec(tuple(v.shape), v.dtype.name)
                                              for n, v in self.state.items()}}
        self.started_at = clock()
        self._inline_last: tuple[dict[str, Any], bytes] | None = None  # the last task framed with the model
        self.model_blob = self._model_message()
        rounds = store.rounds()
        self.history: list[dict[str, Any]] = [r for r in rounds if not r.get(DRAFT)]  # evaluated, recorded
        self.drafts = [r for r in rounds if r.get(DRAFT)]  # a crash came before they were: the publisher's
        self.merges = int(store.get_meta("merges") or 0)
        self.period = _Period(clock())
        self.rejections: dict[str, int] = {}
        self.release = task_release(config.codec)  # what one update costs in local DP, or None
        self.dense_bytes = dense_float32_nbytes(self.specs)
        self.paused = False  # set by an admin: phones are told to wait
        self.durable: Any = None  # the last accepted update's commit (a future, in a running loop)
        self.pace = PaceSteering(config.checkin_retry_s, config.max_checkin_retry_s, config.checkin_pace,
                                 config.seed, clock)

    def open(self) -> None:
        """The server starts serving: the open period (and a sync round's deadline) counts from
        now, not from when the server was built (store, model, evaluator): no phone could take
        part before. Restored contributions keep their own timings."""
        now = self.clock()
        self.started_at = now
        self.period = _Period(now)

    @functools.cached_property
    def ledger(self) -> Any:
        """The privacy ledger (protocol.privacy.PrivacyLedger), loaded at first use: only local DP
        needs it, and importing dp_accounting would add seconds to every restart."""
        return _load_ledger(self.store, self.config.dp_delta)

    def allowed(self, phone: str) -> bool:
        """False once this phone's local-DP budget cannot pay for another update."""
        budget = self.config.epsilon_budget
        if not budget or self.release is None:
            return True
        return bool(self.ledger.can_participate(phone, budget, self.release))

    def charge(self, phone: str) -> None:
        if self.release is not None:
            self.ledger.charge(phone, self.release)

    @property
    def done(self) -> bool:
        """All configured merges are published (never, with rounds = 0)."""
        return self.config.rounds > 0 and self.merges >= self.config.rounds

    def _model_message(self) -> bytes:
        self._model_wire: list[WireTensor] | None = wire_tensors(self.shipped())
        blob = encode_wire("model", self._model_meta(), self._model_wire)
        if len(blob) > self.config.inline_model_max_bytes:
            self._model_wire = None  # never inlined: keep no second copy of its bytes
        return blob

    def shipped(self) -> Params:
        """The model phones download: the parameters, and the state unless phones keep their own."""
        return self.params if self.config.local_state else with_state(self.params, self.state)

    def _model_meta(self) -> dict[str, Any]:
        return {"version": self.version, "model": self.config.model}

    def model_with_task(self, task: dict[str, Any]) -> bytes | None:
        """The current model as a wire message whose meta also carries ``task`` (a check-in's
        "train" answer), for phones that ask for both in one answer; None when the model is
        over ``inline_model_max_bytes`` or the task is for another version."""
        if self._model_wire is None or task.get("version") != self.version:
            return None
        last = self._inline_last
        if last is not None and last[0] == task:  # a burst of check-ins gets the same task: frame it once
            return last[1]
        blob = encode_wire("model", {**self._model_meta(), "task": task}, self._model_wire)
        self._inline_last = (task, blob)
        return blob

    def train_task(self, deadline_s: float) -> dict[str, Any]:
        # Whole tenths of a second left (rounded down): the phones handed tasks together get
        # the same answer, which the server then frames once (model_with_task).
        return {"action": "train", "round": self.merges + 1, "version": self.version,
                "deadline_s": math.floor(max(0.0, deadline_s) * 10) / 10, "train": self.config.train_plan()}

    def wait(self) -> dict[str, Any]:
        self.pace.base_s = self.config.checkin_retry_s  # an admin may have changed it
        return {"action": "wait", "retry_after_s": self.pace.retry_after(), "version": self.version}

    def paused_wait(self, phone: str) -> dict[str, Any]:
        """The ``wait`` a check-in gets while an admin has paused the task (sync: it books the phone's
        next appointment, server/appointments.py, so a pause does not make the fleet look away)."""
        return self.wait()

    def count_bytes(self, up: int, down: int) -> None:
        self.period.bytes_up += up
        self.period.bytes_down += down

    def count_rejection(self, reason: str = "other") -> None:
        self.period.rejected += 1
        self.rejections[reason] = self.rejections.get(reason, 0) + 1

    def _publish(self, contributions: list[Contribution], selected: int, extra: dict[str, Any]) -> Published:
        """Merge through the strategy (weights: staleness x capped examples), and make the new
        version and the strategy's state durable before anyone can download them."""
        t0 = time.perf_counter()
        updates = []
        for c in contributions:
            examples = example_weight(c.num_examples, self.config.example_cap)
            updates.append(Update(c.delta, c.num_examples, examples, self.staleness_weight(c.staleness) * examples,
                                  c.staleness, c.norm, c.phone))
        result = self.strategy.aggregate(self.params, self.opt_state, updates,
                                         MergeContext(self.version, self.mode, self.config.seed))
        result = check_result(self.strategy, self.params, result)
        self.params, self.opt_state = result.params, dict(result.state)
        extra = {**extra, **result.metrics}
        # Non-trainable state (batch norm statistics) is not the strategy's: the example-weighted mean.
        self.state = merge_state(self.state, [(c.state, c.num_examples) for c in contributions])
        self.version += 1
        self.merges += 1
        self.model_blob = self._model_message()
        opt_blob = encode_message("model", {"strategy": self.strategy.name}, self.opt_state) if self.opt_state else None
        ledger = json.dumps(self.ledger.to_dict()) if self.release is not None else None
        latencies = [c.latency_s for c in contributions]
        losses = [float(c.train_loss) for c in contributions if c.train_loss is not None]
        now = self.clock()
        record = RoundRecord(
            round=self.merges, version=self.version, accuracy=None, loss=None,
            train_loss=float(np.mean(losses)) if losses else None,
            updates=len(contributions), selected=selected, dropped=max(selected - len(contributions), 0),
            rejected=self.period.rejected, bytes_up=self.period.bytes_up, bytes_down=self.period.bytes_down,
            latency_p50_s=percentile(latencies, 50), latency_p95_s=percentile(latencies, 95),
            wall_s=now - self.period.opened_at, aggregate_ms=(time.perf_counter() - t0) * 1e3,
            time_s=now - self.started_at, extra={"mode": self.mode, **self._traffic(contributions, selected), **extra},
        )
        # The record goes into the version's own transaction (a draft: not evaluated yet), so no crash
        # can leave a published version without its record; the publisher replaces it once evaluated.
        self.store.save_version(self.version, self.model_blob, opt_blob,
                                meta={"merges": str(self.merges), **({"ledger": ledger} if ledger else {}),
                                      **kept_state_meta(self.config.local_state, self.state)},
                                merged=[(c.phone, c.update_id) for c in contributions],
                                record={**record.to_json(), DRAFT: True})
        now = self.clock()  # the final record's timings include the commit, as they always did
        record.wall_s, record.time_s = now - self.period.opened_at, now - self.started_at
        record.aggregate_ms = (time.perf_counter() - t0) * 1e3
        self.period = _Period(now)
        return Published(self.version, with_state(self.params, self.state), record)  # evaluated with the state

    # --- what each mode implements ---------------------------------------------------------
    def checkin(self, phone: str) -> dict[str, Any]:
        """Hand out work (``train``), ask the phone to come back (``wait``), or end (``done``)."""
        raise NotImplementedError

    def add_update(self, phone: str, meta: dict[str, Any], delta: Params, wire: bytes | None = None,
                   norm: float | None = None) -> dict[str, Any]:
        """Accept a decoded update or raise ``UpdateRejected``; merging is ``merge``'s job.

        Idempotent on (phone, update_id): a retry of an update that is pending or already
        merged gets the same success and changes nothing. An accepted update is written to
        the store before this returns, so an acknowledged update survives a crash."""
        self.tick()
        update_id = str(meta["update_id"])
        base = int(meta["base_version"])
        # Merging an update based on version v publishes a version above v, and versions only grow:
        # an update based on the current version (every update of an open sync round) cannot have
        # been merged yet, and the store need not be asked.
        merged_into = self.store.merged_version(phone, update_id) if base < self.version else None
        if merged_into is not None:
            return {"accepted": True, "duplicate": True, "version": self.version, "merged_into": merged_into}
        if self.is_pending(phone, update_id):
            self.durable = self.store.commit_of(phone, update_id)  # a retry is acknowledged no sooner
            return {"accepted": True, "duplicate": True, "version": self.version, "pending": True}
        if self.done:
            raise UpdateRejected(409, "finished", "the task has finished; no more updates are merged")
        if base > self.version:
            raise UpdateRejected(400, "future_version", f"version {base} does not exist yet (current {self.version})")
        started = self._admit(phone, update_id, base)
        delta, state = split_state(delta)
        c = Contribution(phone, update_id, delta, int(meta["num_examples"]), meta.get("train_loss"),
                         self.clock() - started, self.version - base, int(meta.get("wire_bytes", 0)), base, norm,
                         state=state)
        # the message as it arrived (already validated) is what a restart decodes again
        self.durable = self.store.add_pending(phone, update_id, c.info(),
                                              wire if wire is not None else encode_message("update", {}, delta))
        self._hold(c)
        self.charge(phone)
        return {"accepted": True, "duplicate": False, "version": self.version, "staleness": c.staleness,
                "round": self.merges + 1, "next_checkin_s": self.config.rest_after_update_s}

    def _admit(self, phone: str, update_id: str, base: int) -> float:
        """Mode-specific checks; return when this phone's task started (for its latency)."""
        raise NotImplementedError

    def _hold(self, c: Contribution) -> None:
        raise NotImplementedError

    def forget(self, phone: str, update_id: str) -> None:
        """Drop an accepted update whose commit failed (it was never acknowledged)."""
        raise NotImplementedError

    def pending(self) -> list[Contribution]:
        """Accepted updates waiting for the next merge."""
        raise NotImplementedError

    def is_pending(self, phone: str, update_id: str) -> bool:
        """Whether this update is accepted and waiting for the next merge (a retry)."""
        return any(c.phone == phone and c.update_id == update_id for c in self.pending())

    def _restore(self) -> list[Contribution]:
        """Acknowledged updates that a crash left unmerged, read back from the store."""
        out = []
        for phone, update_id, info, blob in self.store.pending():
            delta, state = split_state(decode_message(blob).tensors)
            out.append(Contribution(phone, update_id, delta, info["num_examples"], info["train_loss"],
                                    info["latency_s"], info["staleness"], info["wire_bytes"], info["base_version"],
                                    state=state))
        return out

    def ready(self) -> bool:
        raise NotImplementedError

    def merge(self) -> Published:
        raise NotImplementedError

    def tick(self) -> None:
        """Let time-outs take effect (called on requests and by a background ticker)."""

    def openings(self) -> tuple[Any, ...]:
        """Changes whenever work may have become available (held check-ins then look again)."""
        return (self.version, self.paused, self.done)

    def staleness_weight(self, staleness: int) -> float:
        return 1.0

    def _traffic(self, contributions: list[Contribution], selected: int) -> dict[str, Any]:
        """Compression and privacy figures of a merge, for its round record."""
        update_bytes = sum(c.wire_bytes for c in contributions)
        dense = self.dense_bytes * len(contributions)
        out: dict[str, Any] = {
            "update_bytes": update_bytes,
            "dense_bytes": dense,
            "compression_ratio": dense / update_bytes if update_bytes else None,
        }
        if self.release is not None:
            summary = self.ledger.summary()
            out.update(epsilon_max=summary.max_epsilon, epsilon_median=summary.median_epsilon,
                       delta=summary.delta, noise_multiplier=self.release.noise_multiplier)
        if isinstance(self.strategy, CentralDP):
            from fedfleet.protocol.privacy import central_epsilon

            registered = max(self.store.phone_count(), 1)
            q = min(1.0, max(selected, len(contributions)) / registered)
            out.update(central_epsilon=central_epsilon(self.strategy.noise_multiplier, q, self.merges,
                                                       self.config.dp_delta),
                       central_sampling_rate=q, delta=self.config.dp_delta)
        return out

    def record(self, record: RoundRecord) -> None:
        row = record.to_json()
        self.history.append(row)
        self.store.add_round(row)

    def status(self) -> dict[str, Any]:
        return {"mode": self.mode, "version": self.version, "round": self.merges + 1, "done": self.done,
                "rounds_recorded": len(self.history), "rejections": dict(self.rejections)}


def _load_ledger(store: Store, delta: float) -> Any:
    from fedfleet.protocol.privacy import PrivacyLedger  # dp_accounting is slow to import: only when used

    saved = store.get_meta("ledger")
    return PrivacyLedger.from_dict(json.loads(saved)) if saved else PrivacyLedger(delta)


def wall_clock() -> float:
    return time.monotonic()
