"""The zero-install phone (android_demo/web): its JavaScript codec, and browser tabs as real phones.

(a) the JS codec against every golden vector, byte for byte, with node's test runner;
(b) five tabs of Debian's headless Chromium train in WASM (onnxruntime-web) next to five Python
    phones, three synchronous rounds, signed uploads: every tab's update is merged and counted,
    every task's model came inside its check-in's answer, and every upload brought the tab's next
    check-in (FORMAT.md section 9), so the server saw far fewer check-ins than uploads;
(c) a tab whose upload answer is lost (then offline for a while) re-sends the same update,
    which the server merges once; asynchronous mode, local DP on, epsilon on both sides. The lost
    answer also carried the tab's next check-in (the upload chained it): the re-sent update asks
    again and its duplicate answer brings the check-in.

Browser tests follow tests/test_dashboard_browser.py: the real app on a loopback port, a
playwright-core driver (tests/browser/webphone.mjs) that never downloads a browser.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from aiohttp import web

from fedfleet.device_runtime.fleet import run_fleet
from fedfleet.device_runtime.fleet_plan import FleetConfig
from fedfleet.device_runtime.runtimes.torch_runtime import torch_runtime_for_task
from fedfleet.export.models import ModelSpec
from fedfleet.protocol.privacy import Release, local_epsilon
from fedfleet.server.app import make_app
from fedfleet.server.config import ServerConfig
from fedfleet.server.evaluation import Evaluator
from fedfleet.server.state import COORD, STORE
from fedfleet.server.webphone import ORT_DIST, VENDOR_FILES, WEB_DIR_KEY, setup_webphone
from tests.conftest import request_counts

REPO = Path(__file__).resolve().parent.parent
WEB_DIR = REPO / "android_demo" / "web"
GOLDEN = Path(__file__).with_name("golden")
BROWSER_DIR = Path(__file__).with_name("browser")
ARTIFACTS = Path(__file__).with_name("artifacts")
CHROMIUM = Path("/usr/bin/chromium")
NODE = shutil.which("node")
ROUNDS = 3
TABS = 5
STEPS = 500  # train steps timed back to back, in the browser and in Python

needs_node = pytest.mark.skipif(NODE is None, reason="Node.js is not installed (Debian/NodeSource package nodejs)")
needs_chromium = pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed (apt-get install chromium)")


@needs_node
def test_js_codec_passes_every_golden_vector() -> None:
    assert NODE is not None
    proc = subprocess.run([NODE, "--test", "test/"], cwd=WEB_DIR, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    counts = {k: int(v) for k, v in re.findall(r"^# (pass|fail) (\d+)$", proc.stdout, re.M)}
    assert counts["fail"] == 0 and counts["pass"] >= 45, counts
    for path in sorted(GOLDEN.glob("*.json")):  # no vector is skipped: each is its own named test
        vector = json.loads(path.read_text())
        assert re.search(rf"^ok \d+ - \S+ {re.escape(vector['name'])}:", proc.stdout, re.M), f"{path.name} not run"


async def test_webphone_serves_the_app_and_nothing_else(aiohttp_client: Any, tmp_path: Path) -> None:
    app = make_app(ServerConfig(model="mlp"))
    setup_webphone(app)
    setup_webphone(app)  # idempotent: make_app may already have called it
    client = await aiohttp_client(app)
    page = await client.get("/phone/")
    assert page.status == 200 and page.content_type == "text/html" and "fedfleet phone" in await page.text()
    module = await client.get("/phone/src/wire/wire.js")
    assert module.status == 200 and module.content_type == "text/javascript"
    assert (await client.get("/phone", allow_redirects=False)).headers["Location"] == "/phone/"
    assert (await client.get("/phone/manifest.webmanifest")).content_type == "application/manifest+json"
    if (WEB_DIR / ORT_DIST / VENDOR_FILES[0]).is_file():
        wasm = await client.get("/phone/vendor/ort-wasm-simd-threaded.wasm")
        assert wasm.status == 200 and wasm.content_type == "application/wasm"
    for path in ("/phone/package.json", "/phone/test/golden.test.mjs", "/phone/tools/make_samples.py",
                 "/phone/src/%2E%2E/package.json", "/phone/src/..%2Fnode_modules/.package-lock.json",
                 "/phone/vendor/ort.all.min.js", "/phone/src/nope.js"):
        assert (await client.get(path)).status == 404, path
    bare = web.Application()
    setup_webphone(bare, tmp_path)  # no index.html there: nothing is served, nothing breaks
    assert WEB_DIR_KEY not in bare


@pytest.fixture(scope="module")
def bundle(mlp_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The MLP-on-digits bundle as `fedfleet export` writes it (the web phone runs its ONNX graphs),
    a copy of the one the suite shares (tests/conftest.py)."""
    return Path(shutil.copytree(mlp_bundle, tmp_path_factory.mktemp("served") / "bundle"))


