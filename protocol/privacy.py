"""Privacy accounting: a per-phone ledger of local DP releases, and central DP-FedAvg.

All composition and conversion to (epsilon, delta) is done by ``dp_accounting``'s RDP
accountant (Mironov, 2017, "Renyi Differential Privacy"); nothing here re-derives it.

Local DP (each update noised on the phone): one release of the Gaussian mechanism with
L2 sensitivity C and sigma = z*C is ``GaussianDpEvent(z)``; Laplace with L1 sensitivity C
and scale b = z*C is ``LaplaceDpEvent(z)``. Sensitivity C is the add/remove-one relation
(an update vs. no update). Under replace-one (any update vs. any other) the sensitivity is
2C, so the same noise is worth a multiplier of z/2: ``PrivacyLedger(neighboring="replace")``.

Central DP (noise added on the server to the sum of clipped updates, DP-FedAvg, McMahan et
al., 2018): each round is a Poisson-sampled Gaussian with rate q = cohort / population;
``central_epsilon`` composes ``steps`` of them.

Pure: no clock, no I/O. ``to_dict``/``from_dict`` give the server something to persist.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

import dp_accounting
from dp_accounting.rdp import RdpAccountant

Mechanism = Literal["gaussian", "laplace"]
Neighboring = Literal["add_remove", "replace"]


@dataclass(frozen=True, order=True)
class Release:
    """One noised update: the mechanism and its noise multiplier z (noise = z * C)."""

    mechanism: Mechanism
    noise_multiplier: float

    def __post_init__(self) -> None:
        if self.mechanism not in ("gaussian", "laplace"):
            raise ValueError(f"mechanism must be 'gaussian' or 'laplace', got {self.mechanism!r}")
        if not self.noise_multiplier > 0:
            raise ValueError(f"noise_multiplier must be positive, got {self.noise_multiplier!r}")


def release_event(release: Release, neighboring: Neighboring = "add_remove") -> dp_accounting.DpEvent:
    z = release.noise_multiplier / (2.0 if neighboring == "replace" else 1.0)
    if release.mechanism == "gaussian":
        return dp_accounting.GaussianDpEvent(z)
    return dp_accounting.LaplaceDpEvent(z)


def _check_delta(delta: float) -> None:
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")


@lru_cache(maxsize=4096)
def _epsilon(history: tuple[tuple[Release, int], ...], delta: float, neighboring: Neighboring) -> float:
    # phones with the same history (the common case) share one accountant run
    accountant = RdpAccountant()
    for release, count in history:
        accountant.compose(release_event(release, neighboring), count)
    return float(accountant.get_epsilon(delta))


def local_epsilon(
    releases: Mapping[Release, int], delta: float, neighboring: Neighboring = "add_remove"
) -> float:
    """epsilon at ``delta`` after composing ``count`` of each release (0.0 for none)."""
    _check_delta(delta)
    history = tuple(sorted((r, int(c)) for r, c in releases.items() if c > 0))
    return _epsilon(history, float(delta), neighboring) if history else 0.0


def calibrate_noise_multiplier(
    mechanism: Mechanism, epsilon: float, delta: float, *, releases: int = 1
) -> float:
    """Smallest z (to 1e-6) with which ``releases`` releases are (epsilon, delta)-DP under the
    RDP accountant, found by ``dp_accounting.calibrate_dp_mechanism``. For Laplace this
    is a little above 1/epsilon: RDP conversion is looser than the pure-DP bound."""
    _check_delta(delta)
    if not epsilon > 0 or releases < 1:
        raise ValueError("epsilon must be positive and releases >= 1")
    lower = 1e-3 / epsilon  # Laplace's RDP is undefined at z = 0; either mechanism is far over budget here
    return float(
        dp_accounting.calibrate_dp_mechanism(
            RdpAccountant,
            lambda z: dp_accounting.SelfComposedDpEvent(release_event(Release(mechanism, z)), releases),
            epsilon,
            delta,
            bracket_interval=dp_accounting.LowerEndpointAndGuess(lower, 2 * lower),
        )
    )


def central_epsilon(noise_multiplier: float, sampling_rate: float, steps: int, delta: float) -> float:
    """epsilon of DP-FedAvg: ``steps`` rounds of a Poisson-sampled (rate q) Gaussian
    with noise multiplier z on the sum of clipped updates (user-level DP)."""
    _check_delta(delta)
    if not noise_multiplier > 0 or not 0 < sampling_rate <= 1 or steps < 0:
        raise ValueError("need noise_multiplier > 0, sampling_rate in (0, 1], steps >= 0")
    if steps == 0:
        return 0.0  # dp_accounting refuses a count of 0
    event = dp_accounting.PoissonSampledDpEvent(
        sampling_rate, dp_accounting.GaussianDpEvent(noise_multiplier)
    )
    return float(RdpAccountant().compose(event, steps).get_epsilon(delta))


@dataclass(frozen=True)
class LedgerSummary:
    phones: int
    max_epsilon: float
    median_epsilon: float
    delta: float


class PrivacyLedger:
    """Per-phone counts of local DP releases; epsilon per phone at a fixed ``delta``."""

    def __init__(self, delta: float = 1e-5, *, neighboring: Neighboring = "add_remove") -> None:
        _check_delta(delta)
        if neighboring not in ("add_remove", "replace"):
            raise ValueError(f"neighboring must be 'add_remove' or 'replace', got {neighboring!r}")
        self.delta = delta
        self.neighboring: Neighboring = neighboring
        self._counts: dict[str, Counter[Release]] = {}

    def charge(self, phone: str, release: Release, count: int = 1) -> None:
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        self._counts.setdefault(phone, Counter())[release] += count

    def releases(self, phone: str) -> dict[Release, int]:
        return dict(self._counts.get(phone, {}))

    def epsilon(self, phone: str, extra: Release | None = None) -> float:
        """epsilon spent by ``phone`` (0.0 if never charged), optionally as if ``extra``
        had been charged once more."""
        counts = Counter(self._counts.get(phone, {}))
        if extra is not None:
            counts[extra] += 1
        return local_epsilon(counts, self.delta, self.neighboring)

    def epsilons(self) -> dict[str, float]:
        return {phone: self.epsilon(phone) for phone in self._counts}

    def summary(self) -> LedgerSummary:
        eps = list(self.epsilons().values())
        if not eps:
            return LedgerSummary(0, 0.0, 0.0, self.delta)
        return LedgerSummary(len(eps), max(eps), float(statistics.median(eps)), self.delta)

    def can_participate(self, phone: str, budget: float, next_release: Release | None = None) -> bool:
        """False once the phone's budget is spent: with ``next_release``, whether that
        release would still fit (epsilon after it <= budget); without, whether any is
        left (epsilon so far < budget)."""
        if next_release is None:
            return self.epsilon(phone) < budget
        return self.epsilon(phone, next_release) <= budget

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: {"delta", "neighboring", "phones": {phone: [[mechanism, z, count], ...]}}."""
        phones = {
            phone: [[r.mechanism, r.noise_multiplier, n] for r, n in sorted(c.items())]
            for phone, c in self._counts.items()
        }
        return {"delta": self.delta, "neighboring": self.neighboring, "phones": phones}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PrivacyLedger:
        ledger = cls(data["delta"], neighboring=data["neighboring"])
        for phone, rows in data["phones"].items():
            for mechanism, z, count in rows:
                ledger.charge(phone, Release(mechanism, float(z)), int(count))
        return ledger
