"""Faults on loopback (issue 7): churn, retries and kill -9, against a real ``fedfleet serve`` process.

    .venv/bin/python -m bench.bench_faults [churn|retry|crash|all] [--phones 500] [--drops 0.1,0.3]
                                           [--kills 50] [--seed 0]

* churn: ``--phones`` phones upload at once; a seeded fraction drop the connection mid-body (raw
  socket: headers and part of the body, then FIN or RST), half of those retry with a complete
  upload. Zero 5xx on either side of the wire, and the published model equals an offline numpy
  FedAvg of exactly the acknowledged updates.
* retry: every update is re-sent 1-3 times (also after a lost response: the phone sends the whole
  request and vanishes before reading the reply), signed phones re-sign; merged exactly once.
* crash: ``--kills`` kill -9 of the server at seeded moments while phones upload (some aimed at the
  upload that completes a round, i.e. mid-merge / mid-checkpoint); after each kill the SQLite file
  must hold every acknowledged update (pending or merged, never both), versions never go back, and
  at the end the model equals a replay of the phones' log. Recovery = spawn -> first 200 from
  ``/v1/status``, for an MLP on 92x92 inputs (1,084,810 parameters).

Prints a table and writes ``bench/results/faults.json``. The scenario functions take a server URL
and are reused by tests/test_churn.py, tests/test_retry.py and tests/test_crash_soak.py.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from fedfleet.device_runtime import aio
from fedfleet.protocol import decode_message, encode_message
from fedfleet.protocol.signing import PhoneKey

HOST = "127.0.0.1"
Params = dict[str, np.ndarray]
EXAMPLE_CAP = 10_000  # ServerConfig.example_cap: an update weighs min(num_examples, cap)


# --- a real server process ---------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    return json.dumps(str(v))


class ServerProcess:
    """``python -m fedfleet.cli serve`` with a ``[server]`` TOML, its state in ``data_dir``."""

    def __init__(self, data_dir: Path, dataset: str, settings: dict[str, Any], model: str = "mlp") -> None:
        self.data_dir, self.port = Path(data_dir), free_port()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.config = self.data_dir / "server.toml"
        self.config.write_text("[server]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in settings.items()))
        self.log = self.data_dir / "server.log"
        self.args = [sys.executable, "-m", "fedfleet.cli", "serve", "--host", HOST, "--port", str(self.port),
                     "--data-dir", str(self.data_dir), "--config", str(self.config), "--model", model,
                     "--dataset", dataset]
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    async def start(self, timeout_s: float = 120.0) -> float:
        """Spawn the server and return the seconds until ``/v1/status`` first answers 200."""
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # evaluation: one thread
        with self.log.open("ab") as log:
            t0 = time.perf_counter()
            self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=log, env=env)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
            while time.perf_counter() - t0 < timeout_s:
                try:
                    async with http.get(f"{self.url}/v1/status") as r:
                        if r.status == 200:
                            return time.perf_counter() - t0
                except (aiohttp.ClientError, TimeoutError):
                    pass
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}")
                await asyncio.sleep(0.005)
        raise TimeoutError(f"server did not answer within {timeout_s} s")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill9()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def unhandled_errors(self) -> int:
        """Tracebacks the server logged (an unhandled exception is a bug even if nobody saw the 500)."""
        return self.log_text().count("Traceback")


@contextlib.asynccontextmanager
async def running_app(**settings: Any) -> AsyncIterator[str]:
    """The real app in this process on a loopback port, run the way ``fedfleet serve`` runs it
    (``web.AppRunner`` defaults; aiohttp's TestServer instead cancels a handler whose client
    went away, which hides what a dropped connection does to the production server)."""
    from aiohttp import web

    from fedfleet.server.app import make_app
    from fedfleet.server.config import ServerConfig

    config = ServerConfig(model="mlp", input_shape=(1, 8, 8), num_classes=10).replace(**settings)
    runner = web.AppRunner(make_app(config), access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, HOST, port).start()
    try:
        yield f"http://{HOST}:{port}"
    finally:
        await runner.cleanup()


# --- emulated phones ---------------------------------------------------------------------------
@dataclass
class Phone:
    name: str
    token: str
    key: PhoneKey | None = None

    def headers(self, meta: dict[str, Any] | None = None, body: bytes = b"") -> dict[str, str]:
        h = {"Authorization": f"Bearer {self.token}"}
        if self.key is not None and meta is not None:  # signed again for every attempt (fresh nonce)
            h.update(self.key.headers(self.name, meta["base_version"], meta["update_id"], body))
        return h


@dataclass
class Update:
    phone: int
    update_id: str
    base_version: int
    num_examples: int
    seed: tuple[int, ...]  # the delta is regenerated from this (a 1M-parameter log stays small)

    def meta(self) -> dict[str, Any]:
        return {"update_id": self.update_id, "base_version": self.base_version, "num_examples": self.num_examples,
                "train_loss": 1.0, "round": self.base_version + 1}

    def delta(self, specs: Sequence[dict[str, Any]], scale: float = 0.1) -> Params:
        rng = np.random.default_rng(list(self.seed))
        return {p["name"]: rng.normal(0.0, scale, size=p["shape"]).astype(np.float32) for p in specs}

    def body(self, specs: Sequence[dict[str, Any]]) -> bytes:
        return encode_message("update", self.meta(), self.delta(specs))


async def register(http: aiohttp.ClientSession, url: str, name: str, signed: bool = False) -> tuple[Phone, dict[str, Any]]:
    key = PhoneKey() if signed else None
    payload: dict[str, Any] = {"name": name, **({"public_key": key.public_b64()} if key else {})}
    async with http.post(f"{url}/v1/register", json=payload) as r:
        if r.status != 201:
            raise RuntimeError(f"register {name}: {r.status} {await r.text()}")
        body = await r.json()
    return Phone(name, body["token"], key), body["task"]


async def checkin(http: aiohttp.ClientSession, url: str, phone: Phone) -> dict[str, Any]:
    async with http.post(f"{url}/v1/checkin", json={}, headers=phone.headers()) as r:
        if r.status != 200:
            raise RuntimeError(f"checkin {phone.name}: {r.status} {await r.text()}")
        answer: dict[str, Any] = await r.json()
        return answer


async def post_update(http: aiohttp.ClientSession, url: str, phone: Phone, upd: Update,
                      body: bytes) -> tuple[int, dict[str, Any]]:
    async with http.post(f"{url}/v1/update", data=body, headers=phone.headers(upd.meta(), body)) as r:
        try:
            answer = await r.json(content_type=None)
        except (json.JSONDecodeError, aiohttp.ContentTypeError):
            answer = {"error": "not_json", "text": (await r.text())[:200]}
        return r.status, answer if isinstance(answer, dict) else {"answer": answer}


async def get_json(http: aiohttp.ClientSession, url: str, path: str) -> dict[str, Any]:
    async with http.get(f"{url}{path}") as r:
        r.raise_for_status()
        answer: dict[str, Any] = await r.json()
        return answer


async def get_model(http: aiohttp.ClientSession, url: str, phone: Phone) -> tuple[int, Params]:
    async with http.get(f"{url}/v1/model", headers=phone.headers()) as r:
        r.raise_for_status()
        msg = decode_message(await r.read())
    return int(msg.meta["version"]), msg.tensors


async def wait_version(http: aiohttp.ClientSession, url: str, version: int, timeout_s: float = 120.0) -> dict[str, Any]:
    t0 = time.perf_counter()
    while True:
        st = await get_json(http, url, "/v1/status")
        if st["version"] >= version:
            return st
        if time.perf_counter() - t0 > timeout_s:
            raise TimeoutError(f"version {version} not published within {timeout_s} s: {st}")
        await asyncio.sleep(0.02)


async def raw_post(port: int, path: str, headers: dict[str, str], body: bytes, send: int, how: str,
                   stall_s: float = 0.0, wait_s: float = 60.0) -> None:
    """Send the request line, ``headers`` (Content-Length of the whole ``body``) and the first
    ``send`` bytes of ``body`` over a raw socket, stall ``stall_s`` (the server's handler is then
    waiting for the rest), and vanish: ``fin`` closes normally, ``reset`` aborts (RST), ``reply``
    waits until the server's answer reaches this socket and closes without reading it (a
    response lost on the way back)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, (HOST, port))
        head = f"POST {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Length: {len(body)}\r\n" \
               "Content-Type: application/octet-stream\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        await loop.sock_sendall(sock, head.encode() + b"\r\n" + body[:send])
        await asyncio.sleep(stall_s)
        if how == "reply":
            readable: asyncio.Future[None] = loop.create_future()
            loop.add_reader(sock.fileno(), lambda: None if readable.done() else readable.set_result(None))
            try:
                await asyncio.wait_for(readable, wait_s)
            finally:
                loop.remove_reader(sock.fileno())
        elif how == "reset":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        elif how != "fin":
            raise ValueError(f"unknown way to vanish {how!r}")
    finally:
        sock.close()


