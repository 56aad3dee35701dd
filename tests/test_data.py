import numpy as np
import pytest

from fedfleet.device_runtime.data import load_dataset, partition


def test_digits_and_mnist5k_ship_real_data() -> None:
    d = load_dataset("digits")
    assert d.x_train.shape[1:] == (1, 8, 8) and d.num_classes == 10
    assert len(d.y_train) + len(d.y_test) == 1797
    assert 0.0 <= d.x_train.min() and d.x_train.max() <= 1.0
    m = load_dataset("mnist5k")
    assert m.x_train.shape[1:] == (1, 28, 28) and len(m.y_train) + len(m.y_test) == 5000


def test_synthetic_any_size_and_seeded() -> None:
    a, b = load_dataset("synthetic:3000", seed=3), load_dataset("synthetic:3000", seed=3)
    assert len(a.y_train) + len(a.y_test) == 3000
    np.testing.assert_array_equal(a.x_train, b.x_train)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet:0.5", "dirichlet:0.05", "shards:2"])
def test_partitions_are_disjoint_and_cover(scheme: str) -> None:
    y = load_dataset("digits").y_train
    parts = partition(y, 40, scheme, np.random.default_rng(0))
    assert len(parts) == 40 and all(len(p) >= 1 for p in parts)
    allidx = np.concatenate(parts)
    assert len(np.unique(allidx)) == len(allidx)
    if scheme != "shards:2":
        assert len(allidx) == len(y) or scheme.startswith("iid")


def test_label_skew_is_real() -> None:
    y = load_dataset("digits").y_train
    rng = np.random.default_rng(0)
    iid = partition(y, 20, "iid", rng)
    skew = partition(y, 20, "dirichlet:0.1", rng)
    shards = partition(y, 20, "shards:2", rng)

    def classes(parts: list[np.ndarray]) -> float:
        return float(np.mean([len(np.unique(y[p])) for p in parts]))

    assert classes(iid) > 8 and classes(skew) < 5 and classes(shards) <= 3


def test_quantity_skew_spreads_sizes() -> None:
    y = load_dataset("digits").y_train
    parts = partition(y, 30, "iid", np.random.default_rng(0), quantity_skew=1.0)
    sizes = [len(p) for p in parts]
    assert max(sizes) > 4 * min(sizes) and min(sizes) >= 2


def test_bad_names_are_clear() -> None:
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("cifar100")
    with pytest.raises(ValueError, match="unknown partition"):
        partition(np.zeros(10, dtype=int), 2, "zipf", np.random.default_rng(0))
    with pytest.raises(ValueError, match="existing folder"):
        load_dataset("mnist:/nonexistent")
