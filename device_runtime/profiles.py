"""Device profiles: how fast an emulated phone computes and talks, and when it is around.

Defaults follow the distributions FedScale and Papaya report: compute time per training
sample lognormal around 5 ms with a >10x spread between the fastest and slowest decile;
uplinks of a few to tens of Mbit/s (median about 10) over 4G, 5G and Wi-Fi; availability
as a nightly idle-and-charging window. Users plug in measured traces as a CSV
(see ``load_profiles``).
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

# network: probability, median uplink / downlink Mbit/s, median RTT ms
NETWORKS = {"4g": (0.5, 8.0, 30.0, 60.0), "5g": (0.2, 40.0, 150.0, 30.0), "wifi": (0.3, 20.0, 80.0, 20.0)}


@dataclass(frozen=True)
class DeviceProfile:
    ms_per_sample: float = 5.0  # local training time per example per epoch
    up_mbps: float = 10.0
    down_mbps: float = 40.0
    rtt_ms: float = 50.0
    window_start_h: float = 0.0  # available from this hour of the (virtual) day...
    window_hours: float = 24.0  # ...for this many hours (24 = always)
    dropout: float = 0.0  # probability of vanishing in the middle of a task

    def __post_init__(self) -> None:
        for f in ("ms_per_sample", "up_mbps", "down_mbps", "rtt_ms"):
            v = getattr(self, f)
            if not (math.isfinite(v) and v > 0) and not (f == "ms_per_sample" and v == 0):
                raise ValueError(f"{f} must be a positive number, got {v}")
        if not 0 <= self.window_start_h < 24 or not 0 < self.window_hours <= 24:
            raise ValueError("window_start_h must be in [0, 24) and window_hours in (0, 24]")
        if not 0 <= self.dropout < 1:
            raise ValueError("dropout must be in [0, 1)")

    def transfer_s(self, nbytes: int, uplink: bool, round_trip: bool = True) -> float:
        """Seconds to move ``nbytes`` over this phone's link, plus one round trip unless the
        bytes ride on a request already under way (``round_trip`` False)."""
        mbps = self.up_mbps if uplink else self.down_mbps
        return (self.rtt_ms / 1e3 if round_trip else 0.0) + nbytes * 8 / (mbps * 1e6)

    def train_s(self, samples: int) -> float:
        return self.ms_per_sample * samples / 1e3

    def wait_until_available(self, t: float) -> float:
        """Seconds from virtual time ``t`` until the phone is next available (0 if it is now)."""
        if self.window_hours >= 24:
            return 0.0
        hour = (t / 3600.0) % 24
        since_start = (hour - self.window_start_h) % 24
        return 0.0 if since_start < self.window_hours else (24 - since_start) * 3600.0


@dataclass(frozen=True)
class ProfileSpec:
    """How to draw a fleet's profiles when no trace file is given."""

    compute_ms: float = 5.0  # mean ms per sample
    compute_sigma: float = 0.9  # lognormal sigma: 0.9 gives ~10x between the 10th and 90th percentile
    net_sigma: float = 0.5
    diurnal: float = 0.0  # fraction of phones available only in a nightly window (others always)
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.compute_ms) and self.compute_ms > 0):
            raise ValueError(f"compute_ms must be a positive number of ms per sample, got {self.compute_ms}")
        if not (self.compute_sigma >= 0 and self.net_sigma >= 0):
            raise ValueError("compute_sigma and net_sigma must be >= 0")
        if not 0 <= self.diurnal <= 1:
            raise ValueError(f"diurnal must be a fraction of phones in [0, 1], got {self.diurnal}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be a probability in [0, 1), got {self.dropout}")


def sample_profiles(n: int, rng: np.random.Generator, spec: ProfileSpec = ProfileSpec()) -> list[DeviceProfile]:
    cols = sample_profile_columns(n, rng, spec)
    return [cols.profile(i) for i in range(n)]