def server_statuses(metrics_text: str, endpoint: str | None = None) -> dict[int, int]:
    """HTTP statuses the server answered, from its Prometheus ``fedfleet_http_requests_total``
    (this counts answers to phones that had already gone away, which no client sees)."""
    out: dict[int, int] = {}
    for line in metrics_text.splitlines():
        if line.startswith("fedfleet_http_requests_total{"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
            if endpoint is None or labels.get("endpoint") == endpoint:
                status = int(labels["status"])
                out[status] = out.get(status, 0) + int(float(line.rsplit(" ", 1)[1]))
    return out


def metric_value(metrics_text: str, name: str) -> float:
    for line in metrics_text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


async def scrape(http: aiohttp.ClientSession, url: str) -> str:
    async with http.get(f"{url}/metrics") as r:
        return await r.text()


# --- the offline recomputation (numpy, written independently of server/aggregation.py) ---------------
def fedavg(params: Params, updates: Sequence[tuple[Params, int]], server_lr: float = 1.0) -> Params:
    """One FedAvg merge as the server defines it: weights min(examples, cap), the weighted mean in
    float64, new = (old + server_lr * mean) cast back to the parameters' dtype."""
    w = np.array([min(n, EXAMPLE_CAP) for _, n in updates], dtype=np.float64)
    w = w / w.sum()
    out: Params = {}
    for name, p in params.items():
        mean = np.zeros(p.shape, dtype=np.float64)
        for (delta, _), wi in zip(updates, w, strict=True):
            mean += wi * delta[name].astype(np.float64)
        out[name] = (p.astype(np.float64) + server_lr * mean).astype(p.dtype)
    return out


def max_abs_diff(a: Params, b: Params) -> float:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max(float(np.max(np.abs(a[n].astype(np.float64) - b[n].astype(np.float64)))) for n in a)


TOLERANCE = 1e-6  # float64 sums in another order may move a float32 result by an ulp (~1e-8 here)


def _request_kinds(statuses: Sequence[int]) -> dict[str, int]:
    return {"2xx": sum(200 <= s < 300 for s in statuses), "4xx": sum(400 <= s < 500 for s in statuses),
            "5xx": sum(s >= 500 for s in statuses)}


# --- churn ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ChurnPlan:
    phones: int
    dropped: tuple[int, ...]  # phones whose first upload drops mid-body
    retried: tuple[int, ...]  # ...of which these retry with a complete upload
    cuts: tuple[float, ...]  # per phone: the fraction of the body sent before the drop
    resets: tuple[bool, ...]  # per phone: drop with RST instead of FIN
    examples: tuple[int, ...]
    delays: tuple[float, ...]  # per phone: seconds before the retry
    stalls: tuple[float, ...]  # per phone: seconds between the partial body and the drop
    seed: int

    @property
    def completing(self) -> int:
        return self.phones - len(self.dropped) + len(self.retried)


def churn_plan(phones: int, drop: float, seed: int, retry_share: float = 0.5) -> ChurnPlan:
    rng = np.random.default_rng([seed, phones, int(drop * 1000)])
    dropped = np.sort(rng.choice(phones, size=int(round(drop * phones)), replace=False))
    retried = np.sort(rng.choice(dropped, size=int(round(retry_share * len(dropped))), replace=False))
    return ChurnPlan(phones, tuple(int(i) for i in dropped), tuple(int(i) for i in retried),
                     tuple(float(x) for x in rng.uniform(0, 1, phones)),
                     tuple(bool(x) for x in rng.random(phones) < 0.5),
                     tuple(int(x) for x in rng.integers(1, 200, phones)),
                     tuple(float(x) for x in rng.uniform(0, 0.2, phones)),
                     tuple(float(x) for x in rng.uniform(0.005, 0.05, phones)), seed)


def churn_settings(plan: ChurnPlan) -> dict[str, Any]:
    """One synchronous round that closes exactly when every update that will be acknowledged
    has arrived: the target is the number of phones that complete an upload, so a dropped body
    counted by mistake would close the round early (and the late phones would get 409)."""
    return {"mode": "sync", "rounds": 1, "sample_fraction": 1e-6, "min_cohort": plan.completing,
            "over_selection": plan.phones / plan.completing + 0.01, "round_timeout_s": 3600.0,
            "max_concurrent_uploads": plan.phones + 16}


async def run_churn(url: str, plan: ChurnPlan, prefix: str = "churn") -> dict[str, Any]:
    """Register, check in, then every phone uploads at once; dropped phones vanish mid-body."""
    port = int(url.rsplit(":", 1)[1])
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300)) as http:
        reg = await asyncio.gather(*(register(http, url, f"{prefix}-{i:04d}") for i in range(plan.phones)))
        phones, specs = [p for p, _ in reg], reg[0][1]["params"]
        answers = await asyncio.gather(*(checkin(http, url, p) for p in phones))
        assert all(a["action"] == "train" for a in answers), [a for a in answers if a["action"] != "train"][:3]
        version0, v0 = await get_model(http, url, phones[0])
        updates = [Update(i, f"{prefix}-{i}-r{version0}", version0, plan.examples[i], (plan.seed, i, version0))
                   for i in range(plan.phones)]
        bodies = [u.body(specs) for u in updates]
        dropped, retried = set(plan.dropped), set(plan.retried)
        statuses: list[int] = []
        acked: dict[int, dict[str, Any]] = {}

        async def phone_task(i: int) -> None:
            if i in dropped:
                cut = int(plan.cuts[i] * len(bodies[i]))
                await raw_post(port, "/v1/update", phones[i].headers(updates[i].meta(), bodies[i]), bodies[i], cut,
                               "reset" if plan.resets[i] else "fin", plan.stalls[i])
                if i not in retried:
                    return
                await asyncio.sleep(plan.delays[i])
            status, answer = await post_update(http, url, phones[i], updates[i], bodies[i])
            statuses.append(status)
            if status == 200:
                acked[i] = answer

        t0 = time.perf_counter()
        await asyncio.gather(*(phone_task(i) for i in range(plan.phones)))
        upload_s = time.perf_counter() - t0
        st = await wait_version(http, url, version0 + 1, timeout_s=60)
        version1, v1 = await get_model(http, url, phones[0])
        rounds = (await get_json(http, url, "/v1/rounds"))["rounds"]
        metrics = await scrape(http, url)
    expected = fedavg(v0, [(updates[i].delta(specs), updates[i].num_examples) for i in sorted(acked)])
    light = min(acked, key=lambda i: updates[i].num_examples)  # the check must see one update more or less
    without = fedavg(v0, [(updates[i].delta(specs), updates[i].num_examples) for i in sorted(acked) if i != light])
    server = server_statuses(metrics)
    return {
        "phones": plan.phones, "dropped": len(plan.dropped), "retried": len(plan.retried),
        "expected_acks": plan.completing, "acked": len(acked),
        "duplicates": sum(bool(a.get("duplicate")) for a in acked.values()),
        "client": _request_kinds(statuses), "server_5xx": sum(n for s, n in server.items() if s >= 500),
        "server_statuses": {str(k): v for k, v in sorted(server.items())},
        "incomplete_body": int(sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                                   if line.startswith("fedfleet_rejected_requests_total{") and "incomplete_body" in line)),
        "version": version1, "status_version": st["version"],
        "merged": rounds[-1]["updates"] if rounds else 0,
        "max_abs_diff": max_abs_diff(v1, expected), "one_update_effect": max_abs_diff(expected, without),
        "upload_s": upload_s,
    }


