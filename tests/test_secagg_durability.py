"""kill -9 of a real ``fedfleet serve --secure-agg`` (sync rounds, or ``--mode async`` groups) in
the middle of a secure group: the restarted server rebuilds the group from its log, the phones carry on where they were (they
retry while the server is down, as a phone would), nothing merges before the group finishes, and
the merge is FedBuff's of exactly the phones' integer updates."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from fedfleet.device_runtime.secagg_client import SecureOutcome, secure_round
from fedfleet.protocol import decode_message
from fedfleet.protocol.secagg.integer import mean_from_sum
from tests.test_durability import _free_port, _start

TOML = ("[server]\nsecagg_step_timeout_s = 3.0\nsecagg_clip = 5.0\ncheckin_retry_s = 0.05\n"
        "buffer_size = 4\nconcurrency = 8\nstaleness = \"poly:0.5\"\n")
N = 4


class Gate:
    """Holds every phone before its first request to ``path`` until opened; counts who is held."""

    def __init__(self, path: str) -> None:
        self.path, self.held, self.open = path, 0, asyncio.Event()

    async def pass_(self, path: str) -> None:
        if path.startswith(self.path) and not self.open.is_set():
            self.held += 1
            await self.open.wait()


def _sender(http: aiohttp.ClientSession, url: str, auth: dict[str, str], gate: Gate) -> Any:
    async def send(method: str, path: str, body: Any, raw: bytes | None) -> dict[str, Any]:
        if method == "POST":
            await gate.pass_(path)
        for _ in range(600):  # the server may be down for a moment: retry, as a phone would
            try:
                async with http.request(method, url + path, json=body if raw is None else None, data=raw,
                                        headers=auth) as r:
                    answer: dict[str, Any] = await r.json()
                    assert r.status == 200, answer
                    return answer
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.05)
        raise AssertionError("the server never came back")

    return send


async def _version(http: aiohttp.ClientSession, url: str) -> int:
    async with http.get(f"{url}/v1/status") as r:
        return int((await r.json())["version"])


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("kill_before, drops", [("/v1/secagg/masked", {}), ("/v1/secagg/unmask", {3: "masked"})],
                         ids=["after_sharing_keys", "after_masked_uploads"])
async def test_kill_9_mid_group_loses_no_acknowledged_step(tmp_path: Path, kill_before: str,
                                                            drops: dict[int, str], mode: str) -> None:
    config = tmp_path / "server.toml"
    config.write_text(TOML)
    port, data = _free_port(), tmp_path / "data"
    url = f"http://127.0.0.1:{port}"
    args = ("--secure-agg", "--mode", mode, "--config", str(config))
    proc = _start(data, port, *args)
    try:
        async with aiohttp.ClientSession() as http:
            auths, task = [], {}
            for i in range(N):
                async with http.post(f"{url}/v1/register", json={"name": f"p{i}"}) as r:
                    body = await r.json()
                auths.append({"Authorization": f"Bearer {body['token']}"})
                task = body["task"]
            for auth in auths:
                async with http.post(f"{url}/v1/checkin", headers=auth) as r:
                    answer = await r.json()
                    assert answer["action"] == "train" and answer["round"] == 1, answer
            async with http.get(f"{url}/v1/model", headers=auths[0]) as r:
                v0 = decode_message(await r.read()).tensors
            names = [p["name"] for p in task["params"]]
            rng = np.random.default_rng(1)
            deltas = [{n: rng.normal(0, 0.05, v0[n].shape) for n in names} for _ in auths]
            gate = Gate(kill_before)
            runs = [asyncio.create_task(secure_round(_sender(http, url, a, gate), asyncio.sleep, 1, d, names,
                                                     np.random.default_rng([3, i]), drop_after=drops.get(i)))
                    for i, (a, d) in enumerate(zip(auths, deltas, strict=True))]
            while gate.held < N - len(drops):  # every step before the gate acknowledged
                await asyncio.sleep(0.02)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
            proc = _start(data, port, *args)
            assert await _version(http, url) == 0  # nothing partial merged
            gate.open.set()
            outcomes = await asyncio.gather(*runs, return_exceptions=True)
            assert all(isinstance(o, SecureOutcome) for o in outcomes), outcomes
            for _ in range(300):  # the record follows the version once evaluated
                async with http.get(f"{url}/v1/rounds") as r:
                    rows = (await r.json())["rounds"]
                if rows:
                    break
                await asyncio.sleep(0.05)
            assert await _version(http, url) == 1, rows
            async with http.get(f"{url}/v1/model", headers=auths[0]) as r:
                v1 = decode_message(await r.read()).tensors
        values = [o.values for o in outcomes if isinstance(o, SecureOutcome) and o.values is not None]
        assert len(values) == N and rows[-1]["round"] == 1 and rows[-1]["updates"] == N
        assert rows[-1]["secagg_group"] == 1 if mode == "async" else "secagg_group" not in rows[-1]
        params = next(o.params for o in outcomes if isinstance(o, SecureOutcome) and o.params is not None)
        mean = mean_from_sum(np.sum(values, axis=0), params, N)  # staleness 0: weight 1
        at = 0
        for name in names:
            p = v0[name]
            np.testing.assert_array_equal(v1[name], (p.astype(np.float64) + mean[at : at + p.size].reshape(p.shape))
                                          .astype(p.dtype))
            at += p.size
    finally:
        proc.kill()
        proc.wait(timeout=10)
