"""kill -9 of a real ``fedfleet serve --secure-agg`` in the middle of a secure round: the restarted
server has merged nothing, the model and versions are as before, the phones learn their group is
gone (and check in again), and the next round merges exactly the integer updates of its phones."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from fedfleet.device_runtime.secagg_client import SecureOutcome, SecureRoundAborted, secure_round
from fedfleet.protocol import decode_message
from tests.test_durability import _free_port, _start

TOML = "[server]\nsecagg_step_timeout_s = 5.0\nsecagg_clip = 5.0\ncheckin_retry_s = 0.05\n"


def _sender(http: aiohttp.ClientSession, url: str, auth: dict[str, str]) -> Any:
    async def send(method: str, path: str, body: Any, raw: bytes | None) -> dict[str, Any]:
        async with http.request(method, url + path, json=body if raw is None else None, data=raw,
                                headers=auth) as r:
            answer: dict[str, Any] = await r.json()
            assert r.status == 200, answer
            return answer

    return send


async def _checkin_all(http: aiohttp.ClientSession, url: str, auths: list[dict[str, str]]) -> None:
    for auth in auths:
        async with http.post(f"{url}/v1/checkin", headers=auth) as r:
            assert (await r.json())["action"] == "train"


async def test_kill_9_mid_protocol_merges_nothing_partial(tmp_path: Path) -> None:
    config = tmp_path / "server.toml"
    config.write_text(TOML)
    port, data = _free_port(), tmp_path / "data"
    url = f"http://127.0.0.1:{port}"
    proc = _start(data, port, "--secure-agg", "--config", str(config))
    try:
        async with aiohttp.ClientSession() as http:
            auths, task = [], {}
            for i in range(4):
                async with http.post(f"{url}/v1/register", json={"name": f"p{i}"}) as r:
                    body = await r.json()
                auths.append({"Authorization": f"Bearer {body['token']}"})
                task = body["task"]
            await _checkin_all(http, url, auths)
            async with http.get(f"{url}/v1/model", headers=auths[0]) as r:
                v0 = decode_message(await r.read()).tensors
            names = [p["name"] for p in task["params"]]
            rng = np.random.default_rng(1)
            deltas = [{n: rng.normal(0, 0.05, v0[n].shape) for n in names} for _ in auths]
            # every phone advertises and shares its keys; the group waits for masked uploads
            await asyncio.gather(*[secure_round(_sender(http, url, a), asyncio.sleep, 1, d, names,
                                                np.random.default_rng([3, i]), drop_after="share")
                                   for i, (a, d) in enumerate(zip(auths, deltas, strict=True))])
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        proc = _start(data, port, "--secure-agg", "--config", str(config))
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{url}/v1/status") as r:
                assert (await r.json())["version"] == 0
            async with http.get(f"{url}/v1/secagg/inbox?round=1", headers=auths[0]) as r:
                assert (await r.json())["state"] == "aborted"  # the group did not survive: check in again
            await _checkin_all(http, url, auths)
            outcomes = await asyncio.gather(*[
                secure_round(_sender(http, url, a), asyncio.sleep, 1, d, names, np.random.default_rng([4, i]))
                for i, (a, d) in enumerate(zip(auths, deltas, strict=True))], return_exceptions=True)
            assert all(isinstance(o, SecureOutcome) for o in outcomes), outcomes
            assert not any(isinstance(o, SecureRoundAborted) for o in outcomes)
            for _ in range(100):
                async with http.get(f"{url}/v1/status") as r:
                    if (await r.json())["version"] == 1:
                        break
                await asyncio.sleep(0.05)
            async with http.get(f"{url}/v1/model", headers=auths[0]) as r:
                v1 = decode_message(await r.read()).tensors
        values = [_values(o) for o in outcomes if isinstance(o, SecureOutcome)]
        mean = np.sum(values, axis=0).astype(np.float64) / (2.0**16 / 5.0 * len(values))
        at = 0
        for name in names:
            p = v0[name]
            np.testing.assert_array_equal(v1[name], (p.astype(np.float64) + mean[at : at + p.size].reshape(p.shape))
                                          .astype(p.dtype))
            at += p.size
    finally:
        proc.kill()
        proc.wait(timeout=10)


def _values(outcome: SecureOutcome) -> np.ndarray:
    """The integer update a phone masked (kept by the test to check the sum)."""
    assert outcome.values is not None
    return outcome.values
