"""A user's task on a deployed server: `serve` and `fleet` take the same MODULE:ATTR specs, the server writes
the trained model when it stops, and `export --weights` refuses in one line a model the on-device runtimes cannot train."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.test_cli_errors import REPO, _free_port, _one_error_line

TASK = ["--model", "examples.custom_task:conv1d", "--dataset", "examples.custom_task:digit_rows"]


def _cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedfleet.cli", *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_serve_and_fleet_train_a_users_task_and_the_weights_come_out(tmp_path: Path) -> None:
    port, data_dir = _free_port(), tmp_path / "server"
    server = subprocess.Popen([sys.executable, "-m", "fedfleet.cli", "serve", "--port", str(port), *TASK,
                               "--rounds", "2", "--sample", "1", "--data-dir", str(data_dir)],
                              cwd=REPO, stdout=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        assert server.stdout is not None
        banner = server.stdout.readline()
        assert "task examples.custom_task:conv1d on examples.custom_task:digit_rows" in banner, banner
        unnamed = _cli("fleet", "--server", url, "--phones", "3", "--out", str(tmp_path / "unnamed"))
        assert unnamed.returncode == 2
        _one_error_line(unnamed.stderr, "fleet", "examples.custom_task:conv1d", "give --model")
        fleet = _cli("fleet", "--server", url, *TASK, "--phones", "3", "--out", str(tmp_path / "fleet"))
        assert fleet.returncode == 0, fleet.stderr
    finally:
        server.send_signal(signal.SIGTERM)
        out, _ = server.communicate(timeout=60)
    assert "wrote version 2 to" in out, out
    weights = data_dir / "final_weights.safetensors"
    # ExecuTorch's portable kernels train 2-D convolutions only, and the ONNX training graph decomposes only
    # those: export says so in one line and claims no artifact (test_user_task ships an exportable run's weights).
    exported = _cli("export", *TASK, "--weights", str(weights), "--out", str(tmp_path / "bundle"))
    assert exported.returncode == 2, exported.stderr
    last = exported.stderr.strip().splitlines()[-1]
    assert last.startswith("fedfleet export: error: model.pte: ") and "train_step.onnx: " in last, last
    assert not (tmp_path / "bundle" / "manifest.json").exists()
    from safetensors.numpy import load_file

    trained = load_file(str(weights))
    from fedfleet.export.task_model import task_model

    seeded = task_model("examples.custom_task:conv1d", (8, 8), 10).state_dict()  # what version 0 was
    assert not np.array_equal(seeded["head.weight"].numpy(), trained["head.weight"])  # trained, not seeded
