"""The bundles the suite reads, each exported once per run by the real CLI in a background process.

Exports take tens of seconds each; the tests that read a bundle share it (they copy it before changing
anything). The exports the selected tests need start as soon as the tests are collected and run one
after another beside the tests: the suite trains on one torch thread, so on two cores they take the
core the tests leave, and a test that reads a bundle rarely waits for it. ``bundle`` waits for one
export and asserts it succeeded; ``result`` hands back an export the test expects to be refused.

Under pytest-xdist every worker starts the same exports in the run's shared directory: a lock per
export makes one worker run it while the others take the next one, and each reads the record the
runner left. An export process dies with the pytest process that started it, even one killed
with SIGTERM (Linux's parent-death signal).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from filelock import FileLock, Timeout

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
    # batch norm (running statistics as program state), adaptive pooling and dropout: the project's example
    "bn_cnn": ("--model", "examples.custom_task:bn_cnn", *DIGITS),
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
    """Runs ``fedfleet export`` for each of ``names`` (in ``JOBS`` order), one at a time, in a thread,
    in ``root``, which the processes of one run share (each export runs once: see the module)."""

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
        pending = list(self.queue)
        while pending and not self.stopped:
            # the exports other processes finished first (a test may be waiting for one), then the next
            # export nobody has taken; when every one left is taken, wait for the first of them
            ready = [n for n in pending if (self.root / f"{n}.json").exists()]
            free = ready or [n for n in pending if self._try_lock(n)]
            for name in ready or free[:1] or pending[:1]:
                finished = self._take(name)
                if finished is not None:
                    self.results[name] = finished
                    self.done[name].set()
                    pending.remove(name)
        for event in self.done.values():  # stopped: nobody waits for the rest
            event.set()

    def _try_lock(self, name: str) -> bool:
        """Whether no other process holds the export's lock (it is let go at once)."""
        try:
            with FileLock(str(self.root / f"{name}.lock")).acquire(timeout=0):
                return True
        except Timeout:
            return False

    def _take(self, name: str) -> Finished | None:
        """The export's record, made by this process if no other has (None: stopped)."""
        lock = FileLock(str(self.root / f"{name}.lock"))
        while not self.stopped:
            try:
                with lock.acquire(timeout=1.0):
                    return self._run_or_read(name)
            except Timeout:
                continue
        return None

    def _run_or_read(self, name: str) -> Finished | None:
        """The export's record, running it first if no process of this run has (None: stopped)."""
        out, log, record = self.root / name, self.root / f"{name}.log", self.root / f"{name}.json"
        if not record.exists():
            env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
            with log.open("wb") as f:  # a file, not a pipe: a full pipe would stall the export
                with self.lock:
                    if self.stopped:
                        return None
                    self.proc = subprocess.Popen([sys.executable, "-m", "tests.exports", str(os.getpid()), "export",
                                                  *JOBS[name], "--out", str(out)], cwd=REPO, env=env, stdout=f,
                                                 stderr=subprocess.STDOUT)
                code = self.proc.wait()
            if self.stopped:  # killed half-way: another process of the run may still need it
                return None
            record.with_suffix(".tmp").write_text(json.dumps({"returncode": code}))
            record.with_suffix(".tmp").replace(record)  # whole, for the processes that read it unlocked
        return self._record(name)

    def _record(self, name: str) -> Finished | None:
        """The export as the process that ran it recorded it (None: not finished)."""
        record = self.root / f"{name}.json"
        if not record.exists():
            return None
        code = json.loads(record.read_text())["returncode"]
        return Finished(self.root / name, code, (self.root / f"{name}.log").read_text(errors="replace"))

    def result(self, name: str) -> Finished:
        assert name in self.done, f"export {name!r} was not started: no selected test asked for it (tests/conftest.py)"
        deadline = time.monotonic() + TIMEOUT_S
        # this process's thread may be busy with another export: one another process finished is read here
        while not self.done[name].wait(1.0):
            finished = self._record(name)
            if finished is not None:
                return finished
            assert time.monotonic() < deadline, f"export {name!r} still running after {TIMEOUT_S:.0f} s"
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


def _exec_cli_as_child(parent_pid: int, args: list[str]) -> None:
    """``fedfleet ARGS`` in this process, killed when the pytest process ``parent_pid`` dies."""
    if sys.platform == "linux":
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
        if os.getppid() != parent_pid:  # the parent died before the signal was armed
            sys.exit(1)
    os.execv(sys.executable, [sys.executable, "-m", "fedfleet.cli", *args])


if __name__ == "__main__":
    _exec_cli_as_child(int(sys.argv[1]), sys.argv[2:])
