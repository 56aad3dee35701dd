"""A fleet's start-up and wrap-up: devices.csv's means computed without numpy round trips."""

from __future__ import annotations

import numpy as np

from device_runtime.client import _mean_cell


def test_devices_csv_means_are_numpys_bit_for_bit() -> None:
    rng = np.random.default_rng(3)
    for _ in range(3000):
        n = int(rng.integers(1, 13))  # both sides of numpy's 8-value switch to pairwise sums
        xs = (rng.random(n) * 10.0 ** rng.integers(-5, 3, n)).tolist()
        assert _mean_cell(xs) == round(float(np.mean(xs)), 4)
        assert repr(_mean_cell(xs)) == repr(round(float(np.mean(xs)), 4))
    assert _mean_cell([]) == ""
    assert repr(_mean_cell([0.0, 0.0])) == repr(round(float(np.mean([0.0, 0.0])), 4))
