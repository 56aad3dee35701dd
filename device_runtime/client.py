"""The phone's protocol client: register, check in, download, train, upload.

It speaks only HTTP and the wire format of ``protocol/``; the same code drives a single
phone (``fedfleet phone``) and every phone of an emulated fleet.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import numpy as np

from device_runtime.runtimes import TrainConfig
from device_runtime.trainer import RuntimePool
from protocol import TensorSpec, decode_message, encode_message

Encode = Callable[[Mapping[str, np.ndarray], dict[str, Any]], bytes]


class ServerError(Exception):
    """The server refused a request; ``status`` and ``reason`` come from its JSON answer."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status, self.reason = status, reason


@dataclass
class PhoneStats:
    """What one phone saw, from its side of the wire."""

    phone: str
    examples: int
    participations: int = 0
    rejected: int = 0
    errors: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    latencies_s: list[float] = field(default_factory=list)  # task handed out -> upload acknowledged
    train_s: list[float] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        lat = self.latencies_s
        return {
            "phone": self.phone,
            "examples": self.examples,
            "participations": self.participations,
            "rejected": self.rejected,
            "errors": self.errors,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "latency_mean_s": round(float(np.mean(lat)), 4) if lat else "",
            "train_mean_s": round(float(np.mean(self.train_s)), 4) if self.train_s else "",
        }


def dense_encoder(delta: Mapping[str, np.ndarray], meta: dict[str, Any]) -> bytes:
    return encode_message("update", meta, delta)


class PhoneClient:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        server: str,
        name: str,
        data: tuple[np.ndarray, np.ndarray],
        pool: RuntimePool,
        rng: np.random.Generator,
        *,
        encode: Encode = dense_encoder,
        train_overrides: Mapping[str, Any] | None = None,
        availability: float = 1.0,
    ) -> None:
        self.session, self.server, self.name = session, server.rstrip("/"), name
        self.x, self.y = data
        self.pool, self.rng, self.encode = pool, rng, encode
        self.train_overrides = dict(train_overrides or {})
        self.availability = availability
        self.token = ""
        self.task: dict[str, Any] = {}
        self.stats = PhoneStats(name, len(self.x))
        self._model: tuple[int, dict[str, np.ndarray]] | None = None
        self._updates_sent = 0

    # --- HTTP -----------------------------------------------------------------------------
    async def _request(self, method: str, path: str, *, json_body: Any = None, data: bytes | None = None,
                       headers: dict[str, str] | None = None) -> tuple[int, bytes, Mapping[str, str]]:
        hdrs = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        hdrs.update(headers or {})
        body = data
        if json_body is not None:
            body = json.dumps(json_body).encode()
            hdrs["Content-Type"] = "application/json"
        async with self.session.request(method, self.server + path, data=body, headers=hdrs) as resp:
            payload = await resp.read()
            self.stats.bytes_up += len(body or b"")
            self.stats.bytes_down += len(payload)
            if resp.status >= 400:
                raise _server_error(resp.status, payload)
            return resp.status, payload, resp.headers

    async def _json(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        _, payload, _ = await self._request(method, path, json_body=body if body is not None else {})
        answer = json.loads(payload)
        if not isinstance(answer, dict):
            raise ServerError(502, "bad_answer", "server answered with something other than a JSON object")
        return answer

    # --- protocol steps ---------------------------------------------------------------------
    async def register(self) -> dict[str, Any]:
        answer = await self._json("POST", "/v1/register", {"name": self.name, "platform": "emulated"})
        self.token, self.task = str(answer["token"]), dict(answer["task"])
        self.specs = {p["name"]: TensorSpec(tuple(p["shape"]), p["dtype"]) for p in self.task["params"]}
        return self.task

    async def download(self, version: int) -> dict[str, np.ndarray]:
        """The model at ``version``; a cached copy is revalidated with its ETag (304 = free)."""
        headers = {"If-None-Match": f'"v{self._model[0]}"'} if self._model else {}
        status, payload, resp_headers = await self._request("GET", "/v1/model", headers=headers)
        if status == 304 and self._model is not None:
            return self._model[1]
        msg = decode_message(payload, expected=self.specs)
        self._model = (int(msg.meta["version"]), msg.tensors)
        return msg.tensors

    async def step(self) -> str:
        """One check-in and, when handed work, one local training task. Returns the action."""
        if self.rng.random() >= self.availability:
            await asyncio.sleep(1.0)  # not idle-and-charging right now
            return "away"
        answer = await self._json("POST", "/v1/checkin")
        action = str(answer.get("action"))
        if action == "wait":
            await asyncio.sleep(float(answer.get("retry_after_s", 1.0)))
        elif action == "train":
            await self._train_and_upload(answer)
        return action

    async def _train_and_upload(self, task: dict[str, Any]) -> None:
        t0 = time.monotonic()
        version = int(task["version"])
        params = await self.download(version)
        plan = {**task["train"], **self.train_overrides}
        cfg = TrainConfig(**{k: plan[k] for k in ("local_epochs", "batch_size", "lr", "prox_mu")})
        t1 = time.monotonic()
        delta, result = await self.pool.train(params, self.x, self.y, cfg, self.rng)
        self.stats.train_s.append(time.monotonic() - t1)
        self._updates_sent += 1
        meta = {
            "update_id": f"{self.name}-{self._updates_sent}",
            "base_version": version,
            "num_examples": result.num_examples,
            "train_loss": result.loss,
            "round": int(task["round"]),
        }
        try:
            await self._request("POST", "/v1/update", data=self.encode(delta, meta),
                                headers={"Content-Type": "application/octet-stream"})
        except ServerError as exc:
            if exc.status == 409:  # the round closed without us: a straggler, not a failure
                self.stats.rejected += 1
                return
            raise
        self.stats.participations += 1
        self.stats.latencies_s.append(time.monotonic() - t0)

    async def run(self, stop: asyncio.Event | None = None, max_errors: int = 20) -> PhoneStats:
        """Check in until the server says the task is done (or ``stop`` is set)."""
        backoff = 0.2
        while stop is None or not stop.is_set():
            try:
                if await self.step() == "done":
                    break
                backoff = 0.2
            except (TimeoutError, aiohttp.ClientError, ServerError) as exc:
                self.stats.errors += 1
                if self.stats.errors > max_errors or (isinstance(exc, ServerError) and exc.status in (400, 401)):
                    raise
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
        return self.stats


def _server_error(status: int, payload: bytes) -> ServerError:
    try:
        data = json.loads(payload)
        return ServerError(status, str(data.get("error")), str(data.get("message")))
    except (ValueError, AttributeError):
        return ServerError(status, "http", payload[:200].decode(errors="replace"))
