"""A user's dataset: ``MODULE:ATTR`` (a callable), ``npz:PATH`` or ``imagefolder:PATH``, checked once
where it comes in, so that phones and the server can trust it.

- ``MODULE:ATTR``: a callable (given ``seed`` and ``image_size`` by keyword if its signature names
  them) returning ``(x_train, y_train, x_test, y_test)`` numpy arrays, optionally with a fifth element,
  the number of classes; or two ``torch.utils.data.Dataset`` objects (train, test) of ``(x, label)``.
- ``npz:PATH``: a numpy ``.npz`` with arrays ``x_train``, ``y_train``, ``x_test``, ``y_test`` and
  optionally ``num_classes`` (a scalar).
- ``imagefolder:PATH``: torchvision ``ImageFolder`` layout, one sub-folder per class, images resized to
  ``image_size`` x ``image_size`` RGB in [0, 1]; ``PATH/train`` and ``PATH/test`` when both exist,
  otherwise a seeded 20% of PATH is held out for testing.

Inputs may have any shape (images ``[C, H, W]``, sequences ``[T, F]``, features ``[F]``); they are
made float32. Labels are integers in ``[0, num_classes)`` (num_classes: given, or the largest label + 1);
float targets with a fractional part, or targets ``[N, K]``, make a regression task (``is_regression``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

from fedfleet.export.refs import call_with, resolve_ref

USER_KINDS = ("npz", "imagefolder")


Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]  # x_train, y_train, x_test, y_test, classes


def load_user_data(spec: str, seed: int, image_size: int, test_fraction: float = 0.2) -> Arrays:
    """(x_train, y_train, x_test, y_test, num_classes) of a user's dataset ``spec``, checked."""
    kind, _, arg = spec.partition(":")
    if kind == "npz":
        parts = _npz(arg, spec)
    elif kind == "imagefolder":
        parts = _image_folder(Path(arg), image_size, seed, test_fraction)
    else:
        loader = resolve_ref(spec, "--dataset")
        try:
            got = call_with(loader, seed=seed, image_size=image_size)
        except Exception as exc:
            raise ValueError(f"--dataset {spec}: calling it failed: {type(exc).__name__}: {exc}") from exc
        parts = _from_user(got, spec)
    return check_arrays(spec, *parts)


def _from_user(got: Any, spec: str) -> tuple[Any, ...]:
    if isinstance(got, tuple | list) and len(got) == 2 and all(_is_torch_dataset(d) for d in got):
        return (*_materialise(got[0], spec, "train"), *_materialise(got[1], spec, "test"), None)
    if isinstance(got, tuple | list) and len(got) in (4, 5):
        return (*got, None) if len(got) == 4 else tuple(got)
    raise ValueError(f"--dataset {spec}: returned a {type(got).__name__}; return (x_train, y_train, x_test, "
                     "y_test[, num_classes]) numpy arrays or two torch.utils.data.Dataset objects (train, test)")


def _is_torch_dataset(obj: Any) -> bool:
    data = sys.modules.get("torch.utils.data")  # loaded whenever a user's callable made one
    return data is not None and isinstance(obj, data.Dataset)


def _materialise(ds: Any, spec: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for i in range(len(ds)):
        item = ds[i]
        if not isinstance(item, tuple | list) or len(item) != 2:
            raise ValueError(f"--dataset {spec}: {split} item {i} is not an (x, label) pair")
        xs.append(np.asarray(item[0], dtype=np.float32))
        ys.append(int(np.asarray(item[1])))
    if not xs:
        return np.zeros((0,), np.float32), np.zeros((0,), np.int64)
    if len({x.shape for x in xs}) > 1:
        raise ValueError(f"--dataset {spec}: {split} examples differ in shape (e.g. {xs[0].shape} and "
                         f"{next(x.shape for x in xs if x.shape != xs[0].shape)})")
    return np.stack(xs), np.asarray(ys, dtype=np.int64)


def _npz(path: str, spec: str) -> tuple[Any, ...]:
    if not Path(path).is_file():
        raise ValueError(f"--dataset {spec}: no such file")
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in f.files]
            if missing:
                raise ValueError(f"--dataset {spec}: missing arrays {', '.join(missing)} (has {', '.join(f.files)})")
            classes = int(f["num_classes"]) if "num_classes" in f.files else None
            return f["x_train"], f["y_train"], f["x_test"], f["y_test"], classes
    except (OSError, EOFError) as exc:  # not a zip, or a truncated one
        raise ValueError(f"--dataset {spec}: not a numpy .npz file ({exc})") from None


