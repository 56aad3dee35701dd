"""`fedfleet export` of a task it cannot export: the user sees our one line, not torch's.

Real CLI processes: torch logs the graph it was tracing, and ExecuTorch warns about its internals and
prints the operators it lacks, while the export fails; they are held back (export/quiet.py), so stderr
is the one error line, which names what failed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from torch import nn

from tests.exports import REPO

LOSS = "tests.test_task_loss:item_loss"  # reads a number out of the outputs: no export can trace it


def avg_pool_cnn() -> nn.Module:
    """A convolution, then average pooling: ExecuTorch 1.5.1 has no kernel for avg_pool2d's backward."""
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(64, 10))


def _export(out: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedfleet.cli", "export", "--dataset", "digits", *flags,
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})


def test_a_loss_torch_cannot_trace_leaves_one_line_on_stderr(tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    done = _export(out, "--model", "mlp", "--loss", LOSS)
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr[-3000:]
    assert lines[0].startswith("fedfleet export: error: model.pte: ") and "train_step.onnx: " in lines[0], lines
    assert lines[0].endswith(f"(training with --loss {LOSS})"), lines
    assert list(out.iterdir()) == []


def test_an_op_executorch_has_no_kernel_for_is_named(tmp_path: Path) -> None:
    """The program lowers, but would fail at its first step (error 0x14): the line names the operator."""
    out = tmp_path / "bundle"
    done = _export(out, "--model", "tests.test_export_quiet:avg_pool_cnn")
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr[-3000:]
    assert "model.pte: xnnpack: aten::avg_pool2d_backward.grad_input has no ExecuTorch kernel; portable: " \
           "aten::avg_pool2d_backward.grad_input has no ExecuTorch kernel" in lines[0], lines
    assert list(out.iterdir()) == []