def churn_ok(r: dict[str, Any]) -> bool:
    return (r["client"]["5xx"] == 0 and r["server_5xx"] == 0 and r["acked"] == r["expected_acks"] == r["merged"]
            and r["client"]["4xx"] == 0 and r["max_abs_diff"] <= TOLERANCE < r["one_update_effect"])


# --- retries -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RetryPlan:
    phones: int
    rounds: int
    signed: tuple[bool, ...]  # per phone
    copies: tuple[tuple[int, ...], ...]  # [round][phone]: extra sends of the update, 1..3
    lost: tuple[tuple[str, ...], ...]  # [round][phone]: "" or how the first send's response is lost
    late: tuple[tuple[bool, ...], ...]  # [round][phone]: the last copy is re-sent after the round merged
    examples: tuple[tuple[int, ...], ...]
    seed: int


def retry_plan(phones: int, seed: int, rounds: int = 2) -> RetryPlan:
    rng = np.random.default_rng([seed, phones, 7])
    signed = tuple(bool(x) for x in rng.random(phones) < 0.5)

    def per_round(draw: Any) -> tuple[tuple[Any, ...], ...]:
        return tuple(tuple(draw()) for _ in range(rounds))

    copies = per_round(lambda: (int(x) for x in rng.integers(1, 4, phones)))
    lost = per_round(lambda: (str(x) for x in rng.choice(["", "", "reply", "fin"], phones)))
    late = per_round(lambda: (bool(x) for x in rng.random(phones) < 0.3))
    examples = per_round(lambda: (int(x) for x in rng.integers(1, 200, phones)))
    return RetryPlan(phones, rounds, signed, copies, lost, late, examples, seed)


