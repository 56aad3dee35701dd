"""Java and web phones send the model fingerprint of the bundle manifest they load, and the real server
refuses a phone whose bundle is for another model (409 ``model_mismatch``) and takes one whose bundle is the
task's (the Java phone: ``--manifest FILE``; the web phone: the bundle it keeps from its last download).

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
from fedfleet.server.webphone import setup_webphone
from tests.fedclient_build import JavaBuild
from tests.test_webphone import BROWSER_DIR, CHROMIUM, NODE

needs_browser = pytest.mark.skipif(NODE is None or not CHROMIUM.exists(), reason="Node.js or Debian's chromium missing")


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
    settings: dict[str, Any] = {"round_timeout_s": 60.0, "sample_fraction": 1.0, "min_cohort": 1, "rounds": 1,
                                "data_dir": str(tmp_path / "data"), **overrides}
    cfg = ServerConfig(model="mlp", input_shape=(1, 8, 8), num_classes=10, **settings)
    return make_app(cfg)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("javac") is None, reason="javac not found: the Java client needs JDK 17+")
async def test_java_phone_sends_its_bundles_fingerprint(aiohttp_server: Any, tmp_path: Path,
                                                        bundles: dict[str, Path], fedclient: JavaBuild) -> None:
    assert fedclient.jar_built, fedclient.stderr + fedclient.stdout
    classpath = fedclient.classpath
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


@pytest.mark.slow
@needs_browser
async def test_web_phone_sends_the_fingerprint_of_the_bundle_it_keeps(aiohttp_server: Any, tmp_path: Path,
                                                                      bundles: dict[str, Path]) -> None:
    """A web phone loads the task model's bundle from a real server and keeps it; the server is replaced,
    at the same address, by one whose task is another model. The reloaded phone registers again with
    the fingerprint of the bundle it keeps, is refused with 409 model_mismatch, and stops saying so."""
    first = _server(tmp_path / "a", bundle_dir=str(bundles["task"]), rounds=0)
    setup_webphone(first)
    server = await aiohttp_server(first)
    port = server.port
    base = str(server.make_url("")).rstrip("/")
    assert NODE is not None
    proc = await asyncio.create_subprocess_exec(
        NODE, str(BROWSER_DIR / "fingerprint.mjs"), json.dumps({"url": base + "/phone/", "name": "web-0"}),
        cwd=BROWSER_DIR, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None

    async def event() -> dict[str, Any]:
        assert proc.stdout is not None
        while True:
            line = await asyncio.wait_for(proc.stdout.readline(), 180)
            if not line:
                raise AssertionError("the browser driver ended: " + (await proc.stderr.read()).decode()[-2000:])  # type: ignore[union-attr]
            if line.startswith(b"{"):
                return dict(json.loads(line))

    try:
        ready = await event()
        assert ready["event"] == "ready" and ready["tab"]["phoneId"] == "web-0", ready
        await server.close()
        second = make_app(ServerConfig(model="mlp", input_shape=(1, 8, 8), num_classes=7, round_timeout_s=60.0,
                                       data_dir=str(tmp_path / "b"), bundle_dir=str(bundles["other"])))
        setup_webphone(second)
        await aiohttp_server(second, port=port)
        proc.stdin.write(b"next\n")
        await proc.stdin.drain()
        done = await event()
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
    assert done["event"] == "done", done
    tab = done["tab"]
    assert tab["phase"] == "stopped" and "409 model_mismatch" in (tab["error"] or ""), tab
    assert done["errors"] == []
