"""The zero-install phone trains a batch norm model and federates its running statistics (FORMAT.md
section 11): tabs of Debian's headless Chromium (onnxruntime-web, WASM) against the real server over
loopback, the project's BN example (`examples.custom_task:bn_cnn`) exported by the real CLI.

Each tab holds at most 64 digits and trains two epochs at batch 64: every step sees all of its
examples, so its batch statistics do not depend on the order the tab's own random generator shuffles
them in, and the Python ONNX Runtime phone (device_runtime/runtimes/onnx_runtime.py) given the same
weights, statistics and digits is an oracle for what the tab must upload (within float32 rounding of
sums taken in another order: 1e-4 relative, 1e-5 absolute, counters exactly).

(a) shared state: over two sync rounds each tab starts from the statistics of the model message it was
    given (round 2: the server's merge, not the bundle's), uploads what the oracle computes from them,
    and each version's state is the example-weighted mean of what the tabs uploaded;
(b) --local-state (FedBN): model messages carry no state; a tab starts from the bundle's statistics,
    then from its own, also after a reload between the rounds (kept in IndexedDB), and the server's
    state is the example-weighted mean of the uploads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedfleet.device_runtime.runtimes.base import TrainConfig
from fedfleet.device_runtime.runtimes.loader import load_runtime
from fedfleet.device_runtime.runtimes.onnx_runtime import OnnxRuntime
from fedfleet.protocol.state import split_state
from fedfleet.protocol.wire import decode_message
from fedfleet.server.app import make_app
from fedfleet.server.config import ServerConfig
from fedfleet.server.state import COORD, STORE
from fedfleet.server.webphone import setup_webphone
from tests.exports import Exports
from tests.test_model_state import oracle
from tests.test_webphone import WEB_DIR, Driver, needs_chromium, needs_node

MODEL = "examples.custom_task:bn_cnn"
SHARDS = {"web-0": "0/8", "web-1": "1/10"}  # 63 and 50 of the bundled digits: unequal example weights
PLAN: dict[str, Any] = {"local_epochs": 2, "batch_size": 64, "lr": 0.05}  # each step takes all of a tab's digits
RTOL, ATOL = 1e-4, 1e-5
BASE17 = "0123456789abcdefg"
Tensors = dict[str, np.ndarray]

pytestmark = [needs_node, needs_chromium, pytest.mark.parametrize("model", ["bn_cnn"])]  # tests/exports.py


def tab_digits(shard: str) -> tuple[np.ndarray, np.ndarray]:
    """The digits a tab holds (src/phone/data.js: every N-th bundled sample from the I-th, pixels / 16)."""
    doc = json.loads((WEB_DIR / "data" / "samples.json").read_text())
    i, of = map(int, shard.split("/"))
    rows = range(i, len(doc["pixels"]), of)
    x = np.array([[BASE17.index(c) for c in doc["pixels"][r]] for r in rows], np.float32) / 16
    return x.reshape(-1, 1, 8, 8), np.array([doc["labels"][r] for r in rows], np.int64)


def record_uploads(app: Any) -> list[dict[str, Any]]:
    """Every update the coordinator takes: phone, round, examples, and its tensors (state included)."""
    coord = app[COORD]
    seen: list[dict[str, Any]] = []
    add = coord.add_update

    def recording(phone: str, meta: dict[str, Any], delta: Any, wire: bytes | None = None, **kw: Any) -> Any:
        answer = add(phone, meta, delta, wire, **kw)
        if answer["accepted"] and not answer["duplicate"]:
            seen.append({"phone": phone, "round": meta["base_version"] + 1,  # sync: round r trains version r - 1
                         "examples": meta["num_examples"], "tensors": {n: np.array(v) for n, v in delta.items()}})
        return answer

    coord.add_update = recording
    return seen


def python_phone(bundle: Path, params: Tensors, state: Tensors, shard: str) -> tuple[Tensors, Tensors, float]:
    """The ONNX Runtime phone's task from `params` and `state` on the tab's digits: (params, state, accuracy)."""
    runtime = load_runtime("onnx", bundle)
    assert isinstance(runtime, OnnxRuntime)
    runtime.set_params(params)
    runtime.set_state(state)
    x, y = tab_digits(shard)
    runtime.train(x, y, TrainConfig(prox_mu=0.0, **PLAN), np.random.default_rng(0))
    return runtime.get_params(), runtime.get_state(), runtime.evaluate(x, y).accuracy


def version(app: Any, v: int) -> tuple[Tensors, Tensors]:
    """The stored model message of version `v`: (parameters, state it carries)."""
    blob = app[STORE].version_blob(v)
    assert blob is not None
    return split_state(decode_message(blob).tensors)


def assert_state(got: Tensors, want: Tensors, what: str) -> None:
    assert list(got) == list(want), what
    for n, w in want.items():
        if np.asarray(w).dtype.kind == "i":
            assert got[n].dtype == np.int64 and np.array_equal(got[n], w), f"{what}: {n}"
        else:
            assert got[n].dtype == np.float32, f"{what}: {n}"
            np.testing.assert_allclose(got[n], w, rtol=RTOL, atol=ATOL, err_msg=f"{what}: {n}")


def differs(a: Tensors, b: Tensors) -> bool:
    """Whether two states differ beyond the oracle's tolerance somewhere."""
    return any(not np.allclose(a[n], b[n], rtol=10 * RTOL, atol=10 * ATOL) for n in a if a[n].dtype.kind == "f")