def retry_settings(plan: RetryPlan) -> dict[str, Any]:
    """Every round needs all phones (a duplicate counted twice would close it one update early)."""
    return {"mode": "sync", "rounds": plan.rounds, "sample_fraction": 1.0, "round_timeout_s": 3600.0,
            "max_concurrent_uploads": 4 * plan.phones + 16}


async def run_retry(url: str, plan: RetryPlan, prefix: str = "retry") -> dict[str, Any]:
    port = int(url.rsplit(":", 1)[1])
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300)) as http:
        reg = await asyncio.gather(*(register(http, url, f"{prefix}-{i:04d}", plan.signed[i])
                                     for i in range(plan.phones)))
        phones, specs = [p for p, _ in reg], reg[0][1]["params"]
        version0, params = await get_model(http, url, phones[0])
        v0 = params
        statuses: list[int] = []
        fresh: dict[str, int] = {}  # update id -> answers with duplicate False
        dup_answers = 0
        lost_processed = lost_unprocessed = 0
        merged_into: dict[str, int] = {}
        late: list[tuple[int, Update]] = []
        log: list[list[Update]] = []

        async def send(i: int, upd: Update, body: bytes) -> dict[str, Any]:
            nonlocal dup_answers
            status, answer = await post_update(http, url, phones[i], upd, body)
            statuses.append(status)
            if status == 200:
                if answer.get("duplicate"):
                    dup_answers += 1
                    if "merged_into" in answer:
                        merged_into.setdefault(upd.update_id, int(answer["merged_into"]))
                else:
                    fresh[upd.update_id] = fresh.get(upd.update_id, 0) + 1
            return answer

        async def phone_round(r: int, i: int, version: int) -> None:
            nonlocal lost_processed, lost_unprocessed
            upd = Update(i, f"{prefix}-{i}-v{version}", version, plan.examples[r][i], (plan.seed, i, version))
            log[r].append(upd)
            body = upd.body(specs)
            extra = plan.copies[r][i]
            if plan.lost[r][i]:  # the first send's answer never reaches the phone
                await raw_post(port, "/v1/update", phones[i].headers(upd.meta(), body), body, len(body), plan.lost[r][i])
                extra -= 1
                answer = await send(i, upd, body)  # the phone retries (signed again)
                if answer.get("duplicate"):
                    lost_processed += 1
                else:
                    lost_unprocessed += 1
            else:
                await send(i, upd, body)
            for k in range(extra):
                if k == extra - 1 and plan.late[r][i]:
                    late.append((i, upd))
                else:
                    await send(i, upd, body)

        t0 = time.perf_counter()
        for r in range(plan.rounds + 1):
            # Copies of the previous round's updates, re-sent while this round's uploads arrive.
            resends, late[:] = [send(i, upd, upd.body(specs)) for i, upd in late], []
            if r == plan.rounds:
                await asyncio.gather(*resends)
                break
            log.append([])
            answers = await asyncio.gather(*(checkin(http, url, p) for p in phones))
            assert all(a["action"] == "train" for a in answers), answers[:3]
            version = int(answers[0]["version"])
            await asyncio.gather(*(phone_round(r, i, version) for i in range(plan.phones)), *resends)
            await wait_version(http, url, version + 1, timeout_s=60)
        elapsed = time.perf_counter() - t0
        final_version, final = await get_model(http, url, phones[0])
        rounds = (await get_json(http, url, "/v1/rounds"))["rounds"]
        metrics = await scrape(http, url)
    expected = v0
    for r in range(plan.rounds):
        expected = fedavg(expected, [(u.delta(specs), u.num_examples) for u in log[r]])
    doubled = fedavg(v0, [(u.delta(specs), u.num_examples) for u in log[0] + log[0][:1]])
    once = fedavg(v0, [(u.delta(specs), u.num_examples) for u in log[0]])
    wrong_merge = {uid: v for uid, v in merged_into.items()
                   if v != next(u.base_version + 1 for r in log for u in r if u.update_id == uid)}
    server = server_statuses(metrics)
    sends = plan.phones * plan.rounds + sum(map(sum, plan.copies))
    return {
        "phones": plan.phones, "rounds": plan.rounds, "signed": sum(plan.signed), "sends": sends,
        "updates": plan.phones * plan.rounds,
        "lost_responses": sum(bool(x) for row in plan.lost for x in row),
        "lost_processed": lost_processed, "lost_unprocessed": lost_unprocessed,
        "client": _request_kinds(statuses), "server_5xx": sum(n for s, n in server.items() if s >= 500),
        "fresh_acks_max": max(fresh.values()) if fresh else 0, "fresh_acks": sum(fresh.values()),
        "duplicate_answers": dup_answers, "merged_into_wrong": len(wrong_merge),
        "late_resends": sum(bool(x) for row in plan.late for x in row),
        "merged_per_round": [row["updates"] for row in rounds],
        "updates_merged_metric": metric_value(metrics, "fedfleet_updates_merged_total"),
        "version": final_version, "max_abs_diff": max_abs_diff(final, expected),
        "double_merge_effect": max_abs_diff(doubled, once), "wall_s": elapsed,
    }


