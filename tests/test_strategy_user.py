"""A user's strategy from a module of their own: merged with in sync and async mode over the real
server on loopback, its state kept across a restart, named by ``--strategy MODULE:ATTR``, and a
spec that cannot load refused in one line before any server starts."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedfleet.cli import main
from fedfleet.protocol import decode_message
from fedfleet.server.app import make_app
from fedfleet.server.config import ServerConfig
from fedfleet.server.state import COORD, STORE
from fedfleet.server.strategies import FedAvg, load_strategy
from fedfleet.server.strategy import MergeContext, MergeResult, Params, Strategy, StrategyError, Update
from tests.conftest import MakeClient, register, update_body, zero_delta

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "median_strategy.py"
USER_MODULE = '''
import numpy as np

from median_strategy import CoordinateMedian
from fedfleet.server.strategy import MergeResult, Strategy


class CountingMedian(CoordinateMedian):
    """The example's median, counting its merges in its state and reporting the mode."""

    def aggregate(self, params, state, updates, ctx):
        merged = super().aggregate(params, state, updates, ctx)
        merges = state.get("merges", np.zeros(1)) + 1
        return MergeResult(merged.params, {"merges": merges}, {**merged.metrics, "seen_mode": ctx.mode,
                                                               "merges_seen": int(merges[0])})


class KeepPrevious(Strategy):
    def aggregate(self, params, state, updates, ctx):
        return MergeResult(dict(params), metrics={"kept": len(updates)})


def make_median():
    return CountingMedian()


not_a_strategy = 42


class Plain:
    pass
