"""The exported bundle through the real server: served, hash-checked, and trained on by every runtime.

``mlp_bundle``: the MLP-on-digits bundle `fedfleet export` writes, shared with other tests (tests/conftest.py)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from fedfleet.device_runtime.bundle_client import fetch_bundle
from fedfleet.device_runtime.runtimes import RUNTIME_NAMES
from fedfleet.export.manifest import HashMismatch
from fedfleet.server.app import make_app
from fedfleet.server.config import ServerConfig
from fedfleet.simulate import simulate
from fedfleet.simulate_config import SimulateConfig


async def test_bundle_is_served_and_verified(aiohttp_client: Any, mlp_bundle: Path, tmp_path: Path) -> None:
    served = tmp_path / "served"
    shutil.copytree(mlp_bundle, served)
    client = await aiohttp_client(make_app(ServerConfig(model="mlp", bundle_dir=str(served))))
    reg = await (await client.post("/v1/register", json={"name": "p"})).json()
    assert reg["task"]["bundle"] is True
    url = str(client.make_url("/")).rstrip("/")
    async with aiohttp.ClientSession() as http:
        manifest, nbytes = await fetch_bundle(http, url, reg["token"], tmp_path / "phone")
        assert manifest.model == "mlp" and nbytes > 0
        assert (await http.get(f"{url}/v1/bundle/model.pte")).status == 401  # registered phones only
        bad = await http.get(f"{url}/v1/bundle/..%2Fserver.sqlite", headers={"Authorization": f"Bearer {reg['token']}"})
        assert bad.status == 404
        # A file altered on the way (here: on the server's disk) is refused before it is loaded.
        (served / "train_step.onnx").write_bytes(b"\x00" * 100)
        with pytest.raises(HashMismatch):
            await fetch_bundle(http, url, reg["token"], tmp_path / "phone2")


def test_server_refuses_a_bundle_for_another_task(mlp_bundle: Path) -> None:
    with pytest.raises(ValueError, match="bundle"):
        make_app(ServerConfig(model="cnn", bundle_dir=str(mlp_bundle)))


@pytest.mark.parametrize("runtime", RUNTIME_NAMES)
async def test_federated_run_with_each_runtime(runtime: str, mlp_bundle: Path, tmp_path: Path) -> None:
    shutil.copytree(mlp_bundle, tmp_path / "bundle")  # simulate reuses an intact bundle for its task
    cfg = SimulateConfig(phones=6, rounds=3, sample=1.0, model="mlp", runtime=runtime, trainer="pool", workers=1,
                         lr=0.1, out=str(tmp_path))
    if runtime == "torch":
        cfg = cfg.replace(trainer="batched")
    result, _ = await simulate(cfg)
    accs = [r["accuracy"] for r in result.rounds]
    assert accs[-1] > 0.5 and accs[-1] > accs[0], accs