def retry_ok(r: dict[str, Any]) -> bool:
    return (r["client"]["5xx"] == 0 and r["client"]["4xx"] == 0 and r["server_5xx"] == 0
            and r["fresh_acks_max"] == 1 and r["fresh_acks"] + r["lost_processed"] == r["updates"]
            and r["merged_per_round"] == [r["phones"]] * r["rounds"] and r["merged_into_wrong"] == 0
            and r["updates_merged_metric"] == r["updates"] and r["version"] == r["rounds"]
            and r["max_abs_diff"] <= TOLERANCE < r["double_merge_effect"])


# --- crash soak ----------------------------------------------------------------------------------
def crash_settings() -> dict[str, Any]:
    """Rounds forever; each needs every phone, so round v+1 merges exactly the updates based on v."""
    return {"mode": "sync", "rounds": 0, "sample_fraction": 1.0, "round_timeout_s": 3600.0}


@dataclass
class _Load:
    """The phones' side of a crash soak: what each phone sent, and what the server acknowledged."""

    phones: list[Phone]
    specs: list[dict[str, Any]]
    seed: int
    up: asyncio.Event = field(default_factory=asyncio.Event)
    stop: bool = False
    log: dict[str, Update] = field(default_factory=dict)  # every update any phone sent
    acked: set[str] = field(default_factory=set)
    in_flight: dict[int, Update] = field(default_factory=dict)  # phone -> upload awaiting its answer
    acked_at: dict[int, set[int]] = field(default_factory=dict)  # base version -> phones acknowledged
    completing: asyncio.Event = field(default_factory=asyncio.Event)  # the round's last upload is on the wire
    completing_s: list[float] = field(default_factory=list)  # how long such uploads took
    max_version_seen: int = 0
    errors: list[str] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)

    def round_closing(self, base_version: int) -> bool:
        """Every phone's update on this version is acknowledged or on the wire, some on the wire:
        the server is receiving, merging or checkpointing the round."""
        on_wire = {i for i, u in self.in_flight.items() if u.base_version == base_version}
        return bool(on_wire) and len(self.acked_at.get(base_version, set()) | on_wire) == len(self.phones)


