import numpy as np
import pytest

from fedfleet.server.aggregation import example_weight, weighted_mean


def test_weighted_mean_matches_numpy_average() -> None:
    rng = np.random.default_rng(1)
    ups: list[tuple[dict[str, np.ndarray], float]] = [({"w": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=4)}, float(n))
           for n in (5, 17, 1, 40)]
    got = weighted_mean(ups)
    weights = [w for _, w in ups]
    for name in ("w", "b"):
        oracle = np.average(np.stack([u[name] for u, _ in ups]), axis=0, weights=weights)
        np.testing.assert_allclose(got[name], oracle, rtol=1e-12, atol=1e-12)


def test_example_cap_limits_weight() -> None:
    assert example_weight(10, cap=100) == 10.0
    assert example_weight(10**9, cap=100) == 100.0


def test_weighted_mean_rejects_empty_and_zero_weights() -> None:
    with pytest.raises(ValueError):
        weighted_mean([])
    with pytest.raises(ValueError):
        weighted_mean([({"w": np.ones(2)}, 0.0)])