'''


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Modules of the user's in a folder outside the repository: examples/median_strategy.py and
    ``user_strategies``, which builds on it."""
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "median_strategy.py").write_text(EXAMPLE.read_text())
    (folder / "user_strategies.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(folder))
    for name in ("user_strategies", "median_strategy"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    return "user_strategies"


async def _model(client: Any, auth: dict[str, str], version: int | None = None) -> dict[str, np.ndarray]:
    query = "" if version is None else f"?version={version}"
    return decode_message(await (await client.get("/v1/model" + query, headers=auth)).read()).tensors


async def _round(client: Any, phones: list[tuple[str, dict[str, str], dict[str, Any]]], values: list[float],
                 version: int) -> None:
    for i, ((_, auth, task), value) in enumerate(zip(phones, values, strict=True)):
        answer = await (await client.post("/v1/checkin", headers=auth)).json()
        assert answer["action"] == "train", answer
        body = update_body(task, zero_delta(task, value), update_id=f"u{version}-{i}", base_version=version,
                           round=answer["round"], num_examples=10 * (i + 1))
        resp = await client.post("/v1/update", data=body, headers=auth)
        assert resp.status == 200, await resp.text()


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_a_user_strategy_merges_in_both_modes_over_the_real_server(make_server: MakeClient, user_module: str,
                                                                         mode: str) -> None:
    client = await make_server(strategy=f"{user_module}:CountingMedian", mode=mode, sample_fraction=1.0,
                               min_cohort=3, buffer_size=3, concurrency=3, staleness="constant")
    phones = [await register(client, f"p{i}") for i in range(3)]
    auth = phones[0][1]
    v0 = await _model(client, auth)
    for version in range(2):
        await _round(client, phones, [1.0, 2.0, 100.0], version)  # FedAvg's weighted mean would be 50.8
    status = await (await client.get("/v1/status")).json()
    assert status["version"] == 2
    v2 = await _model(client, auth)
    for name in v0:
        np.testing.assert_allclose(v2[name] - v0[name], 4.0, rtol=1e-5)  # two medians of (1, 2, 100)
    rounds: list[dict[str, Any]] = []
    for _ in range(200):  # the publisher records each merge just after it
        rounds = (await (await client.get("/v1/rounds")).json())["rounds"]
        if len(rounds) == 2:
            break
        await asyncio.sleep(0.01)
    assert [(r["median_of"], r["seen_mode"], r["merges_seen"]) for r in rounds] == [(3, mode, 1), (3, mode, 2)]


async def test_keep_previous_publishes_new_versions_of_the_same_model(make_server: MakeClient,
                                                                       user_module: str) -> None:
    client = await make_server(strategy=f"{user_module}:KeepPrevious", sample_fraction=1.0, min_cohort=2)
    phones = [await register(client, f"p{i}") for i in range(2)]
    await _round(client, phones, [5.0, 7.0], 0)
    auth = phones[0][1]
    v0, v1 = await _model(client, auth, 0), await _model(client, auth)
    assert (await (await client.get("/v1/status")).json())["version"] == 1
    assert all(v1[n].tobytes() == v0[n].tobytes() for n in v0)


def _contribute(coord: Any, phone: str, value: float) -> None:
    coord.checkin(phone)
    delta = {n: np.full(p.shape, value, dtype=np.float32) for n, p in coord.params.items()}
    coord.add_update(phone, {"update_id": f"{phone}-{coord.version}", "base_version": coord.version,
                             "num_examples": 10}, delta)


def test_a_user_strategys_state_survives_a_restart(tmp_path: Path, user_module: str) -> None:
    cfg = ServerConfig(model="mlp", mode="async", buffer_size=1, strategy=f"{user_module}:make_median",
                       data_dir=str(tmp_path / "state"))
    app = make_app(cfg)
    coord = app[COORD]
    for value in (1.0, 2.0):
        _contribute(coord, "a", value)
        coord.merge()
    assert coord.opt_state["merges"].tolist() == [2.0]
    app[STORE].close()
    again = make_app(cfg)[COORD]  # a restart reads the strategy's state stored with the newest version
    assert again.version == 2 and again.opt_state["merges"].tolist() == [2.0]
    _contribute(again, "a", 3.0)
    assert again.merge().record.extra["merges_seen"] == 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("spec, words", [
    ("no_such_module_zz:Median", ["no_such_module_zz", "cannot import", "PYTHONPATH"]),
    ("user_strategies:Nothing", ["has no attribute Nothing"]),
    ("user_strategies:not_a_strategy", ["not_a_strategy is a int, not a Strategy"]),
    ("user_strategies:Plain", ["Plain is a class that is not a Strategy subclass"]),
    ("user_strategies", ["give MODULE:ATTR"]),
])
@pytest.mark.parametrize("command", ["serve", "simulate"])
def test_a_strategy_that_cannot_load_is_one_line_before_any_server(capsys: pytest.CaptureFixture[str],
                                                                   tmp_path: Path, user_module: str, spec: str,
                                                                   words: list[str], command: str) -> None:
    where = ["--port", str(_free_port()), "--data-dir", str(tmp_path / "d")] if command == "serve" else [
        "--out", str(tmp_path / "d")]
    rc = main([command, *where, "--strategy", spec])
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert rc == 2 and out == "" and len(lines) == 1 and lines[0].startswith(f"fedfleet {command}: error: "), err
    assert f"strategy {spec!r}" in lines[0] and all(w in lines[0] for w in words), lines[0]
    assert not (tmp_path / "d").exists()


def test_a_user_strategy_refuses_the_builtin_merges_settings(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                             user_module: str) -> None:
    rc = main(["simulate", "--out", str(tmp_path / "d"), "--strategy", f"{user_module}:KeepPrevious",
               "--server-optimizer", "fedadam"])
    err = capsys.readouterr().err
    assert rc == 2 and "leave server_optimizer at the default" in err
    with pytest.raises(SystemExit):  # phones follow the server's task: fleet refuses it
        main(["fleet", "--server", "http://127.0.0.1:1", "--strategy", f"{user_module}:KeepPrevious"])
    assert "is a setting of the server's task" in capsys.readouterr().err
    assert type(load_strategy(f"{user_module}:make_median")).__name__ == "CountingMedian"


def test_simulate_runs_with_strategy_flag(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                          user_module: str) -> None:
    out = tmp_path / "run"
    rc = main(["simulate", "--phones", "4", "--rounds", "2", "--model", "mlp", "--local-epochs", "1",
               "--out", str(out), "--strategy", f"{user_module}:KeepPrevious", "--server-process", "no"])
    assert rc == 0, capsys.readouterr().err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["kept"] for r in rows] == [2, 2]  # sample 0.5 of 4 phones: two updates per merge, all kept
    assert rows[0]["accuracy"] == rows[1]["accuracy"]  # the model never moved


class _FailsOnce(Strategy):
    """A strategy with a bug the first time it merges (a result of the wrong dtype), then FedAvg."""

    def __init__(self) -> None:
        self.calls = 0

    def aggregate(self, params: Params, state: Params, updates: Sequence[Update], ctx: MergeContext) -> MergeResult:
        self.calls += 1
        if self.calls == 1:
            return MergeResult({n: p.astype(np.float64) for n, p in params.items()})
        return FedAvg().aggregate(params, state, updates, ctx)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_result_the_server_cannot_publish_loses_no_update(mode: str) -> None:
    strategy = _FailsOnce()
    coord = make_app(ServerConfig(model="mlp", mode=mode, strategy=strategy, buffer_size=2, min_cohort=2,
                                  sample_fraction=1.0))[COORD]
    for phone in ("a", "b"):
        coord.store.add_phone(phone, f"t-{phone}", {})
        _contribute(coord, phone, 1.0)
    assert coord.ready()
    with pytest.raises(StrategyError, match="expected float32"):
        coord.merge()
    assert coord.version == 0 and sorted(c.phone for c in coord.pending()) == ["a", "b"]
    published = coord.merge()  # the next try merges the same two updates
    assert published.version == 1 and published.record.updates == 2 and not coord.pending()
