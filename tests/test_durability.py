"""Acknowledged updates survive kill -9 of the server process: a real process, a real SQLite file."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from fedfleet.protocol import decode_message
from tests.conftest import update_body, zero_delta


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(data_dir: Path, port: int, *extra: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedfleet.cli", "serve", "--port", str(port), "--data-dir", str(data_dir),
         "--model", "mlp", "--dataset", "digits", "--rounds", "5", "--sample", "1.0", *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(proc.stderr.read().decode() if proc.stderr else "server died") from None
            time.sleep(0.1)
    raise TimeoutError("server did not start")


@pytest.mark.slow
async def test_kill_9_loses_no_acknowledged_update_and_merges_none_twice(tmp_path: Path) -> None:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _start(tmp_path, port)
    try:
        async with aiohttp.ClientSession() as http:
            phones = []
            for i in range(3):
                async with http.post(f"{url}/v1/register", json={"name": f"p{i}"}) as r:
                    body = await r.json()
                phones.append(({"Authorization": f"Bearer {body['token']}"}, body["task"]))
            for auth, _ in phones:
                await http.post(f"{url}/v1/checkin", headers=auth)
            async with http.get(f"{url}/v1/model", headers=phones[0][0]) as r:
                v0 = decode_message(await r.read()).tensors
            # Two of three phones report: acknowledged, not merged (the round waits for all three).
            deltas = [zero_delta(phones[0][1], 0.5), zero_delta(phones[0][1], 1.5), zero_delta(phones[0][1], 4.0)]
            for (auth, task), d in list(zip(phones, deltas, strict=True))[:2]:
                async with http.post(f"{url}/v1/update", data=update_body(task, d), headers=auth) as r:
                    assert r.status == 200
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        proc = _start(tmp_path, port)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{url}/v1/status") as r:
                st = await r.json()
            assert st["version"] == 0 and st["updates_in_round"] == 2
            auth0, task0 = phones[0]
            # A retry of an acknowledged update after the crash is a duplicate, not a second copy.
            async with http.post(f"{url}/v1/update", data=update_body(task0, deltas[0]), headers=auth0) as r:
                assert (await r.json())["duplicate"] is True
            auth2, task2 = phones[2]
            # Task assignments are not durable: the third phone checks in again after the restart.
            async with http.post(f"{url}/v1/checkin", headers=auth2) as r:
                assert (await r.json())["action"] == "train"
            async with http.post(f"{url}/v1/update", data=update_body(task2, deltas[2]), headers=auth2) as r:
                assert r.status == 200
            for _ in range(50):
                async with http.get(f"{url}/v1/status") as r:
                    if (await r.json())["version"] == 1:
                        break
                time.sleep(0.05)
            async with http.get(f"{url}/v1/model", headers=auth0) as r:
                v1 = decode_message(await r.read()).tensors
            # Merged exactly once each: equal weights (10 examples) -> mean of 0.5, 1.5, 4.0.
            np.testing.assert_allclose(v1["fc2.bias"] - v0["fc2.bias"], 2.0, rtol=1e-5)
            async with http.post(f"{url}/v1/update", data=update_body(task0, deltas[0]), headers=auth0) as r:
                answer = await r.json()
            assert answer["duplicate"] is True and answer["merged_into"] == 1
    finally:
        proc.kill()
        proc.wait(timeout=10)
    assert os.path.exists(tmp_path / "server.sqlite")
