"""The bundles the suite reads, each exported once per run by the real CLI in a background process.

Exports take tens of seconds each; the tests that read a bundle share it (they copy it before changing
anything). The exports the selected tests need start as soon as the tests are collected and run one
after another beside the tests: the suite trains on one torch thread, so on two cores they take the
core the tests leave, and a test that reads a bundle rarely waits for it. ``bundle`` waits for one
export and asserts it succeeded; ``result`` hands back an export the test expects to be refused.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

REPO = Path(__file__).resolve().parents[1]
DIGITS = ("--dataset", "digits")
# name -> `fedfleet export` flags (``--out`` is added); in the order they are started
JOBS: dict[str, tuple[str, ...]] = {
    "mlp": ("--model", "mlp", *DIGITS),
    "cnn": ("--model", "cnn", *DIGITS),
    "mobilenet": ("--model", "mobilenet", *DIGITS),
    # a GRU: neither ExecuTorch nor the ONNX inference export takes it (test_export_state)
    "gru": ("--model", "tests.exports:gru_classifier", *DIGITS),
}
TIMEOUT_S = 1800.0  # for the queue to reach and finish one export, on a busy machine


def gru_classifier(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """tests.test_batched_state's GRU classifier of 8x8 digits, as a `--model MODULE:ATTR` factory."""
    from tests.test_batched_state import GRUClassifier

    assert tuple(input_shape) == (1, 8, 8) and num_classes == 10
    return GRUClassifier()


@dataclass(frozen=True)
class Finished:
    out: Path  # the --out directory
    returncode: int
    output: str  # stdout and stderr


class Exports:
    """Runs ``fedfleet export`` for each of ``names`` (in ``JOBS`` order), one at a time, in a thread."""

    def __init__(self, root: Path, names: Iterable[str]) -> None:
        wanted = set(names)
        self.queue = [n for n in JOBS if n in wanted]
        self.root = root
        self.done = {n: threading.Event() for n in self.queue}
        self.results: dict[str, Finished] = {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.stopped = False
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run_all, name="exports", daemon=True)
        self.thread.start()

    def _run_all(self) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        for name in self.queue:
            out, log = self.root / name, self.root / f"{name}.log"
            with log.open("wb") as f:  # a file, not a pipe: a full pipe would stall the export
                with self.lock:
                    if self.stopped:
                        break
                    self.proc = subprocess.Popen([sys.executable, "-m", "fedfleet.cli", "export", *JOBS[name],
                                                  "--out", str(out)], cwd=REPO, env=env, stdout=f,
                                                 stderr=subprocess.STDOUT)
                code = self.proc.wait()
            self.results[name] = Finished(out, code, log.read_text(errors="replace"))
            self.done[name].set()
        for event in self.done.values():  # stopped: nobody waits for the rest
            event.set()

    def result(self, name: str) -> Finished:
        assert name in self.done, f"export {name!r} was not started: no selected test asked for it (tests/conftest.py)"
        assert self.done[name].wait(TIMEOUT_S), f"export {name!r} still running after {TIMEOUT_S:.0f} s"
        assert name in self.results, f"export {name!r} was stopped"
        return self.results[name]

    def bundle(self, name: str) -> Path:
        """The bundle directory of a successful export (do not change it: copy it first)."""
        got = self.result(name)
        assert got.returncode == 0, got.output[-3000:]
        return got.out

    def stop(self) -> None:
        with self.lock:
            self.stopped = True
            if self.proc is not None and self.proc.poll() is None:
                self.proc.kill()
        self.thread.join(timeout=60)
