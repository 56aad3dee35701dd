"""Serving the aggregation server for a simulation: on the fleet's own event loop (``serve_here``),
or in a child process of its own on the wall clock (``ServerProcess``).

Nothing here imports torch or aiohttp at module level: fedfleet.simulate imports this module before
it starts the server process, which is started first so that its imports run while the fleet's
process imports torch (see ServerProcess).
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedfleet.device_runtime import aio
from fedfleet.device_runtime.clock import WallClock
from fedfleet.device_runtime.data import Dataset
from fedfleet.device_runtime.limits import ACCEPT_BACKLOG
from fedfleet.device_runtime.vclock import VirtualClock
from fedfleet.server.config import ServerConfig
from fedfleet.tuning import tune_process

if TYPE_CHECKING:  # aiohttp is imported where it runs
    from aiohttp import web


@dataclass(frozen=True)
class Served:
    """A server serving a simulation: its URL, and how to end its task early (see finish_task)."""

    url: str
    finish: Callable[[], Awaitable[int]]


@contextlib.asynccontextmanager
async def serve_here(server_cfg: ServerConfig, data: Dataset, clock: VirtualClock | WallClock) -> AsyncIterator[Served]:
    """The server on this event loop (the only way on a virtual clock)."""
    from fedfleet.server.app import make_app

    app = make_app(server_cfg, test_data=(data.x_test, data.y_test), clock=clock.now)
    runner, port = await _serve_on_free_port(app)

    async def finish() -> int:
        return finish_task(app)

    try:
        yield Served(f"http://127.0.0.1:{port}", finish)
    finally:
        await runner.cleanup()


def finish_task(app: web.Application) -> int:
    """End the server's task after the merges it has made (the simulation was interrupted): the
    task then has that many rounds, so its last record marks it finished, check-ins hear "done"
    (held ones at once) and uploads for the open round are refused. Returns the merges kept; with
    none yet, changes nothing and returns 0 (a task of 0 rounds would run forever)."""
    from fedfleet.server.state import COORD, WORK

    coord = app[COORD]
    if coord.merges:
        coord.config = coord.config.replace(rounds=coord.merges)  # as the admin plan endpoint changes it
        app[WORK].notify()
    return int(coord.merges)


async def _serve_on_free_port(app: web.Application) -> tuple[web.AppRunner, int]:
    """Serve ``app`` on a free loopback port; the caller cleans the runner up."""
    from aiohttp import web

    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=ACCEPT_BACKLOG)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


class ServerProcess:
    """A server in a child process on the wall clock, started before it has a configuration: its
    interpreter and imports (~2.5 s, torch for its evaluations included) then run while this
    process loads the fleet's own and the dataset, instead of after them with the fleet idle.
    ``serve`` hands it the configuration and test split and returns its URL; ``stop`` ends it with
    SIGTERM (its graceful shutdown flushes the store), and kills it if it hangs."""

    def __init__(self) -> None:
        ctx = mp.get_context("spawn")  # no forked copy of this process's event loop and threads
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve_child_main, args=(child,), name="fedfleet-server", daemon=True)
        self._proc.start()
        child.close()

    async def serve(self, server_cfg: ServerConfig, data: Dataset, start_timeout_s: float = 120.0) -> str:
        loop = asyncio.get_running_loop()
        try:  # blocks until the child reads it (~9 MB of test split at 10,000 phones): off the loop
            await loop.run_in_executor(None, self._conn.send, (server_cfg, data.x_test, data.y_test))
        except (BrokenPipeError, ConnectionResetError):
            raise self._exited("while starting") from None
        ready = await loop.run_in_executor(None, self._conn.poll, start_timeout_s)
        if not ready:
            raise RuntimeError(f"the server process did not start within {start_timeout_s:.0f} s")
        try:
            port = int(self._conn.recv())
        except EOFError:
            raise self._exited("while starting") from None
        return f"http://127.0.0.1:{port}"

    async def finish(self, timeout_s: float = 30.0) -> int:
        """``finish_task`` in the server process; the merges it kept (0: none, nothing changed)."""
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, self._conn.send, "finish")
            if not await loop.run_in_executor(None, self._conn.poll, timeout_s):
                raise RuntimeError(f"the server process did not answer within {timeout_s:.0f} s")
            return int(self._conn.recv())
        except (BrokenPipeError, ConnectionResetError, EOFError):
            raise self._exited("while finishing") from None

    def check_alive(self) -> None:
        if not self._proc.is_alive():
            raise RuntimeError(f"the server process died during the run (exit code {self._proc.exitcode})")

    def _exited(self, when: str) -> RuntimeError:
        self._proc.join(5)
        return RuntimeError(f"the server process exited {when} (exit code {self._proc.exitcode})")

    def kill(self) -> None:
        """End the server at once (SIGKILL), without its graceful shutdown."""
        if self._proc.is_alive():
            self._proc.kill()

    async def stop(self) -> None:
        self._conn.close()  # a child still waiting for its configuration leaves at once
        loop = asyncio.get_running_loop()
        if self._proc.is_alive():
            self._proc.terminate()
        await loop.run_in_executor(None, self._proc.join, 30)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()


def _serve_child_main(conn: Any) -> None:
    """Child process: import what serving needs, wait for the configuration and test split, serve
    on a free loopback port, report it, run until SIGTERM."""
    # Ctrl-C at a terminal reaches this process too: the parent decides when the server stops (it
    # lets a stopping run's fleet finish first) and ends it with SIGTERM, or by closing the pipe.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import fedfleet.export.models  # noqa: F401  torch and the model zoo, for the first evaluation (see ServerProcess)
    from fedfleet.server.app import make_app

    try:
        server_cfg, x_test, y_test = conn.recv()
    except EOFError:  # the parent gave up before it had a configuration to send
        return

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        app = make_app(server_cfg, test_data=(x_test, y_test))
        tune_process()  # a process of its own serving thousands of phones: see fedfleet.tuning
        runner, port = await _serve_on_free_port(app)

        def from_parent() -> None:  # "finish" (ServerProcess.finish), or EOF: the parent closed the pipe or died
            try:
                message = conn.recv()
            except (EOFError, OSError):
                stop.set()  # a server whose parent was killed does not stay behind
                loop.remove_reader(conn.fileno())
                return
            if message == "finish":
                conn.send(finish_task(app))

        try:
            conn.send(port)
            loop.add_reader(conn.fileno(), from_parent)
            await stop.wait()
        finally:
            loop.remove_reader(conn.fileno())
            conn.close()
            await runner.cleanup()

    aio.run(main())
