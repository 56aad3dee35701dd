"""`fedfleet export` of a task whose loss torch cannot trace: the user sees our one line, not torch's.

A real CLI process: torch logs the graph it was tracing and ExecuTorch warns about its internals while
the export fails; they are held back (export/quiet.py), so stderr is the one error line.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.exports import REPO

LOSS = "tests.test_task_loss:item_loss"  # reads a number out of the outputs: no export can trace it


def test_a_loss_torch_cannot_trace_leaves_one_line_on_stderr(tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    done = subprocess.run([sys.executable, "-m", "fedfleet.cli", "export", "--model", "mlp", "--dataset", "digits",
                           "--loss", LOSS, "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr[-3000:]
    assert lines[0].startswith("fedfleet export: error: model.pte: ") and "train_step.onnx: " in lines[0], lines
    assert lines[0].endswith(f"(training with --loss {LOSS})"), lines
    assert list(out.iterdir()) == []