async def _phone_loop(load: _Load, http: aiohttp.ClientSession, url: str, i: int) -> None:
    rng = np.random.default_rng([load.seed, i, 99])
    phone, seq = load.phones[i], 0
    while not load.stop:
        await load.up.wait()
        try:
            answer = await checkin(http, url, phone)
            if answer["action"] != "train":
                await asyncio.sleep(0.02)
                continue
            version = int(answer["version"])
            load.max_version_seen = max(load.max_version_seen, version)
            upd = Update(i, f"p{i}-u{seq}", version, int(rng.integers(1, 200)), (load.seed, i, seq))
            seq += 1
            load.log[upd.update_id] = upd
            body = upd.body(load.specs)
            while True:  # until acknowledged: after a crash, check in again and re-send the same update
                load.in_flight[i] = upd
                completing = load.round_closing(upd.base_version)
                if completing:
                    load.completing.set()
                t0 = time.perf_counter()
                try:
                    status, answer = await post_update(http, url, phone, upd, body)
                finally:
                    load.in_flight.pop(i, None)
                load.statuses.append(status)
                if status == 200:
                    if completing:
                        load.completing_s.append(time.perf_counter() - t0)
                    load.acked.add(upd.update_id)
                    load.acked_at.setdefault(upd.base_version, set()).add(i)
                    break
                load.errors.append(f"{upd.update_id}: {status} {answer}")
                return
        except RuntimeError as exc:  # a check-in answered with an error status
            load.errors.append(str(exc))
            return
        except (aiohttp.ClientError, ConnectionError, TimeoutError):
            await asyncio.sleep(0.05)  # the server is down: wait for it, check in, re-send
            while not load.stop:
                await load.up.wait()
                try:
                    await checkin(http, url, phone)
                except (aiohttp.ClientError, ConnectionError, TimeoutError, RuntimeError):
                    await asyncio.sleep(0.05)
                    continue
                if upd_pending := _unacked(load, i):
                    try:
                        status, answer = await post_update(http, url, phone, upd_pending, upd_pending.body(load.specs))
                    except (aiohttp.ClientError, ConnectionError, TimeoutError):
                        await asyncio.sleep(0.05)
                        continue
                    load.statuses.append(status)
                    if status != 200:
                        load.errors.append(f"{upd_pending.update_id} after restart: {status} {answer}")
                        return
                    load.acked.add(upd_pending.update_id)
                    load.acked_at.setdefault(upd_pending.base_version, set()).add(i)
                break


def _unacked(load: _Load, i: int) -> Update | None:
    mine = [u for u in load.log.values() if u.phone == i and u.update_id not in load.acked]
    return mine[-1] if mine else None


def _db_state(data_dir: Path) -> tuple[int, dict[str, int], set[str]]:
    """(newest version, merged update -> version, pending updates) read from the server's SQLite file."""
    db = sqlite3.connect(data_dir / "server.sqlite")
    try:
        version = int(db.execute("SELECT MAX(version) FROM versions").fetchone()[0])
        merged = {str(u): int(v) for u, v in db.execute("SELECT update_id, version FROM merged")}
        pending = {str(u) for (u,) in db.execute("SELECT update_id FROM pending")}
    finally:
        db.close()
    return version, merged, pending