def assert_tab_trained(bundle: Path, up: dict[str, Any], params: Tensors, state: Tensors,
                       tab: dict[str, Any] | None) -> Tensors:
    """The tab's upload is what the Python phone uploads from `params` and `state`; returns its state."""
    delta, sent = split_state(up["tensors"])
    want_params, want_state, accuracy = python_phone(bundle, params, state, SHARDS[up["phone"]])
    assert_state(sent, want_state, f"{up['phone']} round {up['round']}")
    for n, w in want_params.items():  # the trained weights too (the default codec: a dense float32 delta)
        np.testing.assert_allclose(params[n] + delta[n], w, rtol=RTOL, atol=ATOL, err_msg=n)
    if tab is not None:  # the tab evaluates with its running statistics, as model.onnx on Python does
        assert abs(tab["localAccuracy"] - accuracy) <= 2 / up["examples"], (tab["localAccuracy"], accuracy)
    return sent


def server_config(bundle: Path, tmp_path: Path, **kw: Any) -> ServerConfig:
    return ServerConfig(model=MODEL, input_shape=(1, 8, 8), num_classes=10, rounds=2, sample_fraction=1.0,
                        min_cohort=len(SHARDS), checkin_retry_s=0.2, round_timeout_s=240.0, bundle_dir=str(bundle),
                        data_dir=str(tmp_path), **PLAN, **kw)


async def test_tabs_federate_batch_norm_statistics(aiohttp_server: Any, tmp_path: Path, digits: Any,
                                                   exports: Exports, model: str) -> None:
    bundle = exports.bundle(model)
    app = make_app(server_config(bundle, tmp_path), test_data=(digits.x_test, digits.y_test))
    setup_webphone(app)
    uploads = record_uploads(app)
    server = await aiohttp_server(app)
    (done,) = await Driver.run(server, [{"name": name, "shard": shard} for name, shard in SHARDS.items()],
                               ("done", 300))

    assert done["errors"] == []
    web = {t["phoneId"]: t for t in done["tabs"]}
    assert all(t["tasks"] == 2 and t["stateMode"] == "shared" and t["stateFrom"] == "server" for t in web.values()), web
    assert app[COORD].version == 2 and app[COORD].rejections == {}
    for r in (1, 2):
        params, state = version(app, r - 1)  # what the round's model message carried
        ups = sorted((u for u in uploads if u["round"] == r), key=lambda u: u["phone"])
        assert [u["phone"] for u in ups] == sorted(SHARDS)
        sent = [assert_tab_trained(bundle, u, params, state, web[u["phone"]] if r == 2 else None) for u in ups]
        if r == 2:  # the merged statistics, not the bundle's, were the start
            initial = load_runtime("onnx", bundle)
            assert isinstance(initial, OnnxRuntime)
            from_bundle = python_phone(bundle, params, initial.get_state(), SHARDS[ups[0]["phone"]])[1]
            assert differs(sent[0], from_bundle)
        merged = version(app, r)[1]
        assert_state(merged, oracle(sent, [u["examples"] for u in ups]), f"version {r}'s state")
        assert not np.allclose(merged["features.1.running_mean"], state["features.1.running_mean"])
    print("version 2's running means (first BN layer):", np.round(version(app, 2)[1]["features.1.running_mean"], 4))


async def test_local_state_stays_on_the_tab_across_rounds_and_a_reload(aiohttp_server: Any, tmp_path: Path,
                                                                       digits: Any, exports: Exports,
                                                                       model: str) -> None:
    bundle = exports.bundle(model)
    app = make_app(server_config(bundle, tmp_path, local_state=True), test_data=(digits.x_test, digits.y_test))
    setup_webphone(app)
    uploads = record_uploads(app)
    server = await aiohttp_server(app)
    # web-0 is reloaded once its first upload is taken; web-1 joins only then, so round 1 is still open
    tabs = [{"name": "web-0", "shard": SHARDS["web-0"], "reloadAfter": 1},
            {"name": "web-1", "shard": SHARDS["web-1"], "afterReload": True}]
    reloaded, done = await Driver.run(server, tabs, ("reloaded", 240), ("done", 300))

    assert done["errors"] == []
    assert reloaded["before"]["stateFrom"] == "bundle" and reloaded["before"]["accepted"] == 1
    assert reloaded["after"]["tasks"] == 0  # a new page: what it goes on from is what it kept
    web = {t["phoneId"]: t for t in done["tabs"]}
    assert all(t["stateMode"] == "local" and t["stateFrom"] == "phone" for t in web.values()), web
    assert app[COORD].version == 2 and app[COORD].rejections == {}
    assert split_state(app[COORD].shipped())[1] == {}  # what tabs download carries no state (they decode strictly)
    initial = load_runtime("onnx", bundle)
    assert isinstance(initial, OnnxRuntime)
    start = initial.get_state()  # the bundle's statistics (weights.safetensors)
    own: dict[str, Tensors] = {}
    for r in (1, 2):
        params = version(app, r - 1)[0]
        ups = sorted((u for u in uploads if u["round"] == r), key=lambda u: u["phone"])
        assert [u["phone"] for u in ups] == sorted(SHARDS)
        sent = []
        for u in ups:
            mine = own.get(u["phone"], start)  # round 2: the tab's own, kept across web-0's reload
            sent.append(assert_tab_trained(bundle, u, params, mine, web[u["phone"]] if r == 2 else None))
            own[u["phone"]] = sent[-1]
        merged = oracle(sent, [u["examples"] for u in ups])
        if r == 2:  # the server's state is the mean of the uploads, and no tab started from it
            assert_state(app[COORD].state, merged, "the server's state")
            assert differs(own["web-0"], python_phone(bundle, params, start, SHARDS["web-0"])[1])
        else:
            previous_merge = merged
    assert differs(sent[0], python_phone(bundle, version(app, 1)[0], previous_merge, SHARDS["web-0"])[1])
