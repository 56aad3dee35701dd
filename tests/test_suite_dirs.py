"""The test suite's own run directory: a killed run's is removed by the next run, a live run's is kept."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import RUN_DIR_PREFIX, _process_identity, remove_stale_run_dirs


def test_a_killed_runs_directory_is_removed_and_a_live_ones_kept(tmp_path: Path) -> None:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    dead_pid = int(gone.stdout)
    dirs = {name: tmp_path / f"{RUN_DIR_PREFIX}{name}" for name in ("dead", "live", "reused", "unowned")}
    for path in dirs.values():
        (path / "exports").mkdir(parents=True)
    (dirs["dead"] / "owner").write_text(f"{dead_pid} 12345")
    (dirs["live"] / "owner").write_text(_process_identity(os.getpid()) or "")
    (dirs["reused"] / "owner").write_text(f"{os.getpid()} 1")  # this pid, but a process started at another time
    assert _process_identity(dead_pid) is None or _process_identity(dead_pid) != f"{dead_pid} 12345"
    removed = remove_stale_run_dirs(tmp_path)
    assert sorted(removed) == sorted([dirs["dead"], dirs["reused"]])
    assert dirs["live"].is_dir() and dirs["unowned"].is_dir()
    assert not dirs["dead"].exists() and not dirs["reused"].exists()