class Driver:
    """tests/browser/webphone.mjs as a subprocess: JSON events on its stdout."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.events: list[dict[str, Any]] = []

    @classmethod
    async def start(cls, config: dict[str, Any]) -> Driver:
        if not (BROWSER_DIR / "node_modules" / "playwright-core").is_dir():
            pytest.fail("playwright-core is not installed: run `npm ci --prefix tests/browser` (make install does)")
        if not (WEB_DIR / "node_modules" / "onnxruntime-web" / "dist").is_dir():
            pytest.fail("onnxruntime-web is not installed: run `npm ci` in android_demo/web (make install does)")
        assert NODE is not None
        proc = await asyncio.create_subprocess_exec(
            NODE, str(BROWSER_DIR / "webphone.mjs"), json.dumps(config), cwd=BROWSER_DIR,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            limit=1 << 24,  # a timeout event carries every tab's snapshot and console errors
        )
        return cls(proc)

    async def until(self, event: str, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = await asyncio.wait_for(self.proc.stdout.readline(), max(deadline - time.monotonic(), 0.1))
            except TimeoutError:
                pytest.fail(f"no {event!r} from the browser driver within {timeout:.0f} s; saw {self.events}")
            if not line:
                stderr = await self.proc.stderr.read() if self.proc.stderr else b""
                pytest.fail(f"the browser driver exited before {event!r}: {stderr.decode()[-3000:]}")
            self.events.append(json.loads(line))
            if self.events[-1]["event"] == "timeout":
                pytest.fail(f"the browser driver timed out: {json.dumps(self.events[-1])[:3000]}")
            if self.events[-1]["event"] == event:
                return self.events[-1]

    @classmethod
    async def run(cls, server: Any, tabs: list[dict[str, Any]], *events: tuple[str, float]) -> list[dict[str, Any]]:
        """Open ``tabs`` on ``server``'s web phone and wait for ``events`` (name, timeout s) in order."""
        base = str(server.make_url("")).rstrip("/")
        driver = await cls.start({"url": base + "/phone/", "tabs": tabs, "timeoutMs": 240_000})
        try:
            return [await driver.until(event, timeout) for event, timeout in events]
        finally:
            await driver.close()

    async def close(self) -> None:
        if self.proc.returncode is None:
            try:
                await asyncio.wait_for(self.proc.communicate(), 60)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


def spy_on_updates(app: Any) -> list[dict[str, Any]]:
    """Every update the coordinator is handed: phone, update_id, wire bytes, and its answer."""
    coord = app[COORD]
    seen: list[dict[str, Any]] = []
    add = coord.add_update

    def recording(phone: str, meta: dict[str, Any], delta: Any, wire: bytes | None = None,
                  **kwargs: Any) -> dict[str, Any]:
        answer: dict[str, Any] = add(phone, meta, delta, wire, **kwargs)
        seen.append({"phone": phone, "update_id": meta["update_id"], "wire_bytes": meta["wire_bytes"],
                     "num_examples": meta["num_examples"], **answer})
        return answer

    coord.add_update = recording
    return seen


async def requests_answered(base: str) -> dict[str, int]:
    """Requests the server answered by "METHOD endpoint", from its /metrics counters."""
    async with aiohttp.ClientSession() as session, session.get(base + "/metrics") as resp:
        return request_counts(await resp.text())


