"""The README's Python example runs as printed: a real server on loopback and real phones, in a fresh
interpreter whose working directory is a temporary folder (the example writes under runs/)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def readme_python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", (REPO / "README.md").read_text(encoding="utf-8"),
                      re.MULTILINE | re.DOTALL)


def test_the_readme_python_example_runs(tmp_path: Path) -> None:
    blocks = readme_python_blocks()
    assert blocks, "README.md shows the Python API in a ```python block"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", blocks[0]], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    accuracy, bytes_up = done.stdout.strip().splitlines()[-1].split()
    assert 0.5 < float(accuracy) <= 1.0  # 3 rounds of 20 phones on digits: well above chance (0.1)
    assert int(bytes_up) > 0
    assert (tmp_path / "runs" / "py" / "metrics.jsonl").exists()
