"""The event loop fedfleet's entry points run on: uvloop by default, asyncio's on request."""

from __future__ import annotations

import asyncio
import inspect

import pytest

from fedfleet.device_runtime import aio


async def _which() -> str:
    await asyncio.sleep(0)
    return aio.running_loop_name()


def test_uvloop_by_default_and_asyncio_on_request(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FEDFLEET_LOOP", raising=False)
    assert aio.loop_name() == "uvloop"
    assert aio.run(_which()) == "uvloop"
    monkeypatch.setenv("FEDFLEET_LOOP", "asyncio")
    assert aio.run(_which()) == "asyncio"
    monkeypatch.setenv("FEDFLEET_LOOP", " UVLOOP ")
    assert aio.run(_which()) == "uvloop"


def test_an_unknown_loop_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDFLEET_LOOP", "trio")
    with pytest.raises(ValueError, match="FEDFLEET_LOOP must be one of uvloop, asyncio"):
        aio.loop_name()
    main = _which()
    with pytest.raises(ValueError, match="FEDFLEET_LOOP"):
        aio.run(main)
    assert inspect.getcoroutinestate(main) == inspect.CORO_CLOSED  # not left pending


def test_a_run_returns_its_result_and_raises_its_error() -> None:
    async def boom() -> None:
        raise KeyError("x")

    assert aio.run(asyncio.sleep(0, result=7)) == 7
    with pytest.raises(KeyError):
        aio.run(boom())
