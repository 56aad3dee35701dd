"""The server's background work survives our bugs and keeps their tracebacks: a merge that raises at a
round's deadline is logged and the round closes at the next tick; an evaluation that raises is logged
and the next versions are still recorded. Real server on loopback, a user's Strategy and a user's model."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from fedfleet.server.strategies import FedAvg
from fedfleet.server.strategy import MergeContext, MergeResult, Params, Strategy, Update
from tests.conftest import MakeClient, register, update_body, zero_delta


class RaisesOnce(Strategy):
    """FedAvg, with a bug at its first merge."""

    def __init__(self) -> None:
        self.calls = 0

    def aggregate(self, params: Params, state: Params, updates: Sequence[Update], ctx: MergeContext) -> MergeResult:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("a bug in the first merge")
        return FedAvg().aggregate(params, state, updates, ctx)


async def _status(client: Any) -> dict[str, Any]:
    body: dict[str, Any] = await (await client.get("/v1/status")).json()
    return body


async def _upload(client: Any, phone: tuple[str, dict[str, str], dict[str, Any]], version: int) -> None:
    _, auth, task = phone
    answer = await (await client.post("/v1/checkin", headers=auth)).json()
    assert answer["action"] == "train", answer
    body = update_body(task, zero_delta(task, 0.5), update_id=f"u{version}", base_version=version,
                       round=answer["round"])
    resp = await client.post("/v1/update", data=body, headers=auth)
    assert resp.status == 200, await resp.text()


async def test_a_merge_that_raises_at_the_deadline_is_logged_and_the_round_still_closes(
        make_server: MakeClient, caplog: pytest.LogCaptureFixture) -> None:
    """Two phones in the cohort, one uploads: only the ticker can close the round, at its deadline."""
    strategy = RaisesOnce()
    client = await make_server(strategy=strategy, sample_fraction=1.0, min_cohort=2, round_timeout_s=0.5)
    phones = [await register(client, f"p{i}") for i in range(2)]
    assert (await (await client.post("/v1/checkin", headers=phones[1][1])).json())["action"] == "train"
    with caplog.at_level(logging.ERROR, logger="fedfleet.server"):
        await _upload(client, phones[0], 0)
        for _ in range(100):
            if (await _status(client))["version"] == 1:
                break
            await asyncio.sleep(0.1)
    assert (await _status(client))["version"] == 1 and strategy.calls == 2
    failed = [r for r in caplog.records if r.name == "fedfleet.server" and r.exc_info]
    assert len(failed) == 1 and "closing round 1 at its deadline failed" in failed[0].getMessage()
    exc = failed[0].exc_info[1] if failed[0].exc_info else None
    assert isinstance(exc, RuntimeError) and str(exc) == "a bug in the first merge"
    # and the ticker keeps closing rounds at their deadline
    await _upload(client, phones[0], 1)
    for _ in range(100):
        if (await _status(client))["version"] == 2:
            break
        await asyncio.sleep(0.1)
    assert (await _status(client))["version"] == 2


USER_MODEL = '''
import torch
from torch import nn

failures = []


class FlakyEval(nn.Module):
    """A linear classifier whose first evaluation raises."""

    def __init__(self, input_shape, num_classes):
        super().__init__()
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        if not self.training and not failures:
            failures.append(1)
            raise RuntimeError("a bug in the model's evaluation")
        return self.fc(x.reshape(x.shape[0], -1))


def flaky_eval(input_shape, num_classes):
    return FlakyEval(input_shape, num_classes)
'''


async def test_an_evaluation_that_raises_is_logged_and_later_versions_are_recorded(
        make_server: MakeClient, caplog: pytest.LogCaptureFixture, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "flaky_model.py").write_text(USER_MODEL)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "flaky_model", raising=False)
    client = await make_server(evaluate=True, model="flaky_model:flaky_eval", sample_fraction=1.0, min_cohort=1)
    phone = await register(client, "p0")
    rounds: list[dict[str, Any]] = []
    with caplog.at_level(logging.ERROR, logger="fedfleet.server"):
        for version in range(2):
            await _upload(client, phone, version)
        for _ in range(200):
            rounds = (await (await client.get("/v1/rounds")).json())["rounds"]
            if rounds:
                break
            await asyncio.sleep(0.05)
    assert [r["version"] for r in rounds] == [2] and rounds[0]["accuracy"] is not None, rounds
    failed = [r for r in caplog.records if r.name == "fedfleet.server" and r.exc_info]
    assert len(failed) == 1 and "recording version 1 failed" in failed[0].getMessage()
    exc = failed[0].exc_info[1] if failed[0].exc_info else None
    assert isinstance(exc, RuntimeError) and str(exc) == "a bug in the model's evaluation"