def _image_folder(root: Path, size: int, seed: int, test_fraction: float) -> tuple[Any, ...]:
    if not root.is_dir():
        raise ValueError(f"--dataset imagefolder:{root}: no such folder")
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor()])  # ImageFolder reads RGB

    def folder(path: Path) -> Any:
        try:
            return datasets.ImageFolder(str(path), transform=tf)
        except (FileNotFoundError, RuntimeError) as exc:  # no class folders, or no image in them
            raise ValueError(f"--dataset imagefolder:{root}: {exc}") from None

    def arrays(ds: Any, split: str) -> tuple[np.ndarray, np.ndarray]:
        try:
            return _materialise(ds, f"imagefolder:{root}", split)
        except OSError as exc:  # PIL cannot read a file named like an image
            raise ValueError(f"--dataset imagefolder:{root}: cannot read an image ({exc})") from None

    if (root / "train").is_dir() and (root / "test").is_dir():
        train, test = folder(root / "train"), folder(root / "test")
        if train.classes != test.classes:
            raise ValueError(f"--dataset imagefolder:{root}: train/ and test/ have different class folders")
        x, y = arrays(train, "train")
        xt, yt = arrays(test, "test")
        return x, y, xt, yt, len(train.classes)
    ds = folder(root)
    x, y = arrays(ds, "train")
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = int(round(len(x) * test_fraction))
    return x[order[n_test:]], y[order[n_test:]], x[order[:n_test]], y[order[:n_test]], len(ds.classes)


def is_regression(y: np.ndarray, yt: np.ndarray) -> bool:
    """Float targets with a fractional part anywhere, or targets ``[N, K]``: a regression task (integer
    labels, or floats that are all whole numbers, are class labels)."""
    if y.ndim == 2 or yt.ndim == 2:
        return True
    floats = [t for t in (y, yt) if np.issubdtype(t.dtype, np.floating)]
    return any(bool((np.isfinite(t) & (t != np.round(t))).any()) for t in floats)


def _regression_arrays(where: str, x: np.ndarray, y: np.ndarray, xt: np.ndarray, yt: np.ndarray,
                       classes: int | None) -> Arrays:
    """Regression targets as float32, ``[N]`` or ``[N, K]``; its "classes" are the model's outputs per example
    (K, or 1 for targets ``[N]``)."""
    if classes is not None:
        raise ValueError(f"{where}: float targets make a regression task; leave out num_classes")
    for split, ys in (("train", y), ("test", yt)):
        if not (np.issubdtype(ys.dtype, np.number) and np.isfinite(ys.astype(np.float64)).all()):
            raise ValueError(f"{where}: y_{split} (regression targets) holds NaN, infinite or non-numeric values")
    if y.shape[1:] != yt.shape[1:]:
        raise ValueError(f"{where}: train targets have shape {list(y.shape[1:])}, test targets {list(yt.shape[1:])}")
    outputs = int(y.shape[1]) if y.ndim == 2 else 1
    return (np.ascontiguousarray(x, dtype=np.float32), np.ascontiguousarray(y, dtype=np.float32),
            np.ascontiguousarray(xt, dtype=np.float32), np.ascontiguousarray(yt, dtype=np.float32), outputs)


def check_arrays(spec: str, x: Any, y: Any, xt: Any, yt: Any, classes: int | None) -> Arrays:
    """The four arrays as float32 / int64 labels (float32 targets for regression: ``is_regression``), or
    ValueError naming ``--dataset`` and what is wrong."""
    where = f"--dataset {spec}"
    arrays = []
    for name, value in (("x_train", x), ("y_train", y), ("x_test", xt), ("y_test", yt)):
        try:
            arrays.append(np.asarray(value))
        except Exception as exc:
            raise ValueError(f"{where}: {name} is not an array ({exc})") from None
    x, y, xt, yt = arrays
    for split, xs, ys in (("train", x, y), ("test", xt, yt)):
        if xs.ndim < 2:
            raise ValueError(f"{where}: x_{split} has shape {list(xs.shape)}; give [examples, *input_shape], "
                             "e.g. [N, F] for feature vectors")
        if len(xs) == 0:
            raise ValueError(f"{where}: the {split} split is empty (x_{split} has shape {list(xs.shape)}); "
                             "give at least one example")
        if ys.ndim not in (1, 2) or len(ys) != len(xs):
            raise ValueError(f"{where}: x_{split} has {len(xs)} examples but y_{split} has shape {list(ys.shape)}")
        if not (np.issubdtype(xs.dtype, np.number) or xs.dtype == bool):
            raise ValueError(f"{where}: x_{split} holds {xs.dtype}, not numbers")
        if not np.isfinite(xs.astype(np.float32)).all():
            raise ValueError(f"{where}: x_{split} holds NaN or infinite values")
    if x.shape[1:] != xt.shape[1:]:
        raise ValueError(f"{where}: train examples have shape {list(x.shape[1:])}, test examples "
                         f"{list(xt.shape[1:])}")
    if is_regression(y, yt):
        return _regression_arrays(where, x, y, xt, yt, classes)
    for split, ys in (("train", y), ("test", yt)):
        if ys.ndim != 1 or not np.issubdtype(ys.dtype, np.integer) and not (np.issubdtype(ys.dtype, np.floating)
                                                                            and (ys == np.round(ys)).all()):
            raise ValueError(f"{where}: y_{split} must hold integer class labels, got {ys.dtype}")
    y, yt = y.astype(np.int64), yt.astype(np.int64)
    top = int(max(y.max(), yt.max()))
    num_classes = top + 1 if classes is None else int(classes)
    low = int(min(y.min(), yt.min()))
    if low < 0 or top >= num_classes or num_classes < 2:
        raise ValueError(f"{where}: labels must be in [0, {num_classes}), got labels from {low} to {top}"
                         + (" (num_classes given)" if classes is not None else ""))
    return (np.ascontiguousarray(x, dtype=np.float32), y, np.ascontiguousarray(xt, dtype=np.float32), yt,
            num_classes)
