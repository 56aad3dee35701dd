"""tune_process puts numpy's BLAS on one thread (fedfleet.tuning.limit_blas_threads), in a process of
its own here: the setting is process-wide."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_tune_process_leaves_numpys_blas_one_thread() -> None:
    code = ("import json, numpy\n"
            "from threadpoolctl import threadpool_info\n"
            "from fedfleet.tuning import tune_process\n"
            "tune_process(freeze=False)\n"
            "print(json.dumps([p['num_threads'] for p in threadpool_info() if p['user_api'] == 'blas']))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert json.loads(out.stdout)
    assert set(json.loads(out.stdout)) == {1}