def sample_profile_columns(n: int, rng: np.random.Generator, spec: ProfileSpec = ProfileSpec()) -> ProfileColumns:
    """``n`` profiles drawn from ``spec`` as columns (a fleet of a million phones holds no profile objects)."""
    mu = math.log(spec.compute_ms) - spec.compute_sigma**2 / 2  # so that the mean is compute_ms
    compute = rng.lognormal(mu, spec.compute_sigma, size=n)
    names = list(NETWORKS)
    kinds = rng.choice(len(names), size=n, p=[NETWORKS[k][0] for k in names])
    noise = rng.lognormal(0.0, spec.net_sigma, size=(n, 3))
    nightly = rng.random(n) < spec.diurnal
    starts = (rng.normal(22.0, 1.5, size=n)) % 24
    hours = np.clip(rng.normal(7.0, 1.5, size=n), 2.0, 12.0)
    link = np.array([NETWORKS[k][1:] for k in names], dtype=np.float64)[kinds]  # [n, (up, down, rtt)]
    return ProfileColumns(
        ms_per_sample=compute, up_mbps=link[:, 0] * noise[:, 0], down_mbps=link[:, 1] * noise[:, 1],
        rtt_ms=link[:, 2] * noise[:, 2], window_start_h=np.where(nightly, starts, 0.0),
        window_hours=np.where(nightly, hours, 24.0), dropout=spec.dropout)


@dataclass(frozen=True, eq=False)
class ProfileColumns:
    """Device profiles as columns (``sample_profile_columns`` draws them); row ``i`` is phone ``i``'s."""

    ms_per_sample: np.ndarray
    up_mbps: np.ndarray
    down_mbps: np.ndarray
    rtt_ms: np.ndarray
    window_start_h: np.ndarray
    window_hours: np.ndarray
    dropout: float

    def __len__(self) -> int:
        return len(self.ms_per_sample)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ProfileColumns):
            return NotImplemented
        return self.dropout == other.dropout and all(
            np.array_equal(getattr(self, f.name), getattr(other, f.name)) for f in fields(self) if f.name != "dropout")

    __hash__ = None  # type: ignore[assignment]  # columns of arrays: compared by value, not hashed

    def profile(self, i: int) -> DeviceProfile:
        return DeviceProfile(
            ms_per_sample=float(self.ms_per_sample[i]), up_mbps=float(self.up_mbps[i]),
            down_mbps=float(self.down_mbps[i]), rtt_ms=float(self.rtt_ms[i]),
            window_start_h=float(self.window_start_h[i]), window_hours=float(self.window_hours[i]),
            dropout=self.dropout)



REQUIRED = ("ms_per_sample", "up_mbps", "down_mbps", "rtt_ms")


def load_profiles(path: str | Path) -> list[DeviceProfile]:
    """Read a CSV trace: one row per device, columns ``ms_per_sample, up_mbps, down_mbps,
    rtt_ms`` and optionally ``window_start_h, window_hours, dropout``. Errors name the file,
    the row and the field."""
    path = Path(path)
    known = {f.name for f in fields(DeviceProfile)}
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [c for c in REQUIRED if c not in header]
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(missing)}; need {', '.join(REQUIRED)}")
        unknown = [c for c in header if c not in known]  # a misspelt optional column would be ignored
        if unknown:
            raise ValueError(f"{path}: unknown column(s) {', '.join(unknown)}; the columns are "
                             f"{', '.join(f.name for f in fields(DeviceProfile))}")
        profiles = []
        for row_no, row in enumerate(reader, start=2):
            values: dict[str, float] = {}
            for key, raw in row.items():
                if key not in known or raw in (None, ""):
                    continue
                try:
                    values[key] = float(raw)
                except ValueError:
                    raise ValueError(f"{path}: row {row_no}, field {key}: {raw!r} is not a number") from None
            try:
                profiles.append(DeviceProfile(**values))
            except ValueError as exc:
                raise ValueError(f"{path}: row {row_no}: {exc}") from None
    if not profiles:
        raise ValueError(f"{path}: no device rows")
    return profiles
