"""Shared fixtures: the real aiohttp server on loopback (pytest-aiohttp's test server)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from fedfleet.device_runtime.data import load_dataset
from fedfleet.protocol import encode_message
from fedfleet.server.app import make_app
from fedfleet.server.config import ServerConfig
from tests.exports import Exports, Finished
from tests.fedclient_build import JavaBuild, build_once

MakeClient = Callable[..., Awaitable[TestClient]]


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread() -> None:
    """The suite trains as the command line does, on one torch thread (fedfleet.tuning): the runs in
    it are the command line's, made smaller."""
    from fedfleet.tuning import set_torch_threads

    set_torch_threads(1)


RUN_DIR = pytest.StashKey[Path]()
RUN_DIR_ENV = "FEDFLEET_TEST_RUN_DIR"
EXPORTS = pytest.StashKey[Exports]()


RUN_DIR_PREFIX = "fedfleet-tests-"


def _process_identity(pid: int) -> str | None:
    """``pid`` and its start time (Linux ``/proc``; the pid alone elsewhere), or None when no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None if Path("/proc/self/stat").exists() else str(pid)
    except OSError:
        return str(pid)
    return f"{pid} {stat.rsplit(')', 1)[1].split()[19]}"  # field 22, after the command's parentheses


def remove_stale_run_dirs(root: Path) -> list[Path]:
    """Remove the run directories under ``root`` whose run has ended without removing its own (a
    pytest killed before its unconfigure): those whose owner process is gone. Return them."""
    removed = []
    for path in root.glob(f"{RUN_DIR_PREFIX}*"):
        try:
            owner = (path / "owner").read_text().strip()
        except OSError:
            continue  # not made by this hook, or still being made: left alone
        pid = owner.split()[0]
        if pid.isdigit() and _process_identity(int(pid)) != owner:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def pytest_configure(config: pytest.Config) -> None:
    """One directory per run for what the run makes once (the exports, the Java client's build),
    shared with pytest-xdist's workers: they are started after this, and inherit the variable. The
    directories of earlier runs that were killed are removed first."""
    shared = os.environ.get(RUN_DIR_ENV) if hasattr(config, "workerinput") else None
    if shared is None:
        remove_stale_run_dirs(Path(tempfile.gettempdir()))
        shared = tempfile.mkdtemp(prefix=RUN_DIR_PREFIX)
        (Path(shared) / "owner").write_text(_process_identity(os.getpid()) or str(os.getpid()))
        os.environ[RUN_DIR_ENV] = shared
    config.stash[RUN_DIR] = Path(shared)


def pytest_unconfigure(config: pytest.Config) -> None:
    if not hasattr(config, "workerinput") and RUN_DIR in config.stash:
        shutil.rmtree(config.stash[RUN_DIR], ignore_errors=True)


def _exports_needed(item: pytest.Item) -> set[str]:
    """The shared exports (tests/exports.py) a test reads: ``mlp_bundle``, ``gru_refusal``, or
    ``exports`` with the model as its ``model`` parameter."""
    names = set(getattr(item, "fixturenames", ()))
    params = getattr(item, "callspec", None)
    needed = {name for fixture, name in (("mlp_bundle", "mlp"), ("gru_refusal", "gru")) if fixture in names}
    if "exports" in names and params is not None and "model" in params.params:
        needed.add(str(params.params["model"]))
    return needed


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the exports the selected tests read, before the first test runs (under pytest-xdist
    each worker does, and the run's processes share them: tests/exports.py)."""
    if session.config.option.collectonly:
        return
    needed = set().union(*(_exports_needed(item) for item in session.items))
    if needed:
        root = session.config.stash[RUN_DIR] / "exports"
        root.mkdir(exist_ok=True)
        session.stash[EXPORTS] = Exports(root, needed)


def pytest_sessionfinish(session: pytest.Session) -> None:
    exports = session.stash.get(EXPORTS, None)
    if exports is not None:
        exports.stop()


@pytest.fixture(scope="session")
def exports(request: pytest.FixtureRequest) -> Exports:
    return request.session.stash[EXPORTS]


@pytest.fixture(scope="session")
def mlp_bundle(exports: Exports) -> Path:
    """The MLP-on-digits bundle as `fedfleet export --model mlp --dataset digits` writes it (copy it
    before changing it)."""
    return exports.bundle("mlp")


@pytest.fixture(scope="session")
def gru_refusal(exports: Exports) -> Finished:
    """`fedfleet export` of a GRU classifier, which the exporters refuse (tests.exports.Finished)."""
    return exports.result("gru")


@pytest.fixture(scope="session")
def fedclient(request: pytest.FixtureRequest) -> JavaBuild:
    """The Java client built and its JUnit tests run, once per run (tests/fedclient_build.py)."""
    return build_once(request.config.stash[RUN_DIR])


@pytest.fixture(scope="session")
def digits() -> Any:
    return load_dataset("digits", seed=0)


@pytest.fixture
def make_server(aiohttp_client: Any, digits: Any) -> MakeClient:
    """Start the real app on a loopback port; returns a client bound to it."""

    async def start(evaluate: bool = False, **overrides: Any) -> TestClient:
        cfg = ServerConfig(model="mlp", input_shape=(1, 8, 8), num_classes=10, round_timeout_s=30.0)
        cfg = cfg.replace(**overrides)
        test_data = (digits.x_test, digits.y_test) if evaluate else None
        client: TestClient = await aiohttp_client(make_app(cfg, test_data=test_data))
        return client

    return start


async def register(client: TestClient, name: str) -> tuple[str, dict[str, str], dict[str, Any]]:
    resp = await client.post("/v1/register", json={"name": name})
    assert resp.status == 201, await resp.text()
    body = await resp.json()
    return body["phone_id"], {"Authorization": f"Bearer {body['token']}"}, body["task"]


def zero_delta(task: dict[str, Any], value: float = 0.0) -> dict[str, np.ndarray]:
    return {p["name"]: np.full(p["shape"], value, dtype=np.float32) for p in task["params"]}


def update_body(task: dict[str, Any], delta: dict[str, np.ndarray] | None = None, **meta: Any) -> bytes:
    m = {"update_id": "u1", "base_version": 0, "num_examples": 10, "train_loss": 1.0, "round": 1}
    m.update(meta)
    return encode_message("update", m, delta if delta is not None else zero_delta(task, 0.01))


def request_counts(metrics_text: str, status: str | None = None) -> dict[str, int]:
    """Requests the server answered by "METHOD endpoint" (only ``status`` ones if given), from
    the text of its /metrics."""
    counts: dict[str, int] = {}
    for family in text_string_to_metric_families(metrics_text):
        for s in family.samples:
            if s.name == "fedfleet_http_requests_total" and status in (None, s.labels["status"]):
                key = f"{s.labels['method']} {s.labels['endpoint']}"
                counts[key] = counts.get(key, 0) + int(s.value)
    return counts
