"""The live dashboard in Debian's headless Chromium, driven by playwright-core (tests/browser/).

A real server with evaluation and three emulated phones training an MLP for three rounds; the
page is opened before the first round and never reloaded, so reaching the final version on
screen proves the server-sent events. The numbers the page shows must equal /v1/dashboard.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from fedfleet.device_runtime.fleet import run_fleet
from fedfleet.device_runtime.fleet_plan import FleetConfig
from fedfleet.device_runtime.runtimes.torch_runtime import torch_runtime_for_task
from fedfleet.server.app import make_app
from fedfleet.server.config import ServerConfig
from fedfleet.server.observability import OBS, setup_observability

BROWSER_DIR = Path(__file__).with_name("browser")
ARTIFACTS = Path(__file__).with_name("artifacts")
CHROMIUM = Path("/usr/bin/chromium")
NODE = shutil.which("node")
ROUNDS = 3

pytestmark = [
    pytest.mark.skipif(NODE is None, reason="Node.js is not installed (Debian/NodeSource package nodejs)"),
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed (apt-get install chromium)"),
]


async def read_json_line(stream: asyncio.StreamReader, timeout: float) -> dict[str, Any]:
    line = await asyncio.wait_for(stream.readline(), timeout)
    assert line, "the browser driver exited before reporting"
    result: dict[str, Any] = json.loads(line)
    return result


async def test_dashboard_shows_live_numbers_in_headless_chromium(aiohttp_server: Any, digits: Any) -> None:
    if not (BROWSER_DIR / "node_modules" / "playwright-core").is_dir():
        pytest.fail("playwright-core is not installed: run `npm ci --prefix tests/browser` (make install does)")
    cfg = ServerConfig(model="mlp", input_shape=digits.input_shape, num_classes=digits.num_classes, rounds=ROUNDS,
                       sample_fraction=1.0, local_epochs=1, checkin_retry_s=0.1, round_timeout_s=60.0)
    app = make_app(cfg, test_data=(digits.x_test, digits.y_test))
    if OBS not in app:  # until make_app sets it up itself
        setup_observability(app)
    server = await aiohttp_server(app)
    base = str(server.make_url("")).rstrip("/")
    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / "dashboard.png"
    screenshot.unlink(missing_ok=True)
    assert NODE is not None
    driver = await asyncio.create_subprocess_exec(
        NODE, str(BROWSER_DIR / "dashboard.mjs"), base + "/", str(ROUNDS), str(screenshot),
        cwd=BROWSER_DIR, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert driver.stdout is not None
        ready = await read_json_line(driver.stdout, 60)
        assert ready["event"] == "ready" and ready["version"]["value"] == "0" and ready["accuracy"]["text"] == "–"
        fleet = FleetConfig(phones=3, workers=1, seed=0)
        result = await run_fleet(base, digits, fleet, torch_runtime_for_task)
        assert len(result.rounds) == ROUNDS
        done = await read_json_line(driver.stdout, 120)
        _, stderr = await asyncio.wait_for(driver.communicate(), 30)
        assert driver.returncode == 0, stderr.decode()
    finally:
        if driver.returncode is None:
            driver.kill()
            await driver.wait()
    async with aiohttp.ClientSession() as session, session.get(base + "/v1/dashboard") as resp:
        dash = await resp.json()
    # What the browser rendered is what the server reports.
    assert done["event"] == "done" and done["errors"] == []
    assert done["version"]["text"] == str(dash["version"]) == str(ROUNDS)
    assert done["accuracy"]["text"] == f"{dash['accuracy']:.4f}"
    assert float(done["accuracy"]["value"]) == dash["accuracy"] == result.rounds[-1]["accuracy"]
    assert done["phones_registered"]["text"] == str(dash["phones_registered"]) == "3"
    assert done["rounds"] == dash["rounds_recorded"] == ROUNDS
    assert done["connection"] == "live" and done["snapshots"] > 1
    charts = {c["id"]: c for c in done["charts"]}
    assert all(charts[c]["canvas"] for c in ("chart-quality", "chart-bytes", "chart-latency"))
    assert "No privacy accounting" in charts["chart-privacy"]["text"]  # no epsilon_max in these records
    assert screenshot.stat().st_size > 10_000 and screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