async def run_crash(server: ServerProcess, phones: int, kills: int, seed: int, aimed_share: float = 0.5,
                    max_gap_s: float = 1.5) -> dict[str, Any]:
    """``kills`` kill -9 at seeded moments while ``phones`` phones upload; checks after each one."""
    rng = np.random.default_rng([seed, kills, 13])
    recoveries: list[float] = []
    moments: dict[str, int] = {}
    violations: list[str] = []
    first_start = await server.start()
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as http:
        reg = [await register(http, server.url, f"crash-{i}") for i in range(phones)]
        load = _Load([p for p, _ in reg], reg[0][1]["params"], seed)
        version0, v0 = await get_model(http, server.url, load.phones[0])
        load.up.set()
        workers = [asyncio.create_task(_phone_loop(load, http, server.url, i)) for i in range(phones)]
        last_version = version0
        t_start = time.perf_counter()
        for k in range(kills):
            aimed = bool(rng.random() < aimed_share)
            if aimed:  # at the upload that completes a round: mid-body, mid-merge or mid-checkpoint
                load.completing.clear()
                try:
                    await asyncio.wait_for(load.completing.wait(), 30)
                except TimeoutError:
                    violations.append(f"kill {k}: no round completed within 30 s")
                typical = float(np.median(load.completing_s)) if load.completing_s else 0.05
                await asyncio.sleep(float(rng.uniform(0, 1.5 * typical)))
            else:
                await asyncio.sleep(float(rng.uniform(0.05, max_gap_s)))
            acked_before = set(load.acked)
            in_flight = list(load.in_flight.values())
            completing = [u for u in in_flight if load.round_closing(u.base_version)]
            load.up.clear()
            server.kill9()
            version, merged, pending = _db_state(server.data_dir)
            if completing:
                committed = any(u.base_version < version for u in completing)
                moment = "round-completing upload, merge committed" if committed else \
                         "round-completing upload, not committed"
            else:
                moment = "mid-upload" if in_flight else "between requests"
            moments[moment] = moments.get(moment, 0) + 1
            lost = acked_before - set(merged) - pending
            both = set(merged) & pending
            if lost:
                violations.append(f"kill {k}: acknowledged but in neither merged nor pending: {sorted(lost)[:5]}")
            if both:
                violations.append(f"kill {k}: both merged and pending: {sorted(both)[:5]}")
            if version < max(last_version, load.max_version_seen):
                violations.append(f"kill {k}: version went back to {version} (seen {load.max_version_seen})")
            last_version = version
            recoveries.append(await server.start())
            st = await get_json(http, server.url, "/v1/status")
            if st["version"] != version:
                violations.append(f"kill {k}: restarted at version {st['version']}, the file holds {version}")
            load.up.set()
        await asyncio.sleep(0.5)
        load.stop = True
        await asyncio.wait_for(asyncio.gather(*workers), 60)
        soak_s = time.perf_counter() - t_start
        st = await get_json(http, server.url, "/v1/status")
        final_version, final = await get_model(http, server.url, load.phones[0])
        metrics = await scrape(http, server.url)
    server.stop()
    version, merged, pending = _db_state(server.data_dir)
    by_base: dict[int, list[Update]] = {}
    for u in load.log.values():
        if u.update_id in load.acked:
            by_base.setdefault(u.base_version, []).append(u)
    replay = v0
    for v in range(version0, final_version):  # round v+1 = every phone's update based on v
        round_updates = by_base.get(v, [])
        if len(round_updates) != phones:
            violations.append(f"version {v + 1}: the log has {len(round_updates)} acknowledged updates, not {phones}")
        for u in round_updates:
            if merged.get(u.update_id) != v + 1:
                violations.append(f"{u.update_id} (base {v}) merged into {merged.get(u.update_id)}, not {v + 1}")
        replay = fedavg(replay, [(u.delta(load.specs), u.num_examples) for u in round_updates])
    unmerged = {u for u in load.acked if u not in merged}
    if unmerged != pending or any(load.log[u].base_version != final_version for u in unmerged):
        violations.append(f"acknowledged but unmerged {sorted(unmerged)[:5]} != pending {sorted(pending)[:5]}")
    if set(merged) - load.acked:
        violations.append(f"merged but never acknowledged: {sorted(set(merged) - load.acked)[:5]}")
    diff = max_abs_diff(final, replay)
    server_5xx = sum(n for s, n in server_statuses(metrics).items() if s >= 500)
    params = sum(int(np.prod(p["shape"])) for p in load.specs)
    return {
        "phones": phones, "kills": kills, "params": params, "first_start_s": first_start,
        "recovery_s": recoveries, "recovery_p50_s": float(np.median(recoveries)),
        "recovery_p95_s": float(np.percentile(recoveries, 95)), "recovery_max_s": float(np.max(recoveries)),
        "moments": moments, "versions": final_version, "acked": len(load.acked), "merged": len(merged),
        "pending_at_end": len(pending), "status_version": st["version"], "max_abs_diff": diff,
        "client": _request_kinds(load.statuses), "server_5xx_since_last_start": server_5xx,
        "unhandled_errors": server.unhandled_errors(), "errors": load.errors[:10],
        "violations": violations[:20], "soak_s": soak_s,
    }


def crash_ok(r: dict[str, Any]) -> bool:
    return (not r["violations"] and not r["errors"] and r["client"]["5xx"] == 0 and r["client"]["4xx"] == 0
            and r["server_5xx_since_last_start"] == 0 and r["unhandled_errors"] == 0
            and r["max_abs_diff"] <= TOLERANCE and r["versions"] > 0)


