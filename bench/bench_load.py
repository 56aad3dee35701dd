"""Upload throughput and latency against one server process at 100, 1,000 and 5,000 connections.

``python -m bench.bench_load --conns 100,1000,5000``: for each level, a fresh ``fedfleet serve``
process (async FedBuff, SQLite WAL with the default ``synchronous=FULL``: every acknowledged upload
is fsynced before its 200) and ``--clients`` load-generator processes holding ``conns`` phones
between them, one keep-alive connection each. Every phone uploads a dense update of the digits MLP
(9.7 kB on the wire), waits for the answer and uploads again, with no think time, so exactly
``conns`` requests are in flight. Once every phone has finished one upload (all connections are
open), the uploads that start in the next ``--duration-s`` seconds are measured: uploads/s
(accepted per second of the window), p50/p99 of each request's latency, and the statuses. The
server's CPU and RSS are read from /proc. The load generators are separate processes, niced by
``--client-nice``, sharing the machine's 2 cores with the server (and with whatever else runs).
``max_concurrent_uploads`` is set to ``--max-concurrent-uploads`` (default: no backpressure, to
measure the server's capacity; the shipped default of 64 would answer the excess with 503).
Writes bench/results/load.json.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import queue
import resource
import shutil
import signal
import subprocess
import tempfile
import time
import tomllib
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from bench.bench_attack import cpu_s, free_port, rss_kib, start_server
from fedfleet.device_runtime import aio
from fedfleet.protocol import encode_message


def client_main(url: str, index: int, phones: int, seed: int, nice: int, ready: Any, window: Any,
                out: Any) -> None:
    """One load-generator process: register ``phones`` phones, then upload in a closed loop."""
    os.nice(nice)
    resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
    rng = np.random.default_rng([seed, index])
    records: list[tuple[float, float, int]] = []  # (start, seconds, status)
    errors: Counter[str] = Counter()

    async def main() -> None:
        conn = aiohttp.TCPConnector(limit=0, keepalive_timeout=600)
        timeout = aiohttp.ClientTimeout(total=600)
        async with aiohttp.ClientSession(connector=conn, timeout=timeout) as http:
            sem = asyncio.Semaphore(64)

            async def register(i: int) -> tuple[str, list[tuple[str, tuple[int, ...]]]]:
                async with sem, http.post(f"{url}/v1/register", json={"name": f"load-{index}-{i}"}) as r:
                    body = await r.json()
                return body["token"], [(p["name"], tuple(p["shape"])) for p in body["task"]["params"]]

            phones_info = await asyncio.gather(*(register(i) for i in range(phones)))
            specs = phones_info[0][1]
            delta = {n: (rng.standard_normal(s) * 1e-3).astype(np.float32) for n, s in specs}
            warmed = 0
            all_warm = asyncio.Event()

            async def phone(i: int, token: str) -> None:
                nonlocal warmed
                auth = {"Authorization": f"Bearer {token}"}
                version, n = 0, 0
                while True:
                    end = window[1]
                    if end and time.time() > end:
                        return
                    n += 1
                    body = encode_message("update", {"update_id": f"{i}-{n}", "base_version": version,
                                                     "num_examples": 10, "train_loss": 1.0, "round": 0}, delta)
                    t = time.time()
                    try:
                        async with http.post(f"{url}/v1/update", data=body, headers=auth) as r:
                            answer = await r.json() if r.status == 200 else {}
                            status = r.status
                    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                        status = 0
                        errors[type(exc).__name__] += 1
                        await asyncio.sleep(0.5)
                    records.append((t, time.time() - t, status))
                    version = int(answer.get("version", version))
                    if n == 1:
                        warmed += 1
                        if warmed == phones:
                            all_warm.set()

            tasks = [asyncio.create_task(phone(i, tok)) for i, (tok, _) in enumerate(phones_info)]
            await all_warm.wait()
            ready.put(index)
            await asyncio.gather(*tasks)

    aio.run(main())
    start, end = window[0], window[1]
    out.put({"records": [r for r in records if start <= r[0] < end], "errors": dict(errors)})


def run_level(conns: int, args: argparse.Namespace) -> dict[str, Any]:
    data_dir = Path(tempfile.mkdtemp(prefix=f"ff-load-{conns}-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    settings = {"model": "mlp", "dataset": "digits", "mode": "async", "rounds": 0, "buffer_size": args.buffer,
                "max_staleness": 1_000_000, "concurrency": max(conns, 1), "round_timeout_s": 600.0,
                "max_concurrent_uploads": args.max_concurrent_uploads, "request_timeout_s": 120.0,
                "seed": args.seed}
    for item in args.set:  # e.g. sqlite_sync="normal" (TOML values)
        key, _, value = item.partition("=")
        settings[key] = tomllib.loads(f"v = {value}")["v"]
    server = start_server(data_dir, settings, port)
    ctx = mp.get_context("spawn")
    ready, out = ctx.Queue(), ctx.Queue()
    window = ctx.Array("d", [0.0, 0.0], lock=False)
    share = [conns // args.clients + (1 if i < conns % args.clients else 0) for i in range(args.clients)]
    procs = [ctx.Process(target=client_main, args=(url, i, n, args.seed, args.client_nice, ready, window, out))
             for i, n in enumerate(share) if n]
    t_setup = time.time()
    try:
        for p in procs:
            p.start()
        for _ in procs:
            ready.get(timeout=1800)
        setup_s = time.time() - t_setup
        start = time.time() + 1.0
        window[0], window[1] = start, start + args.duration_s
        cpu0 = None
        while time.time() < start + args.duration_s:
            if cpu0 is None and time.time() >= start:
                cpu0 = (cpu_s(server.pid), time.time())
            time.sleep(0.05)
        cpu1 = (cpu_s(server.pid), time.time())
        rss = rss_kib(server.pid)
        results = []
        for _ in procs:
            try:
                results.append(out.get(timeout=900))
            except queue.Empty:
                break
        for p in procs:
            p.join(timeout=60)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
        shutil.rmtree(data_dir, ignore_errors=True)
    recs = [r for res in results for r in res["records"]]
    ok = [s for (_t, s, st) in recs if st == 200]
    statuses = Counter(st for (_t, _s, st) in recs)
    errors: Counter[str] = Counter()
    for res in results:
        errors.update(res["errors"])
    assert cpu0 is not None
    return {
        "conns": conns, "client_processes": len(procs), "setup_s": round(setup_s, 1),
        "uploads": len(ok), "uploads_per_s": round(len(ok) / args.duration_s, 1),
        "p50_ms": round(float(np.percentile(ok, 50)) * 1e3, 1) if ok else None,
        "p99_ms": round(float(np.percentile(ok, 99)) * 1e3, 1) if ok else None,
        "statuses": {str(k): v for k, v in sorted(statuses.items())}, "client_errors": dict(errors),
        "server_cpu_percent": round(100 * (cpu1[0] - cpu0[0]) / (cpu1[1] - cpu0[1]), 1),
        "server_rss_mib": round(rss[0] / 1024, 1), "server_rss_peak_mib": round(rss[1] / 1024, 1),
        "loadavg": Path("/proc/loadavg").read_text().split()[:3],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--conns", default="100,1000,5000", help="comma-separated concurrency levels")
    p.add_argument("--duration-s", type=float, default=20.0, help="measured window per level")
    p.add_argument("--clients", type=int, default=1, help="load-generator processes")
    p.add_argument("--client-nice", type=int, default=5)
    p.add_argument("--buffer", type=int, default=50, help="FedBuff K: updates per merge")
    p.add_argument("--max-concurrent-uploads", type=int, default=1_000_000)
    p.add_argument("--set", action="append", default=[], metavar="KEY=TOML_VALUE",
                   help="any other server setting, e.g. --set 'sqlite_sync=\"normal\"'")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="load")
    args = p.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the server inherits it
    levels = [int(c) for c in args.conns.split(",")]
    if max(levels) + 100 > hard:
        raise SystemExit(f"{max(levels)} connections need more than the hard limit of {hard} open files")
    rows = []
    for conns in levels:
        row = run_level(conns, args)
        print(f"{conns} connections: {row}", flush=True)
        rows.append(row)
    from bench.common import table, write

    print(table(rows, ["conns", "uploads", "uploads_per_s", "p50_ms", "p99_ms", "server_cpu_percent",
                       "server_rss_mib", "setup_s"]))
    print(f"wrote {write(args.out, {'config': vars(args), 'levels': rows})}")


if __name__ == "__main__":
    main()
