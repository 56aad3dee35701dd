"""Secure groups for asynchronous merging (FedBuff): each group of K phones is one buffer.

A phone that checks in is handed the task of the group that is filling; the group stops taking
phones once it has K (``buffer_size``), once a merge moves the model on, or once its roster
closes. So every member trains from the same version, the group's base version, and the group's
unmasked sum merges as one buffer with the staleness weight of that base (Nguyen et al. 2022,
"Federated Learning with Buffered Asynchronous Aggregation"). Groups run side by side: one fills
while others go through SecAgg+'s steps (server/secagg.py, one ``SecureGroup`` each). A group is
numbered; its number is the ``round`` of its task and of its messages (FORMAT.md 12.5), never
reused, even across a restart (the next number is kept in the store).

A group that aborts merges nothing and frees its phones; a finished group that has grown staler
than ``max_staleness`` while it ran is discarded as a stale update would be. Every assignment and
acknowledged message is written to the store first (server/secagg_journal.py): after a restart
the groups are rebuilt as they were and carry on.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedfleet.protocol.secagg import WrongStep
from fedfleet.server.secagg import SecAggSettings, SecureGroup
from fedfleet.server.secagg_journal import Journal, merged_groups, replay
from fedfleet.server.secagg_rounds import group_contribution
from fedfleet.server.store import Store
from fedfleet.server.updates import Contribution

NEXT_GROUP = "secagg_next_group"  # store meta: the number the next async group takes
KEEP_GONE = 64  # aborted groups remembered, so their phones' polls answer "aborted"


@dataclass
class _Slot:
    number: int
    base_version: int
    opened_at: float
    members: dict[str, float] = field(default_factory=dict)  # phone -> when its task was handed out
    group: SecureGroup | None = None  # made at the group's first secure message
    taking: bool = True  # still hands out its task


class AsyncSecureGroups:
    """The async coordinator's secure groups, by number."""

    def __init__(self, settings: SecAggSettings, shapes: Mapping[str, tuple[int, ...]], clock: Callable[[], float],
                 size: int, task_timeout_s: float, store: Store) -> None:
        self.settings, self.shapes, self.clock = settings, dict(shapes), clock
        self.dim = sum(int(np.prod(s)) for s in self.shapes.values())
        self.size, self.task_timeout_s, self.store = size, task_timeout_s, store
        self.slots: dict[int, _Slot] = {}
        self.filling: _Slot | None = None
        self.gone: dict[int, SecureGroup] = {}
        self.aborted = 0  # groups aborted since the last merge
        self.stale = 0  # finished groups discarded as too stale since the last merge
        self.journal = Journal(store.db)
        self.merged_since_tick: list[int] = []  # their log rows go once the merge has committed
        self.replaying = True
        self._restore()
        self.replaying = False

    def _restore(self) -> None:
        """Rebuild the groups a restart interrupted, by replaying their logs (none: a new server)."""
        merged = merged_groups(self.store.rounds())
        for number, entries in sorted(self.journal.groups().items()):
            if number in merged or entries[0][0] != "open":  # merged before its rows went, or a sync round's
                self.journal.end(number)
                continue
            for kind, phone, body in entries:
                if kind == "open":
                    self.slots[number] = self.filling = _Slot(number, int(body), self.clock())
                elif kind == "assign":
                    self.slots[number].members[phone] = self.clock()
                elif kind == "seal":
                    self._stop_taking(self.slots[number])
                else:
                    group = self.lookup(number)
                    assert group is not None, f"a log entry for group {number} before it opened"
                    replay(group, kind, phone, body)
        for slot in self.slots.values():
            if slot.group is not None:
                slot.group.journal = self._writer(slot.number)

    def _writer(self, number: int) -> Callable[[str, str, bytes], None]:
        return lambda kind, phone, body: self.journal.write(number, kind, phone, body)

    def members(self) -> list[tuple[str, int]]:
        """Every phone handed a live group's task, with the group's base version."""
        return [(phone, s.base_version) for s in self.slots.values() for phone in s.members]

    # --- check-in -------------------------------------------------------------------------
    def assign(self, phone: str, version: int) -> tuple[int, int] | None:
        """The number and base version of the group ``phone`` trains for, or None when its group
        is under way (it waits). A member that checks in again before advertising gets its group
        back, with its base version even if the model has moved on since."""
        for slot in self.slots.values():
            if phone in slot.members:
                g = slot.group
                fresh = g is None or (g.step == "advertise" and phone not in g.keys)
                return (slot.number, slot.base_version) if fresh else None
        f = self.filling
        if f is None or f.base_version != version:
            f = self._open(version)
        self.journal.write_now(f.number, "assign", phone, b"")  # durable before the task goes out
        f.members[phone] = self.clock()
        if len(f.members) >= self.size:
            self._stop_taking(f)
        return f.number, f.base_version

    def _open(self, version: int) -> _Slot:
        if self.filling is not None:
            self._stop_taking(self.filling)  # the model moved on: its members share the old base
        number = int(self.store.get_meta(NEXT_GROUP) or 1)
        self.store.set_meta(NEXT_GROUP, str(number + 1))
        self.journal.write(number, "open", "", str(version).encode())
        slot = self.filling = self.slots[number] = _Slot(number, version, self.clock())
        return slot

    def _stop_taking(self, slot: _Slot) -> None:
        if slot.taking and not self.replaying:
            self.journal.write(slot.number, "seal", "", b"")
        slot.taking = False
        if self.filling is slot:
            self.filling = None
        if slot.group is not None:
            slot.group.seal(len(slot.members))

    # --- the routes' view -------------------------------------------------------------------
    def lookup(self, number: int) -> SecureGroup | None:
        """Group ``number``: live, or aborted not long ago; None if it is unknown or merged."""
        slot = self.slots.get(number)
        if slot is None:
            return self.gone.get(number)
        if slot.group is None:
            target = self.size if slot.taking else len(slot.members)
            slot.group = SecureGroup(number, target, self.dim, self.settings, self.clock)
            if not self.replaying:
                slot.group.journal = self._writer(number)
        return slot.group

    def assigned(self, phone: str, number: int) -> bool:
        slot = self.slots.get(number)
        return slot is not None and phone in slot.members

    def abort_notice(self, phone: str, group: SecureGroup) -> str | None:
        if group.step == "aborted" and phone in group.keys:
            return f"{group.name} aborted ({group.abort_reason}); check in again"
        return None

    # --- time and merging -------------------------------------------------------------------
    def tick(self, version: int, max_staleness: int) -> list[str]:
        """Step deadlines; drop aborted, expired and too stale groups. Returns the phones freed."""
        freed: list[str] = []
        now = self.clock()
        for number in self.merged_since_tick:  # their versions are committed
            self.journal.end(number)
        self.merged_since_tick = []
        for number, slot in list(self.slots.items()):
            g = slot.group
            if g is not None and g.step not in ("done", "aborted"):
                g.training_until = max(slot.members.values(), default=slot.opened_at) + self.task_timeout_s
                g.tick()
            if g is not None and g.step != "advertise" and slot.taking:
                self._stop_taking(slot)  # the roster closed: later phones could not join it
            if g is None and now - slot.opened_at >= self.task_timeout_s:
                g = SecureGroup(number, 0, self.dim, self.settings, self.clock)
                g.abort_reason, g.step = "no member came back within the task timeout", "aborted"
            if g is not None and g.step == "done" and version - slot.base_version > max_staleness:
                g.abort_reason, g.step, g.total = f"{version - slot.base_version} versions stale", "aborted", None
                self.stale += 1
            if g is not None and g.step == "aborted":
                self.aborted += 1
                freed += self._drop(number)
                self.journal.end(number)
                self.gone[number] = g
                while len(self.gone) > KEEP_GONE:
                    del self.gone[min(self.gone)]
        return freed

    def _drop(self, number: int) -> list[str]:
        slot = self.slots.pop(number)
        if self.filling is slot:
            self.filling = None
        return list(slot.members)

    def finished(self) -> _Slot | None:
        done = [s for s in self.slots.values() if s.group is not None and s.group.step == "done"]
        return min(done, key=lambda s: s.number) if done else None

    def merged(self, version: int, ledger: Callable[[], Any]) -> tuple[Contribution, list[str], dict[str, Any]]:
        """The oldest finished group as one buffer: its contribution (staleness of its base
        version), the phones it frees, and its round-record fields."""
        slot = self.finished()
        assert slot is not None and slot.group is not None, "merge only a finished group"
        c, extra = group_contribution(slot.group, self.shapes, self.clock, self.aborted, ledger, self.store)
        c.base_version, c.staleness = slot.base_version, version - slot.base_version
        extra.update(secagg_group=slot.number, secagg_stale=self.stale, staleness_mean=c.staleness,
                     staleness_max=c.staleness, updates_merged=c.num_examples)
        self.aborted = self.stale = 0
        self.merged_since_tick.append(slot.number)
        return c, self._drop(slot.number), extra

    def live(self) -> int:
        return len(self.slots)


def wrong_group(number: int) -> WrongStep:
    return WrongStep(f"no secure group {number} is open (merged, aborted, or lost in a restart); check in again")
