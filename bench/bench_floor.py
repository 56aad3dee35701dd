"""The floor under an emulated fleet's updates/s: what one update must cost on this machine.

Each emulated update is one real HTTP request with real bytes (in steady rounds the phone's
upload, answered by its next check-in carrying the model) plus the protocol work at both ends.
This benchmark measures the parts no implementation in Python on aiohttp can skip, with
everything else (the coordinator, the commit, the merge, asyncio's own tasks) left out, so the
sum is a lower bound on CPU per update and ``cores / floor`` an upper bound on updates/s:

- **HTTP round trip**: a bare aiohttp server (uvloop, one route that reads the body and answers
  bytes) in its own process and an aiohttp client (uvloop) holding ``--conns`` keep-alive
  connections in another, each sending an update-sized body and reading a model-sized answer in
  a closed loop. CPU per request of each process is read from ``/proc`` and ``getrusage`` over a
  ``--window-s`` window once every connection is open.
- **Protocol work**, timed in this process (the minimum over ``--repeats``): the phone's
  ``UpdateEncoder.encode`` (default codec: dense float32, as bench_flower runs) and Ed25519
  signature; the vmapped training of one phone (``train_many`` over ``--group`` phones holding
  18 samples each, the 10,000-phone workload's share, divided by the group); the server's
  signature check and ``decode_message`` against the task's tensors.

The message sizes are the real ones for the digits MLP (64-32-10). The table compares the
ceiling with fedfleet's and Flower's measured rates from bench/results/flower.json, if present.
Writes bench/results/floor.json.

    python -m bench.bench_floor [--conns 100,1000,10000] [--window-s 8]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import multiprocessing as mp
import os
import resource
import time
import timeit
from collections.abc import Callable
from typing import Any

import numpy as np

from bench.bench_attack import free_port
from bench.common import RESULTS, table, write
from fedfleet.device_runtime import aio

CORES = os.cpu_count() or 1
FEATURES, CLASSES, SAMPLES = 64, 10, 18  # digits MLP; 179,750 samples over 10,000 phones


def _cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _cpu_of(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _bare_server(port: int, answer: bytes, ready: Any) -> None:
    from aiohttp import web

    _raise_fd_limit()

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=answer, content_type="application/octet-stream")

    async def main() -> None:
        app = web.Application(client_max_size=1 << 20)
        app.router.add_post("/v1/update", handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, backlog=4096).start()
        ready.set()
        await asyncio.Event().wait()

    aio.run(main())


def _client(port: int, conns: int, body: bytes, window_s: float, out: Any) -> None:
    import aiohttp

    _raise_fd_limit()

    async def main() -> None:
        url = f"http://127.0.0.1:{port}/v1/update"
        headers = {"Content-Type": "application/octet-stream"}
        state = {"counting": False, "stop": False, "done": 0, "warm": 0}
        all_warm = asyncio.Event()
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=600)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as http:

            async def phone() -> None:
                first = True
                while not state["stop"]:
                    async with http.post(url, data=body, headers=headers) as resp:
                        await resp.read()
                    if first:
                        first = False
                        state["warm"] += 1
                        if state["warm"] == conns:
                            all_warm.set()
                    if state["counting"]:
                        state["done"] += 1

            tasks = [asyncio.create_task(phone()) for _ in range(conns)]
            await all_warm.wait()
            await asyncio.sleep(1.0)
            out.put("start")
            state["counting"], c0, t0 = True, _cpu_self(), time.perf_counter()
            await asyncio.sleep(window_s)
            state["counting"], c1, t1 = False, _cpu_self(), time.perf_counter()
            out.put("stop")
            out.put((state["done"], t1 - t0, c1 - c0))
            state["stop"] = True
            await asyncio.gather(*tasks, return_exceptions=True)

    aio.run(main())


def http_floor(conns: int, body: bytes, answer: bytes, window_s: float) -> dict[str, Any]:
    """One bare aiohttp server process and one client process at ``conns`` connections."""
    ctx = mp.get_context("spawn")
    port, ready, out = free_port(), ctx.Event(), ctx.Queue()
    server = ctx.Process(target=_bare_server, args=(port, answer, ready), daemon=True)
    server.start()
    if not ready.wait(120):
        raise RuntimeError("bare server did not start")
    client = ctx.Process(target=_client, args=(port, conns, body, window_s, out), daemon=True)
    client.start()
    try:
        out.get(timeout=600)
        s0 = _cpu_of(server.pid or 0)
        out.get(timeout=600)
        s1 = _cpu_of(server.pid or 0)
        done, wall, client_cpu = out.get(timeout=600)
        client.join(60)
    finally:
        for p in (client, server):
            if p.is_alive():
                p.kill()
    return {
        "part": "http", "conns": conns, "requests_per_s": done / wall,
        "client_ms": 1e3 * client_cpu / done, "server_ms": 1e3 * (s1 - s0) / done,
        "total_ms": 1e3 * (client_cpu + s1 - s0) / done,
    }


def _best_us(fn: Callable[[], object], number: int, repeats: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=repeats)) / number * 1e6


def protocol_work(group: int, repeats: int) -> tuple[list[dict[str, Any]], bytes, bytes]:
    """Per-update CPU of the work at each end, in microseconds; the update and model messages."""
    import torch

    from fedfleet.device_runtime.batched import train_many
    from fedfleet.device_runtime.runtimes.base import TrainConfig
    from fedfleet.export.models import ModelSpec, build_model
    from fedfleet.protocol import EncoderConfig, TensorSpec, UpdateEncoder, decode_message, encode_message
    from fedfleet.protocol.signing import PhoneKey, signature_ok, signed_text

    torch.set_num_threads(1)
    model = build_model(ModelSpec("mlp", (1, 8, 8), CLASSES), seed=0)
    params = {n: p.detach().numpy().copy() for n, p in model.named_parameters()}
    specs = {n: TensorSpec(tuple(v.shape), "float32") for n, v in params.items()}
    rng = np.random.default_rng(0)
    jobs = [(rng.standard_normal((SAMPLES, 1, 8, 8)).astype(np.float32), rng.integers(0, CLASSES, SAMPLES),
             np.random.default_rng(i)) for i in range(group)]
    cfg = TrainConfig(local_epochs=1, batch_size=16, lr=0.05)
    train_many(model, params, jobs[:8], cfg)  # warm-up
    t_train = min(timeit.repeat(lambda: train_many(model, params, jobs, cfg), number=1, repeat=repeats)) / group * 1e6
    delta = {n: (rng.standard_normal(v.shape) * 1e-3).astype(np.float32) for n, v in params.items()}
    meta = {"update_id": "phone-1-1", "base_version": 3, "num_examples": SAMPLES, "train_loss": 2.3, "round": 3}
    encoder = UpdateEncoder(EncoderConfig.from_mapping({}), np.random.default_rng(1))
    body = encoder.encode(delta, meta, staleness=0)
    answer = encode_message("model", {"version": 3, "task": {"action": "train", "version": 3, "round": 3}}, params)
    key = PhoneKey()
    headers = key.headers("phone-1", 3, "phone-1-1", body)
    public = base64.b64decode(key.public_b64())
    sig = base64.b64decode(headers["X-Fedfleet-Signature"])
    text = signed_text("phone-1", 3, "phone-1-1", body, int(headers["X-Fedfleet-Nonce"]))
    assert signature_ok(public, sig, text)
    n = 2000
    rows = [
        {"part": "phone: train (vmapped, per phone)", "us": t_train},
        {"part": "phone: encode update", "us": _best_us(lambda: encoder.encode(delta, meta, staleness=0), n, repeats)},
        {"part": "phone: sign (Ed25519 + SHA-256)",
         "us": _best_us(lambda: key.headers("phone-1", 3, "phone-1-1", body), n, repeats)},
        {"part": "server: verify (Ed25519 + SHA-256)",
         "us": _best_us(lambda: signature_ok(public, sig, signed_text("phone-1", 3, "phone-1-1", body, 1)), n, repeats)},
        {"part": "server: decode update", "us": _best_us(lambda: decode_message(body, expected=specs), n, repeats)},
    ]
    return rows, body, answer


def measured_rates() -> dict[str, float]:
    """fedfleet's and Flower's updates/s at 10,000 phones from the last bench_flower run."""
    path = RESULTS / "flower.json"
    if not path.exists():
        return {}
    rates: dict[str, float] = {}
    for r in json.loads(path.read_text()).get("runs", []):
        if r.get("phones") != 10000 or "error" in r:
            continue
        name = r["system"] + (" (server process)" if r.get("server_process") else "")
        for key, label in (("updates_per_s", ""), ("steady_updates_per_s", " steady")):
            if r.get(key):
                rates[name + label] = max(rates.get(name + label, 0.0), float(r[key]))
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conns", default="100,1000,10000")
    ap.add_argument("--window-s", type=float, default=8.0)
    ap.add_argument("--group", type=int, default=512, help="phones trained together for the per-phone training time")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    work, body, answer = protocol_work(args.group, args.repeats)
    print(table(work, ["part", "us"]), flush=True)
    http = [http_floor(int(c), body, answer, args.window_s) for c in args.conns.split(",")]
    print(table(http, ["part", "conns", "requests_per_s", "client_ms", "server_ms", "total_ms"]), flush=True)
    work_ms = sum(r["us"] for r in work) / 1e3
    ceilings = []
    for h in http:
        floor_ms = h["total_ms"] + work_ms
        # both ends busy on their own core at best: the slower end bounds the rate as well
        phone_ms = h["client_ms"] + sum(r["us"] for r in work if r["part"].startswith("phone")) / 1e3
        server_ms = h["server_ms"] + sum(r["us"] for r in work if r["part"].startswith("server")) / 1e3
        bound = min(CORES / floor_ms, 1 / phone_ms, 1 / server_ms) * 1e3
        ceilings.append({"conns": h["conns"], "floor_ms_per_update": floor_ms, "phone_ms": phone_ms,
                         "server_ms": server_ms, "ceiling_updates_per_s": bound})
    rates = measured_rates()
    flower = rates.get("flower", 0.0)
    for c in ceilings:
        c["ceiling_vs_flower"] = c["ceiling_updates_per_s"] / flower if flower else None
    print(table(ceilings, ["conns", "floor_ms_per_update", "phone_ms", "server_ms", "ceiling_updates_per_s",
                           "ceiling_vs_flower"]))
    for name, rate in sorted(rates.items()):
        print(f"  measured at 10,000 phones (results/flower.json): {name}: {rate:.1f} updates/s"
              + (f" ({rate / flower:.1f}x Flower)" if flower and not name.startswith("flower") else ""))
    path = write("floor", {"cores": CORES, "update_bytes": len(body), "answer_bytes": len(answer), "work": work,
                           "http": http, "ceilings": ceilings, "measured_10k": rates,
                           "args": vars(args)})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
