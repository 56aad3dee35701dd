"""When each phone is due back, and which phones count as away.

Every answer the server gives a phone names a time it should act again: a task's deadline (it
uploads by then), a ``wait``'s ``retry_after_s``, an upload's ``next_checkin_s``. That time is the
phone's appointment. A phone that has missed its appointment by more than ``grace`` seconds (the
round timeout unless configured: ``cohort_grace_s``) is away: asleep, offline, uninstalled. A sync
round sizes its cohort (``sample_fraction`` of the phones) from the phones that are not away, so a
fleet whose phones are half asleep does not set targets only the absent could meet and wait out
every round's timeout for them. (Within a round, the round's own deadline already bounds the wait
for a phone handed a task: its task's deadline is the round's.) A phone that was never answered since the server started
has no appointment and counts as present; a phone that checks in again is present at once.
"""

from __future__ import annotations

import math


class Appointments:
    """Phone -> the (server clock) time it is due back."""

    def __init__(self, grace_s: float) -> None:
        if not grace_s >= 0:  # inf: no phone is ever away
            raise ValueError("cohort_grace_s must be >= 0 (inf: never count a phone as away)")
        self.grace_s = grace_s
        self.due: dict[str, float] = {}

    def book(self, phone: str, due: float) -> None:
        self.due[phone] = due

    def arrived(self, phone: str) -> None:
        self.due.pop(phone, None)

    def away_count(self, now: float) -> int:
        """Phones past their appointment by more than the grace (one pass: once per round)."""
        if math.isinf(self.grace_s):
            return 0
        limit = now - self.grace_s
        return sum(1 for due in self.due.values() if due < limit)


def grace_of(cohort_grace_s: float | None, round_timeout_s: float) -> float:
    """The grace in seconds: the round timeout when ``cohort_grace_s`` is None."""
    return round_timeout_s if cohort_grace_s is None else cohort_grace_s
