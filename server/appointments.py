"""When each phone is due back, and which phones count as away.

Every answer the server gives a phone names a time it should act again: a task's deadline (it
uploads by then), a ``wait``'s ``retry_after_s``, an upload's ``next_checkin_s``. That time is the
phone's appointment. A phone that has missed its appointment by more than ``grace`` seconds (the
round timeout unless configured: ``cohort_grace_s``) is away: asleep, offline, uninstalled; so is a
registered phone not heard from at all for longer than the grace since the server started. A sync
round sizes its cohort (``sample_fraction`` of the phones) on the phones that are not away, so a
fleet whose phones are half asleep does not set targets only the absent could meet and wait out
every round's timeout for them. (Within a round, the round's own deadline already bounds the wait
for a phone handed a task: its task's deadline is the round's.) A phone that checks in is present.
"""

from __future__ import annotations

import math


class Appointments:
    """Phone -> the (server clock) time it is due back."""

    def __init__(self, grace_s: float) -> None:
        if not grace_s >= 0:  # inf: no phone is ever away
            raise ValueError("cohort_grace_s must be >= 0 (inf: never count a phone as away)")
        self.grace_s = grace_s
        self.started = 0.0  # when the server started serving: phones unheard of since are away after the grace
        self.due: dict[str, float] = {}

    def book(self, phone: str, due: float) -> None:
        self.due[phone] = due

    def arrived(self, phone: str, now: float) -> None:
        self.due[phone] = now  # present: its answer books the next appointment

    def away_count(self, now: float, registered: int) -> int:
        """Of ``registered`` phones, those past their appointment by more than the grace, and those
        never heard from once the grace since the start has passed (one pass: once per round)."""
        if math.isinf(self.grace_s):
            return 0
        limit = now - self.grace_s
        unheard = max(registered - len(self.due), 0) if self.started < limit else 0
        return unheard + sum(1 for due in self.due.values() if due < limit)


def grace_of(cohort_grace_s: float | None, round_timeout_s: float) -> float:
    """The grace in seconds: the round timeout when ``cohort_grace_s`` is None."""
    return round_timeout_s if cohort_grace_s is None else cohort_grace_s
