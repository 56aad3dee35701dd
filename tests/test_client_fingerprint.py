"""The Java phone sends the model fingerprint of the bundle manifest it loads, and the real server refuses
a phone whose bundle is for another model (409 ``model_mismatch``) and takes one whose bundle is the task's.

Both manifests are real exports (``export_bundle``; model.pte is skipped, as in tests/test_webphone.py:
only the manifest is read here): the task's model, an MLP on 8x8 digits with 10 classes, and another,
the same MLP with 7 classes (same tensor names, another head shape)."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from fedfleet.export.build import ExportConfig, export_bundle
from fedfleet.export.manifest import MANIFEST, UnsupportedExport
from fedfleet.server.app import make_app
from fedfleet.server.config import ServerConfig
from fedfleet.server.state import COORD
from tests.test_java_client import _build


def _export(out: Path, classes: int) -> Path:
    def skip_pte(*args: Any, **kwargs: Any) -> Any:
        raise UnsupportedExport("model.pte", "not needed: only the manifest is read")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("fedfleet.export.executorch_export.export_executorch", skip_pte)
        export_bundle(ExportConfig("mlp", "digits", (1, 8, 8), classes), out)
    return out


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """{"task": the task model's bundle, "other": another model's}."""
    return {"task": _export(tmp_path_factory.mktemp("task"), 10), "other": _export(tmp_path_factory.mktemp("other"), 7)}


def _server(tmp_path: Path, **overrides: Any) -> Any:
    cfg = ServerConfig(model="mlp", input_shape=(1, 8, 8), num_classes=10, round_timeout_s=60.0, sample_fraction=1.0,
                       min_cohort=1, rounds=1, data_dir=str(tmp_path / "data"), **overrides)
    return make_app(cfg)


@pytest.mark.skipif(shutil.which("javac") is None, reason="javac not found: the Java client needs JDK 17+")
async def test_java_phone_sends_its_bundles_fingerprint(aiohttp_server: Any, tmp_path: Path,
                                                        bundles: dict[str, Path]) -> None:
    built = _build("build")
    assert built.returncode == 0, built.stderr + built.stdout
    classpath = _build("classpath").stdout.strip()
    server = await aiohttp_server(_server(tmp_path))
    url = str(server.make_url("")).rstrip("/")

    async def java(name: str, manifest: Path) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            "java", "-cp", classpath, "org.fedfleet.client.Main", "--server", url, "--name", name, "--seed", "1",
            "--examples", "40", "--manifest", str(manifest / MANIFEST),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 120)
        return proc.returncode or 0, out.decode(), err.decode()

    code, _, err = await java("java-other", bundles["other"])
    assert code == 1 and "409 model_mismatch" in err, err
    code, out, err = await java("java-task", bundles["task"])
    assert code == 0, err
    stats = json.loads(out.strip().splitlines()[-1])
    assert stats["participations"] == 1 and stats["rejected"] == 0 and stats["refused"] == 0, stats
    assert server.app[COORD].version == 1  # its update was merged
