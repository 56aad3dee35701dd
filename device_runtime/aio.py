"""The event loop fedfleet's own processes run on (simulate, fleet, serve, the server's child
process, Ray shards): uvloop where it is installed (Linux and macOS), asyncio's own loop
otherwise or when ``FEDFLEET_LOOP=asyncio``. Both serve the same aiohttp code; uvloop's
libuv sockets and callbacks take less CPU per HTTP request, which is most of an emulated
phone's cost on the wall clock (bench_flower runs both side by side). No torch here, so the
server's start-up path can use it."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
LOOPS = ("uvloop", "asyncio")


def loop_name() -> str:
    """The loop this process's fedfleet entry points use: ``FEDFLEET_LOOP`` (uvloop | asyncio)
    if set, else uvloop when importable, else asyncio."""
    wanted = os.environ.get("FEDFLEET_LOOP", "").strip().lower()
    if wanted and wanted not in LOOPS:
        raise ValueError(f"FEDFLEET_LOOP must be one of {', '.join(LOOPS)}, not {wanted!r}")
    if wanted == "asyncio":
        return "asyncio"
    try:
        import uvloop  # noqa: F401
    except ImportError:
        if wanted == "uvloop":
            raise ValueError("FEDFLEET_LOOP=uvloop but uvloop is not installed (pip install uvloop)") from None
        return "asyncio"
    return "uvloop"


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    if loop_name() == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return asyncio.new_event_loop


def new_event_loop() -> asyncio.AbstractEventLoop:
    return loop_factory()()


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on the chosen loop."""
    try:
        factory = loop_factory()
    except ValueError:
        main.close()  # never started: no "coroutine was never awaited" warning beside the error
        raise
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


def running_loop_name() -> str:
    """What the running loop is (for run summaries): uvloop or asyncio."""
    return "uvloop" if type(asyncio.get_running_loop()).__module__.startswith("uvloop") else "asyncio"
