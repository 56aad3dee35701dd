"""One server per data dir: a second ``fedfleet serve`` on a dir in use exits with a one-line error
naming the dir and the pid holding it, and touches nothing; the lock goes with the first server
(kill -9 included), and an app restarted in the same process on the same dir starts again."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from bench.bench_faults import ServerProcess, free_port
from fedfleet.server.app import make_app
from fedfleet.server.config import ServerConfig
from fedfleet.server.state import STORE
from fedfleet.server.store import StoreInUse


async def _status(url: str) -> dict[str, object]:
    async with aiohttp.ClientSession() as http, http.get(f"{url}/v1/status") as r:
        return dict(await r.json())


def _second_server(first: ServerProcess) -> subprocess.CompletedProcess[str]:
    args = list(first.args)
    args[args.index("--port") + 1] = str(free_port())
    return subprocess.run(args, capture_output=True, text=True, timeout=60)


@pytest.mark.slow
async def test_a_second_server_on_a_data_dir_in_use_is_refused_until_the_first_dies(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = ServerProcess(state, "synthetic:200", {"rounds": 0, "sample_fraction": 1.0})
    try:
        await first.start()
        assert first.proc is not None
        before = await _status(first.url)
        sqlite_bytes = (state / "server.sqlite").read_bytes()
        second = _second_server(first)
        assert second.returncode == 2, second.stderr
        (line,) = second.stderr.strip().splitlines()  # one line, no traceback
        assert line.startswith("fedfleet") and line.endswith(
            f"error: {state} is in use by process {first.proc.pid} (it holds "
            f"{(state / 'server.sqlite').resolve()}.lock): one server per data dir; stop that server or "
            "choose another --data-dir"), line
        assert (state / "server.sqlite").read_bytes() == sqlite_bytes  # the refused server wrote nothing
        assert await _status(first.url) == before
        first.kill9()  # the kernel drops a dead process's lock
        await first.start()
        assert (await _status(first.url))["version"] == before["version"]
    finally:
        first.stop()


async def test_an_app_restarted_in_one_process_releases_and_retakes_the_lock(tmp_path: Path) -> None:
    cfg = ServerConfig(model="mlp", data_dir=str(tmp_path), rounds=0)
    for _ in range(2):  # a server that shut down gave its lock back
        runner = web.AppRunner(make_app(cfg))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        await runner.cleanup()
    holder = subprocess.Popen(  # another process takes the dir: this one is now refused
        [sys.executable, "-c", "import sys; from server.store import Store; s = Store(sys.argv[1]); "
         "print('locked', flush=True); sys.stdin.read()", str(tmp_path / "server.sqlite")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(StoreInUse, match=f"in use by process {holder.pid}"):
            make_app(cfg)
    finally:
        holder.communicate("", timeout=30)
    make_app(cfg)[STORE].close()  # the holder exited: free again
