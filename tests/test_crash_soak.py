"""kill -9 of a real ``fedfleet serve`` process at seeded moments while phones upload (some aimed
at the upload that completes a round: mid-merge / mid-checkpoint): after every kill the SQLite
file holds each acknowledged update (pending or merged, never both) and the version never goes
back; at the end the model equals a replay of the phones' log. The 50-kill, 1M-parameter
version is ``python -m bench.bench_faults crash``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench.bench_faults import TOLERANCE, ServerProcess, crash_settings, run_crash


@pytest.mark.slow
async def test_five_kill_9_lose_nothing_and_merge_nothing_twice(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "state", "synthetic:200", crash_settings())
    try:
        r = await run_crash(server, phones=3, kills=5, seed=5, max_gap_s=0.6)
    finally:
        server.stop()
    assert not r["violations"] and not r["errors"], (r["violations"], r["errors"])
    assert r["client"]["5xx"] == 0 and r["client"]["4xx"] == 0
    assert r["unhandled_errors"] == 0, server.log_text()[-2000:]
    assert r["versions"] >= 2 and r["acked"] == r["merged"] + r["pending_at_end"]
    assert r["max_abs_diff"] <= TOLERANCE, r


def test_a_restart_loads_neither_torch_nor_dp_accounting() -> None:
    """What keeps recovery under 2 s (bench/results/faults.json): the serve path of the CLI and
    a restart from a data dir import no torch (~4 s) and no dp_accounting (~1-4 s here)."""
    code = ("import sys, fedfleet.cli\n"
            "fedfleet.cli.build_parser()\n"
            "from server.app import make_app\n"
            "from server.config import ServerConfig\n"
            "from device_runtime.data import load_dataset\n"
            "load_dataset('synthetic:100')\n"
            "import fedfleet\n"
            "from fedfleet.export.refs import BUILTIN_MODELS\n"
            "print(sorted(m for m in ('torch', 'dp_accounting', 'sklearn') if m in sys.modules), list(BUILTIN_MODELS))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[] ['mlp', 'cnn', 'mobilenet']"
    from fedfleet.export.models import MODEL_NAMES  # the torch-free spelled-out copy stays in step

    assert list(MODEL_NAMES) == ["mlp", "cnn", "mobilenet"]