def python_step_ms(bundle_dir: Path, batch: int, steps: int = STEPS) -> float:
    """Mean wall time of one train_step.onnx step in Python onnxruntime (one thread, as on a phone),
    timed as the page times it (trainer.js timeSteps): one batch, new weights fed back, 10 warm-up steps."""
    import onnxruntime as ort

    from fedfleet.device_runtime.runtimes.onnx_runtime import session_options
    from fedfleet.export.bundle import load_manifest

    names = load_manifest(bundle_dir).trainable_names()
    session = ort.InferenceSession(str(bundle_dir / "train_step.onnx"), session_options(),
                                   providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    shapes = {p.name: p.shape for p in load_manifest(bundle_dir).trainable()}
    weights = {n: rng.standard_normal(shapes[n]).astype(np.float32) * 0.1 for n in names}
    fixed = {"x": rng.random((batch, 1, 8, 8), dtype=np.float32), "y": rng.integers(0, 10, batch).astype(np.int64),
             "lr": np.array(0.01, np.float32), "mu": np.array(0.0, np.float32),
             **{"anchor." + n: w for n, w in weights.items()}}
    outputs = ["loss", *["new." + n for n in names]]

    def run() -> None:
        _, *new = session.run(outputs, {**weights, **fixed})
        weights.update(zip(names, new, strict=True))

    for _ in range(10):
        run()
    t0 = time.perf_counter()
    for _ in range(steps):
        run()
    return (time.perf_counter() - t0) * 1e3 / steps


@pytest.fixture
def screenshot() -> Iterator[Path]:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / "webphone.png"
    path.unlink(missing_ok=True)
    yield path


@pytest.mark.slow
@needs_node
@needs_chromium
async def test_browser_tabs_train_in_wasm_next_to_python_phones(
    aiohttp_server: Any, digits: Any, bundle: Path, screenshot: Path
) -> None:
    codec = {"sparsify": "topk", "density": 0.25, "quant_bits": 8, "chunk": 64, "error_feedback": True}
    cfg = ServerConfig(model="mlp", input_shape=digits.input_shape, num_classes=digits.num_classes, rounds=ROUNDS,
                       sample_fraction=1.0, min_cohort=2 * TABS, local_epochs=2, lr=0.1, checkin_retry_s=0.2,
                       round_timeout_s=240.0, require_signatures=True, codec=codec, bundle_dir=str(bundle),
                       checkin_hold_s=20.0)  # long poll: a check-in made with an upload waits for the next round
    app = make_app(cfg, test_data=(digits.x_test, digits.y_test))
    setup_webphone(app)
    updates = spy_on_updates(app)
    initial = app[COORD].params
    server = await aiohttp_server(app)
    base = str(server.make_url("")).rstrip("/")
    tabs: list[dict[str, Any]] = [{"name": f"web-{i}", "shard": f"{i}/{TABS}"} for i in range(TABS)]
    tabs[0]["draw"] = 7  # tab 0 also draws a digit and trains on it
    driver = await Driver.start({"url": base + "/phone/", "tabs": tabs, "screenshot": str(screenshot),
                                 "offlineReload": True, "timeoutMs": 240_000,
                                 "benchmark": {"batch": cfg.batch_size, "steps": STEPS}})
    try:
        ready = await driver.until("ready", 240)
        assert [t["phoneId"] for t in ready["tabs"]] == [t["name"] for t in tabs]
        fleet = await run_fleet(base, digits, FleetConfig(phones=TABS, workers=1, seed=0, name_prefix="py"),
                                torch_runtime_for_task)
        done = await driver.until("done", 300)
    finally:
        await driver.close()
    requests = await requests_answered(base)

    rounds = fleet.rounds
    web = {t["phoneId"]: t for t in done["tabs"]}
    assert done["errors"] == []
    # every round merged all ten phones, and the model learned
    assert [r["updates"] for r in rounds] == [2 * TABS] * ROUNDS
    v0 = Evaluator(ModelSpec("mlp", (1, 8, 8), 10), digits.x_test, digits.y_test, seed=0).evaluate(initial).accuracy
    accuracy = [v0] + [r["accuracy"] for r in rounds]
    print("accuracy by version:", [round(a, 4) for a in accuracy])
    assert accuracy[-1] > accuracy[1] > accuracy[0] and accuracy[-1] > 0.5, accuracy
    # every tab trained in WASM each round; its signed, sparse, quantized update was merged
    store = app[STORE]
    for phone, tab in web.items():
        assert tab["phase"] == "finished" and tab["tasks"] == ROUNDS and tab["accepted"] == ROUNDS, tab
        assert tab["signed"] and store.public_key(phone) is not None
        assert tab["stepMs"]["count"] > 0 and tab["bundleBytes"] > 0
        for i, up in enumerate(tab["uploads"]):
            assert up["status"] == "accepted" and up["round"] == i + 1
            assert store.merged_version(phone, up["updateId"]) == i + 1
            server_side = [u for u in updates if u["phone"] == phone and u["update_id"] == up["updateId"]]
            assert [u["wire_bytes"] for u in server_side] == [up["bytes"]]
    # each task's model came inside the tab's check-in answer; the only download is the final model,
    # which a tab keeps for predictions; the Python phones (inline too) downloaded none
    assert [(t["inlineModels"], t["modelDownloads"]) for t in web.values()] == [(ROUNDS, 1)] * TABS
    assert requests["GET /v1/model"] == TABS
    # every upload brought the tab's next check-in (the next round's task, held until the round
    # opened, or "done"): after its first check-in a tab needed no other (a few more when a held
    # check-in outlasted the hold while the Python phones were starting); the Python phones chain too
    assert all(t["chainedCheckins"] == ROUNDS and t["checkins"] >= ROUNDS + 1 for t in web.values()), web
    posts = {k: v for k, v in requests.items() if k in ("POST /v1/checkin", "POST /v1/update")}
    print("requests, every phone chained:", posts, "tabs' own check-ins:",
          [t["checkins"] - t["chainedCheckins"] for t in web.values()])
    assert posts["POST /v1/update"] == 2 * TABS * ROUNDS
    assert posts["POST /v1/checkin"] <= posts["POST /v1/update"] // 2, posts
    # the tabs' bytes are in the round records: update_bytes is the sum over the merged uploads
    for r in rounds:
        merged = [u for u in updates if store.merged_version(u["phone"], u["update_id"]) == r["version"]]
        tab_bytes = sum(u["wire_bytes"] for u in merged if u["phone"] in web)
        assert r["update_bytes"] == sum(u["wire_bytes"] for u in merged) and tab_bytes > 0
        assert r["bytes_up"] >= r["update_bytes"]
        print(f"round {r['round']}: accuracy {r['accuracy']:.4f}, update bytes {r['update_bytes']} "
              f"(tabs {tab_bytes}), compression {r['compression_ratio']:.2f}x")
    # tab 0 drew a 7 before joining: it trained on its shard of the bundled samples plus that digit
    assert web["web-0"]["examples"] == 500 // TABS + 1
    assert {u["num_examples"] for u in updates if u["phone"] == "web-0"} == {500 // TABS + 1}
    # installable and offline: the service worker controls the page and keeps app + runtime,
    # the page keeps the verified bundle and the final model; reloaded offline, it comes back
    sw = done["serviceWorker"]
    assert sw["active"] and sw["controlled"]
    app_cache = next(v for k, v in sw["caches"].items() if k.startswith("app-"))
    assert "/phone/vendor/ort-wasm-simd-threaded.wasm" in app_cache and "/phone/src/wire/wire.js" in app_cache
    assert {"/v1/bundle", "/v1/bundle/model.onnx", "/v1/bundle/train_step.onnx", "/v1/model"} <= set(
        sw["caches"]["fedfleet-data"])
    offline = done["offlineReload"]
    assert offline["phase"] == "offline" and offline["version"] == ROUNDS and offline["phoneId"] == "web-0"
    assert "says" in done["prediction"]
    assert screenshot.stat().st_size > 10_000 and screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # on-phone step time: WASM in Chromium vs Python onnxruntime, same graph, same batch, timed alike
    wasm_ms = done["benchmark"]["msPerStep"]
    python_ms = python_step_ms(bundle, cfg.batch_size)
    in_training = float(np.median([t["stepMs"]["medianMs"] for t in web.values()]))
    print(f"train_step.onnx, batch {cfg.batch_size}, one thread: onnxruntime-web WASM {wasm_ms:.3f} ms/step, "
          f"Python onnxruntime {python_ms:.3f} ms/step ({wasm_ms / python_ms:.1f}x); during the run, 5 tabs "
          f"sharing the cores: median {in_training:.2f} ms/step (0.1 ms timer)")
    (ARTIFACTS / "webphone_steps.json").write_text(json.dumps(
        {"batch": cfg.batch_size, "steps": STEPS, "wasm_ms": wasm_ms, "python_onnxruntime_ms": python_ms,
         "wasm_ms_during_run_median": in_training,
         "rounds": [{k: r[k] for k in ("round", "accuracy", "update_bytes", "bytes_up")} for r in rounds]}, indent=1))


@needs_node
@needs_chromium
async def test_lost_upload_is_resent_and_merged_once(aiohttp_server: Any, digits: Any, bundle: Path) -> None:
    z = 1.0
    codec = {"clip": 1.0, "noise": "gaussian", "noise_multiplier": z, "quant_bits": 4, "chunk": 64}
    cfg = ServerConfig(model="mlp", input_shape=digits.input_shape, num_classes=digits.num_classes, mode="async",
                       rounds=2, buffer_size=2, concurrency=2, local_epochs=1, checkin_retry_s=0.2,
                       round_timeout_s=120.0, codec=codec, bundle_dir=str(bundle))
    app = make_app(cfg, test_data=(digits.x_test, digits.y_test))
    setup_webphone(app)
    updates = spy_on_updates(app)
    server = await aiohttp_server(app)
    tabs: list[dict[str, Any]] = [{"name": "web-lossy", "shard": "0/2", "lose": {"offlineMs": 3000}},
                                  {"name": "web-ok", "shard": "1/2", "afterLost": True}]  # the run cannot end first
    lost, done = await Driver.run(server, tabs, ("lost", 240), ("done", 240))

    # the server took the first upload and answered; the tab never heard it
    assert lost["status"] == 200 and lost["answer"]["accepted"] and not lost["answer"]["duplicate"]
    assert lost["chained"]  # and the answer was the tab's next check-in, lost with it
    lossy = done["tabs"][0]
    first = lossy["uploads"][0]
    assert lossy["networkRetries"] >= 1 and first["attempts"] >= 2 and first["status"] == "duplicate"
    # same update_id both times; the coordinator accepted it once and answered the retry as a duplicate
    calls = [u for u in updates if u["phone"] == "web-lossy" and u["update_id"] == first["updateId"]]
    assert [c["duplicate"] for c in calls] == [False, True] and len({c["wire_bytes"] for c in calls}) == 1
    store = app[STORE]
    assert store.merged_version("web-lossy", first["updateId"]) is not None
    fresh = {(u["phone"], u["update_id"]) for u in updates if u["accepted"] and not u["duplicate"]}
    for _ in range(100):  # the publisher records a merge once its evaluation is done
        if len(app[COORD].history) == cfg.rounds:
            break
        await asyncio.sleep(0.1)
    rows = app[COORD].history
    assert sum(r["updates"] for r in rows) == len(fresh) == cfg.rounds * cfg.buffer_size  # nothing merged twice
    # local DP: the phone's own RDP ledger and the server's agree; epsilon is in the round records
    ledger = app[COORD].ledger
    for tab in done["tabs"]:
        assert tab["mode"] == "async"
        assert tab["inlineModels"] == tab["tasks"] > 0  # every task's model came with its check-in
        released = local_epsilon({Release("gaussian", z): tab["tasks"]}, cfg.dp_delta)
        assert tab["epsilon"] == pytest.approx(released, rel=1e-9)
        accepted = sum(1 for p, _ in fresh if p == tab["phoneId"])
        assert ledger.epsilon(tab["phoneId"]) == pytest.approx(
            local_epsilon({Release("gaussian", z): accepted}, cfg.dp_delta), rel=1e-12)
    assert rows[-1]["epsilon_max"] == pytest.approx(max(ledger.epsilons().values()))
    # every acknowledged upload brought the tab's next check-in, the re-sent one (a duplicate) too
    ok = done["tabs"][1]
    for tab in (lossy, ok):
        assert tab["chainedCheckins"] == tab["accepted"] > 0, tab
    assert rows[-1]["noise_multiplier"] == z
    print(f"lost upload {first['updateId']}: {first['attempts']} attempts, last answer {first['status']}; "
          f"merges {[r['updates'] for r in rows]}; epsilon per tab (phone ledger) "
          f"{[round(t['epsilon'], 3) for t in done['tabs']]}, epsilon_max in metrics {rows[-1]['epsilon_max']:.3f}")
