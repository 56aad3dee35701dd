"""The protocol client stands alone: a port reads one file, which imports nothing of the fleet
emulator, and a phone on its real device (the default) takes part in a round of the real server."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from fedfleet.device_runtime import protocol_client
from fedfleet.device_runtime.protocol_client import ProtocolClient, RealDevice
from fedfleet.device_runtime.runtimes.torch_runtime import torch_runtime_for_task
from fedfleet.device_runtime.trainer import RuntimePool
from fedfleet.server.state import COORD
from tests.conftest import MakeClient

# The emulated device and what only it uses: profiles, the virtual clock, attacks, the fleet.
EMULATION = ("fedfleet.device_runtime.emulated_device", "fedfleet.device_runtime.profiles",
             "fedfleet.device_runtime.vclock", "fedfleet.device_runtime.attacks",
             "fedfleet.device_runtime.fleet", "fedfleet.device_runtime.fleet_plan")


def _imported_modules(path: Path) -> set[str]:
    """Every module an import statement of ``path`` names, at any depth of the file."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_the_protocol_client_imports_nothing_of_the_emulation() -> None:
    """Neither its own import statements nor what they bring in load the emulator's modules, nor
    torch: a phone that trains through ExecuTorch or ONNX Runtime does without it."""
    imported = _imported_modules(Path(protocol_client.__file__))
    assert "fedfleet.device_runtime.secagg_client" in imported  # the walk sees the file's imports
    assert not imported & set(EMULATION), imported & set(EMULATION)
    code = ("import sys\nimport fedfleet.device_runtime.protocol_client\n"
            f"print(sorted(m for m in {(*EMULATION, 'torch')!r} if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


async def test_a_phone_on_its_real_device_completes_a_round(make_server: MakeClient, digits: Any) -> None:
    """No device given: the phone registers as itself, checks in, trains, uploads and hears that
    the task is done; the server merges its update into version 1."""
    client = await make_server(rounds=1, sample_fraction=1.0, min_cohort=1)
    url = str(client.make_url("")).rstrip("/")
    async with aiohttp.ClientSession() as session:
        phone = ProtocolClient(session, url, "pixel-1", (digits.x_train[:40], digits.y_train[:40]), None,
                               np.random.default_rng(7))
        task = await phone.register()
        phone.pool = RuntimePool(lambda: torch_runtime_for_task(task))
        try:
            stats = await phone.run(max_errors=0)
        finally:
            phone.pool.close()
    assert isinstance(phone.device, RealDevice)
    assert (stats.participations, stats.drops, stats.rejected, stats.errors) == (1, 0, 0, 0)
    assert stats.bytes_up > 0 and stats.bytes_down > 0 and len(stats.latencies_s) == 1
    coord = client.app[COORD]
    assert coord.version == 1 and coord.merges == 1
    info = coord.store.db.execute("SELECT info FROM phones WHERE phone_id = ?", ("pixel-1",)).fetchone()[0]
    assert json.loads(info)["platform"] == "python"  # not "emulated"