# --- the benchmark ---------------------------------------------------------------------------------
async def bench_churn(phones: int, drops: Sequence[float], seed: int, work: Path) -> list[dict[str, Any]]:
    rows = []
    for drop in drops:
        plan = churn_plan(phones, drop, seed)
        server = ServerProcess(work / f"churn-{drop}", "digits", churn_settings(plan))
        await server.start()
        try:
            r = await run_churn(server.url, plan)
        finally:
            server.stop()
        r.update(scenario=f"churn {drop:.0%}", unhandled_errors=server.unhandled_errors())
        r["ok"] = churn_ok(r) and r["unhandled_errors"] == 0
        rows.append(r)
        print(f"  churn {drop:.0%}: {json.dumps({k: r[k] for k in ('acked', 'client', 'server_5xx', 'max_abs_diff', 'ok')})}",
              flush=True)
    return rows


async def bench_retry(phones: int, seed: int, work: Path) -> dict[str, Any]:
    plan = retry_plan(phones, seed)
    server = ServerProcess(work / "retry", "digits", retry_settings(plan))
    await server.start()
    try:
        r = await run_retry(server.url, plan)
    finally:
        server.stop()
    r.update(scenario="retry", unhandled_errors=server.unhandled_errors())
    r["ok"] = retry_ok(r) and r["unhandled_errors"] == 0
    return r


async def bench_crash(phones: int, kills: int, seed: int, work: Path, dataset: str) -> dict[str, Any]:
    server = ServerProcess(work / "crash", dataset, crash_settings())
    try:
        r = await run_crash(server, phones, kills, seed)
    finally:
        server.stop()
    r.update(scenario="crash", dataset=dataset)
    r["ok"] = crash_ok(r) and r["recovery_max_s"] < 2.0
    return r


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="?", default="all", choices=["churn", "retry", "crash", "all"])
    p.add_argument("--phones", type=int, default=500, help="churn phones (default 500)")
    p.add_argument("--drops", default="0.1,0.3", help="churn: fractions dropped mid-body")
    p.add_argument("--retry-phones", type=int, default=100)
    p.add_argument("--kills", type=int, default=50)
    p.add_argument("--crash-phones", type=int, default=4)
    p.add_argument("--crash-dataset", default="synthetic:50:92", help="92x92 inputs: a 1.08M-parameter MLP")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from bench.common import table, write

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="fedfleet-faults-") as tmp:
        work = Path(tmp)
        if args.what in ("churn", "all"):
            results["churn"] = aio.run(bench_churn(args.phones, [float(x) for x in args.drops.split(",")],
                                                   args.seed, work))
        if args.what in ("retry", "all"):
            results["retry"] = aio.run(bench_retry(args.retry_phones, args.seed, work))
        if args.what in ("crash", "all"):
            results["crash"] = aio.run(bench_crash(args.crash_phones, args.kills, args.seed, work,
                                                   args.crash_dataset))
    rows = []
    for r in results.get("churn", []):
        rows.append({"scenario": r["scenario"], "phones": r["phones"], "faults": f"{r['dropped']} dropped mid-body, "
                     f"{r['retried']} retried", "acked": r["acked"], "merged": r["merged"],
                     "client 5xx": r["client"]["5xx"], "server 5xx": r["server_5xx"],
                     "max|model-offline|": r["max_abs_diff"], "1 update moves": r["one_update_effect"],
                     "ok": r["ok"]})
    if "retry" in results:
        r = results["retry"]
        rows.append({"scenario": "retry", "phones": r["phones"], "faults": f"{r['sends']} sends of {r['updates']} "
                     f"updates, {r['lost_responses']} lost responses", "acked": r["fresh_acks"] + r["lost_processed"],
                     "merged": sum(r["merged_per_round"]), "client 5xx": r["client"]["5xx"],
                     "server 5xx": r["server_5xx"], "max|model-offline|": r["max_abs_diff"],
                     "1 update moves": r["double_merge_effect"], "ok": r["ok"]})
    if "crash" in results:
        r = results["crash"]
        rows.append({"scenario": "crash", "phones": r["phones"], "faults": f"{r['kills']} kill -9",
                     "acked": r["acked"], "merged": r["merged"], "client 5xx": r["client"]["5xx"],
                     "server 5xx": r["server_5xx_since_last_start"], "max|model-offline|": r["max_abs_diff"],
                     "ok": r["ok"]})
    columns = ["scenario", "phones", "faults", "acked", "merged", "client 5xx", "server 5xx", "max|model-offline|",
               "1 update moves", "ok"]
    print(table(rows, columns))
    if "crash" in results:
        r = results["crash"]
        print(f"crash: {r['params']:,} parameters, {r['versions']} versions, moments {r['moments']}; recovery "
              f"(spawn -> first 200 /v1/status) p50 {r['recovery_p50_s']:.2f} s, p95 {r['recovery_p95_s']:.2f} s, "
              f"max {r['recovery_max_s']:.2f} s (goal < 2 s); first start {r['first_start_s']:.1f} s")
        if r["violations"] or r["errors"]:
            print("crash violations:", r["violations"], r["errors"])
    path = write("faults", {"args": vars(args), "load_avg": os.getloadavg(), **results})
    print(f"wrote {path}")
    return 0 if all(row["ok"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
