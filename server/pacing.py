"""Pace steering: spread check-ins so that a large population does not hammer the server.

Bonawitz et al. 2019 ("Towards Federated Learning at Scale", §2.3): the server tells each
phone when to come back, so that about as many phones check in as there is work for. A phone
that gets no task is told to stay away for ``window`` seconds, jittered (x0.5..1.5) so that
phones turned away together do not return together.

``window`` adapts once per window of time to what check-ins found. If a share ``w`` of the
check-ins in the last window were turned away, the check-in rate was ``1 / (1 - w)`` times
the rate of tasks handed out; the target is ``pace`` times, so the window is scaled by
``1 / ((1 - w) * pace)`` (at most x4 either way per step). A window never drops below the
configured ``checkin_retry_s``, so a small fleet sees exactly that fixed value.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


class PaceSteering:
    def __init__(self, base_s: float, max_s: float, pace: float, seed: int, clock: Callable[[], float],
                 min_observations: int = 16) -> None:
        if pace < 0:
            raise ValueError("checkin_pace must be >= 0 (0 turns pace steering off)")
        self.base_s, self.max_s, self.pace = base_s, max(max_s, base_s), pace
        self.clock, self.min_observations = clock, min_observations
        self.window_s = base_s
        self._rng = np.random.default_rng([seed, 0x7ACE])
        self._since = clock()
        self._waits = self._tasks = 0
        self.turned_away = self.handed_out = 0  # totals, for status

    @property
    def enabled(self) -> bool:
        return self.pace > 1.0

    def observe(self, got_task: bool) -> None:
        """Count one check-in's outcome; once a window has passed, rescale the window."""
        if got_task:
            self._tasks += 1
            self.handed_out += 1
        else:
            self._waits += 1
            self.turned_away += 1
        if not self.enabled:
            return
        now, seen = self.clock(), self._waits + self._tasks
        elapsed = now - self._since
        if elapsed < self.window_s or (seen < self.min_observations and elapsed < 2 * self.window_s):
            return
        share_turned_away = self._waits / seen
        factor = 1.0 / max((1.0 - share_turned_away) * self.pace, 0.25)
        self.window_s = min(max(self.window_s * min(max(factor, 0.25), 4.0), self.base_s), self.max_s)
        self._since, self._waits, self._tasks = now, 0, 0

    def retry_after(self) -> float:
        """How long a phone turned away now should stay away."""
        if not self.enabled or self.window_s <= self.base_s:
            return self.base_s
        return float(min(max(self.window_s * self._rng.uniform(0.5, 1.5), self.base_s), self.max_s))
