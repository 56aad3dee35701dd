"""FedBN (``--local-state``): the state the server evaluates with survives kill -9 of the server process
(a real process, a real SQLite file): after the restart the task still names the state, a phone's upload
with its statistics is taken, and the final weights carry the merged statistics an oracle computes."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from safetensors.numpy import load_file

from fedfleet.protocol import EncoderConfig, UpdateEncoder
from tests.test_durability import _free_port, _start
from tests.test_model_state import oracle

BN_MODEL = ("--model", "examples.custom_task:bn_cnn", "--local-state")


def _states(task: dict[str, Any], rng: np.random.Generator, k: int) -> list[dict[str, np.ndarray]]:
    return [{s["name"]: (rng.normal(size=s["shape"]) + 1).astype(s["dtype"]) if s["dtype"].startswith("float")
             else np.array(rng.integers(1, 30), s["dtype"]) for s in task["state"]} for _ in range(k)]


def _body(task: dict[str, Any], work: dict[str, Any], state: dict[str, np.ndarray], examples: int, seed: int,
          update_id: str) -> bytes:
    """An update for the check-in answer ``work``: a zero delta and ``state``."""
    delta = {p["name"]: np.zeros(p["shape"], np.float32) for p in task["params"]}
    meta = {"update_id": update_id, "base_version": int(work["version"]), "num_examples": examples,
            "train_loss": 1.0, "round": int(work["round"])}
    return UpdateEncoder(EncoderConfig(), np.random.default_rng(seed)).encode(delta, meta, state=state)


async def _version(http: aiohttp.ClientSession, url: str, want: int) -> None:
    for _ in range(200):
        async with http.get(f"{url}/v1/status") as r:
            if (await r.json())["version"] == want:
                return
        time.sleep(0.05)
    raise AssertionError(f"version {want} never published")


async def test_local_state_survives_kill_9(tmp_path: Path) -> None:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _start(tmp_path, port, *BN_MODEL)
    examples = [10, 30, 60]
    try:
        async with aiohttp.ClientSession() as http:
            phones = []
            for i in range(3):
                async with http.post(f"{url}/v1/register", json={"name": f"p{i}"}) as r:
                    body = await r.json()
                phones.append({"Authorization": f"Bearer {body['token']}"})
            task = body["task"]
            assert task["state_mode"] == "local" and task["state"]
            states = _states(task, np.random.default_rng(3), 3)
            for i, auth in enumerate(phones):
                async with http.post(f"{url}/v1/checkin", headers=auth) as r:
                    work = await r.json()
                assert work["action"] == "train"
                async with http.post(f"{url}/v1/update", data=_body(task, work, states[i], examples[i], i, "u1"),
                                     headers=auth) as r:
                    assert r.status == 200, await r.text()
            await _version(http, url, 1)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        proc = _start(tmp_path, port, *BN_MODEL)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{url}/v1/task", headers=phones[0]) as r:
                after = await r.json()
            assert after.get("state_mode") == "local"
            assert [s["name"] for s in after.get("state", [])] == [s["name"] for s in task["state"]]
            # A FedBN phone's upload (its own statistics beside its delta) is still taken after the restart.
            async with http.post(f"{url}/v1/checkin", headers=phones[0]) as r:
                work = await r.json()
            assert work["action"] == "train" and work["version"] == 1
            later = _states(task, np.random.default_rng(4), 1)[0]
            async with http.post(f"{url}/v1/update", data=_body(task, work, later, 5, 0, "u2"),
                                 headers=phones[0]) as r:
                assert r.status == 200, await r.text()
        proc.send_signal(signal.SIGTERM)  # a clean stop writes the final weights: version 1 with its state
        assert proc.wait(timeout=60) == 0, proc.stderr.read().decode() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    weights = load_file(str(tmp_path / "final_weights.safetensors"))
    want = oracle(states, examples)
    for name, value in want.items():
        np.testing.assert_allclose(weights[name], value, rtol=1e-6, err_msg=name)
