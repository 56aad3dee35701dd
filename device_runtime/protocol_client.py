"""The phone's protocol client: register, check in, download, train through a runtime, encode,
sign, upload, retry.

It speaks only HTTP and the wire format of ``protocol/`` (FORMAT.md), and it is the one file a
port of the phone to another language reads. What the phone runs on comes in as a ``Device``:
a real phone's (``RealDevice``, the default) is there whenever it checks in, adds no time and
uploads what it trained; an emulated fleet's (``emulated_device.EmulatedDevice``) brings its
profile's compute and link times, its availability, its dropouts and its attacks through the
same hooks. The same code drives a single phone (``fedfleet phone``) and every phone of a fleet.
"""

from __future__ import annotations

import asyncio
import json
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Hashable, Iterator, Mapping
from typing import Any, Protocol

import aiohttp
import numpy as np

from fedfleet.device_runtime.clock import PhoneClock, WallClock
from fedfleet.device_runtime.phone_stats import PhoneStats
from fedfleet.device_runtime.runtimes import TrainConfig, TrainResult
from fedfleet.device_runtime.secagg_client import SecureRoundAborted, secure_round
from fedfleet.protocol import (
    EncoderConfig,
    ProtocolError,
    TensorMessage,
    TensorSpec,
    UpdateEncoder,
    decode_message,
)
from fedfleet.protocol.signing import PhoneKey
from fedfleet.protocol.state import STATE_PREFIX, split_state, with_state

Params = dict[str, np.ndarray]
Trained = tuple[Params, TrainResult]  # (new params - params, with end state under "state:" names; result)


class Examples(Protocol):
    """A phone's examples: the pair (x, y), or what makes it when unpacked (``x, y = examples``):
    an emulated fleet's phones gather theirs from the shared dataset when they train
    (``fleet_columns.Shard``)."""

    def __iter__(self) -> Iterator[np.ndarray]: ...


class ServerError(Exception):
    """The server refused a request; ``status`` and ``reason`` come from its JSON answer."""

    def __init__(self, status: int, reason: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status, self.reason, self.retry_after = status, reason, retry_after


class ModelMemo:
    """Model messages already decoded by some phone of this fleet, by their exact bytes: the
    phones handed tasks together get byte-identical answers (the server frames a burst once), and
    decoding the same bytes again would give the same tensors. Shared tensors are never written
    (runtimes copy parameters in). Keeps the last ``size`` messages."""

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self._items: OrderedDict[bytes, tuple[Mapping[str, TensorSpec], TensorMessage]] = OrderedDict()
        self.hits = 0

    def decode(self, payload: bytes, expected: Mapping[str, TensorSpec]) -> TensorMessage:
        hit = self._items.get(payload)
        if hit is not None and hit[0] == expected:
            self.hits += 1
            return hit[1]
        msg = decode_message(payload, expected=expected)
        self._items[payload] = (expected, msg)
        while len(self._items) > self.size:
            self._items.popitem(last=False)
        return msg


class Trainer(Protocol):
    """Runs local training through a runtime (ExecuTorch, ONNX Runtime, torch): ``trainer.RuntimePool``,
    or ``trainer.BatchedTrainer`` for many emulated phones at once. ``key``: the model version, which
    phones trained together share."""

    def submit(self, params: Mapping[str, np.ndarray], x: np.ndarray, y: np.ndarray, cfg: TrainConfig,
               rng: np.random.Generator, key: Hashable = None) -> Awaitable[Trained]:
        """Start training from ``params`` on (x, y); await the result."""


class Device(Protocol):
    """What the phone runs on, as the protocol sees it: when it is around, how long its work
    takes, whether it vanishes part way, what it uploads. A task calls the hooks in the order
    below; an emulated device draws from the phone's own generator inside them, so that order is
    part of a seeded run."""

    platform: str  # what the phone tells the server at registration

    def away_s(self) -> float:
        """Seconds before the phone can take part (0: it checks in now)."""

    async def downloaded(self, inline_bytes: int, fetched_bytes: int) -> None:
        """The task's model arrived: ``inline_bytes`` with the check-in's answer, or
        ``fetched_bytes`` over GET /v1/model (both 0: the phone held it already)."""

    async def train(self, training: Awaitable[Trained], examples: int, epochs: int) -> Trained | None:
        """The local training's result, awaited; None: the phone vanished while training."""

    def uploads(self, delta: Params) -> Params:
        """The update the phone sends for ``delta``."""

    def secure_drop(self) -> str | None:
        """In a secure round, the step after which the phone vanishes ("share", "masked"), or None."""

    def link_breaks(self, nbytes: int) -> int | None:
        """How many of an upload's ``nbytes`` go out before the link breaks; None: all of them."""

    async def uploading(self, nbytes: int) -> None:
        """``nbytes`` of the update go up (the request is made after)."""


class RealDevice:
    """A phone's own hardware: there whenever it checks in (the phone checks in when it can),
    nothing added to the time requests and training really take, never vanishing on purpose,
    uploading what it trained."""

    platform = "python"

    def away_s(self) -> float:
        return 0.0

    async def downloaded(self, inline_bytes: int, fetched_bytes: int) -> None:
        return None

    async def train(self, training: Awaitable[Trained], examples: int, epochs: int) -> Trained | None:
        return await training

    def uploads(self, delta: Params) -> Params:
        return delta

    def secure_drop(self) -> str | None:
        return None

    def link_breaks(self, nbytes: int) -> int | None:
        return None

    async def uploading(self, nbytes: int) -> None:
        return None


class ProtocolClient:
    """One phone against one server; ``run()`` is its whole life. ``data``: its examples (x, y);
    ``pool``: its trainer (set after ``register()`` if the task decides the runtime); ``rng``:
    every draw the phone makes (batch order, noise, back-off jitter), so a seed reproduces it;
    ``device``, ``clock``: what it runs on, a real phone's by default; ``sign``: Ed25519-signed
    uploads; ``inline_model``, ``chain_checkin``: the request shortcuts of FORMAT.md section 9."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        server: str,
        name: str,
        data: Examples,
        pool: Trainer | None,
        rng: np.random.Generator,
        *,
        device: Device | None = None,
        clock: PhoneClock | None = None,
        ledger: Any = None,
        sign: bool = True,
        train_overrides: Mapping[str, Any] | None = None,
        poll_session: aiohttp.ClientSession | None = None,
        inline_model: bool = True,
        models: ModelMemo | None = None,
        chain_checkin: bool = True,
        key: PhoneKey | None = None,
        model_fingerprint: str | None = None,
        enrolment_code: str | None = None,
    ) -> None:
        self.session, self.server, self.name = session, server.rstrip("/"), name
        self.model_fingerprint = model_fingerprint  # of the phone's own model: the server refuses another
        self.enrolment_code = enrolment_code  # the admin's single-use code, for a server that requires one
        self.poll_session = poll_session or session  # check-ins (long polls) may use their own connections
        self.device: Device = device or RealDevice()
        self.data = data
        self.pool, self.rng = pool, rng
        self.ledger = ledger  # protocol.privacy.PrivacyLedger: this side's count of releases
        self.encoder: UpdateEncoder | None = None
        # Ed25519 (the server then refuses unsigned or replayed uploads); ``key``: one made beforehand
        self.key = (key or PhoneKey()) if sign else None
        self._codec: dict[str, Any] | None = None
        self.train_overrides = dict(train_overrides or {})
        self.clock: PhoneClock = clock or WallClock()
        self.token = ""
        self.task: dict[str, Any] = {}
        self.stats = PhoneStats(name, _count(data))
        self._model: tuple[int, dict[str, np.ndarray]] | None = None
        self.inline_model = inline_model  # ask for the model inside the check-in's "train" answer
        self._inline_bytes = 0  # size of the check-in answer that brought the model, if one did
        self.models = models  # shared by a fleet's phones: identical model messages decoded once
        # The next check-in rides on the upload (one request per task): only for a phone that is
        # always available, as one that may be away checks in again when it is back.
        self.chain_checkin = chain_checkin
        self._next: dict[str, Any] | None = None  # a check-in answer that came with the upload's
        self._updates_sent = 0
        self.local_state = False
        self.own_state: dict[str, np.ndarray] = {}  # --local-state: the statistics this phone's training left

    # --- HTTP -----------------------------------------------------------------------------
    async def _request(self, method: str, path: str, *, json_body: Any = None, data: bytes | None = None,
                       headers: dict[str, str] | None = None,
                       session: aiohttp.ClientSession | None = None) -> tuple[int, bytes, Mapping[str, str]]:
        hdrs = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        hdrs.update(headers or {})
        body = data
        if json_body is not None:
            body = json.dumps(json_body).encode()
            hdrs["Content-Type"] = "application/json"
        async with (session or self.session).request(method, self.server + path, data=body, headers=hdrs) as resp:
            payload = await resp.read()
            self.stats.bytes_up += len(body or b"")
            self.stats.bytes_down += len(payload)
            if resp.status >= 400:
                err = _server_error(resp.status, payload)
                retry = resp.headers.get("Retry-After", "")
                err.retry_after = float(retry) if retry.replace(".", "", 1).isdigit() else None
                raise err
            return resp.status, payload, resp.headers

    async def _json(self, method: str, path: str, body: Any = None,
                    session: aiohttp.ClientSession | None = None) -> dict[str, Any]:
        _, payload, _ = await self._request(method, path, json_body=body if body is not None else {}, session=session)
        return _json_object(payload)

    def _decode_model(self, payload: bytes) -> TensorMessage:
        """A model message checked against the task's tensors (through the fleet's memo, if any);
        one the phone must refuse is the server's fault (502), counted like any bad answer."""
        try:
            if self.models is not None:
                return self.models.decode(payload, self.specs)
            return decode_message(payload, expected=self.specs)
        except ProtocolError as exc:
            raise ServerError(502, "bad_answer", f"model message refused ({exc.reason}): {exc}") from None

    # --- protocol steps ---------------------------------------------------------------------
    async def register(self) -> dict[str, Any]:
        enrol: dict[str, Any] = {"name": self.name, "platform": self.device.platform}
        if self.key is not None:
            enrol["public_key"] = self.key.public_b64()
        if self.model_fingerprint is not None:
            enrol["model_fingerprint"] = self.model_fingerprint
        if self.enrolment_code is not None:
            enrol["enrolment_code"] = self.enrolment_code
        # On the connection its check-ins (and chained uploads) will use: one set-up, not two.
        return self.registered(await self._json("POST", "/v1/register", enrol, session=self.poll_session))

    def registered(self, answer: Mapping[str, Any]) -> dict[str, Any]:
        """Take the registration's answer (``phone_id``, ``token``, ``task``): from POST /v1/register,
        or an admin's bulk registration of many phones (POST /v1/admin/phones)."""
        self.token, self.task = str(answer["token"]), dict(answer["task"])
        self.name = str(answer["phone_id"])
        self.specs = {p["name"]: TensorSpec(tuple(p["shape"]), p["dtype"]) for p in self.task["params"]}
        # A model with state (FORMAT.md section 11): shipped with the model, or kept here (--local-state).
        self.local_state = self.task.get("state_mode") == "local"
        if not self.local_state:
            self.specs.update({STATE_PREFIX + p["name"]: TensorSpec(tuple(p["shape"]), p["dtype"])
                               for p in self.task.get("state", [])})
        return self.task

    async def download(self, version: int) -> dict[str, np.ndarray]:
        """The model at ``version`` (the one the task was handed out for: in async mode the
        current version may already be newer). Versions never change, so a cached copy is reused."""
        if self._model is not None and self._model[0] == version:
            return self._model[1]
        _, payload, _ = await self._request("GET", f"/v1/model?version={version}")
        msg = self._decode_model(payload)
        if msg.meta.get("version") != version:
            raise ServerError(502, "bad_answer", f"asked for version {version}, got {msg.meta.get('version')}")
        self._model = (version, msg.tensors)
        return msg.tensors

    async def step(self) -> str:
        """One check-in and, when handed work, one local training task. Returns the action."""
        away = self.device.away_s()
        if away > 0:
            await self.clock.sleep(away)  # not idle-and-charging now
            return "away"
        answer, self._next = self._next or await self._checkin(), None
        self.stats.checkins += 1
        action = str(answer.get("action"))
        if action == "wait":
            await self.clock.sleep(float(answer.get("retry_after_s", 1.0)))
        elif action == "train":
            await self._train_and_upload(answer)
        return action

    async def _checkin(self) -> dict[str, Any]:
        """POST /v1/checkin. With ``inline_model`` a "train" answer may come as the model's wire
        message with the task in its meta (protocol/FORMAT.md section 9): the model is then
        kept as if downloaded, and no GET /v1/model follows."""
        if not self.inline_model:
            return await self._json("POST", "/v1/checkin", session=self.poll_session)
        _, payload, headers = await self._request("POST", "/v1/checkin", json_body={"inline_model": True},
                                                  session=self.poll_session)
        return self._checkin_answer(payload, headers)

    def _checkin_answer(self, payload: bytes, headers: Mapping[str, str]) -> dict[str, Any]:
        """A check-in's answer: JSON, or (asked for inline) the task's model message."""
        if not headers.get("Content-Type", "").startswith("application/octet-stream"):
            return _json_object(payload)
        msg = self._decode_model(payload)
        task, version = msg.meta.get("task"), msg.meta.get("version")
        if not isinstance(task, dict) or task.get("action") != "train" or task.get("version") != version \
                or not isinstance(version, int):
            raise ServerError(502, "bad_answer", "an inline model's meta must carry the train task for its version")
        self._model, self._inline_bytes = (version, msg.tensors), len(payload)
        return task

    async def _train_and_upload(self, task: dict[str, Any]) -> None:
        """Download, train, upload; the device adds the time each step takes on it, and may
        vanish part way (counted as a drop)."""
        device, clock = self.device, self.clock
        t0 = clock.now()
        version = int(task["version"])
        down_before = self.stats.bytes_down
        inline, self._inline_bytes = self._inline_bytes, 0
        params = await self.download(version)
        await device.downloaded(inline, self.stats.bytes_down - down_before)
        t1 = clock.now()
        self.stats.download_s.append(t1 - t0)
        plan = {**task["train"], **self.train_overrides}
        cfg = TrainConfig(**{k: plan[k] for k in ("local_epochs", "batch_size", "lr", "prox_mu")})
        if self.pool is None:
            raise RuntimeError("phone has no trainer: the fleet sets one after registration")
        if self.local_state and self.own_state:
            params = with_state(params, self.own_state)  # this phone's statistics, not the fleet's
        x, y = self.data
        training = self.pool.submit(params, x, y, cfg, self.rng, key=version)
        trained = await device.train(training, len(x), cfg.local_epochs)
        if trained is None:  # vanished mid-training: the server never hears back
            self.stats.drops += 1
            return
        delta, result = trained
        self._model = None  # an idle phone holds no model copy (memory stays flat in large fleets)
        delta, state = split_state(delta)
        delta = device.uploads(delta)
        t2 = clock.now()
        self.stats.train_s.append(t2 - t1)
        if plan.get("secure_agg"):  # masked integers through the four steps; a dropout vanishes after one
            await self._secure_upload(delta, task, t0, device.secure_drop())
            return
        self._updates_sent += 1
        meta = {
            "update_id": f"{self.name}-{self._updates_sent}",
            "base_version": version,
            "num_examples": result.num_examples,
            "train_loss": result.loss,
            "round": int(task["round"]),
        }
        encoder = self._encoder(plan.get("codec") or {})
        base = encoder.residual_base_version
        body = encoder.encode(delta, meta, staleness=max(version - base, 0) if base is not None else 0, state=state)
        if self.local_state:
            self.own_state = state
        release = encoder.release()
        if release is not None and self.ledger is not None:
            self.ledger.charge(self.name, release)  # spent once it leaves, whatever happens next
        cut = device.link_breaks(len(body))
        if cut is not None:
            await device.uploading(cut)
            encoder.rollback()  # the server never got it whole: keep the residual
            self.stats.drops += 1
            await self._send_truncated(body, cut, meta)
            return
        await device.uploading(len(body))  # arrives when fully sent
        try:
            answer = await self._upload(body, meta)
        except ServerError as exc:
            encoder.rollback()  # nothing was merged: keep the residual as it was
            if exc.status == 409:  # the round closed or the base got too stale: a straggler
                self.stats.rejected += 1
                return
            raise
        except (TimeoutError, aiohttp.ClientError):
            encoder.rollback()
            raise
        self.stats.upload_s.append(clock.now() - t2)
        self.stats.participations += 1
        self.stats.latencies_s.append(clock.now() - t0)
        rest = float(answer.get("next_checkin_s") or 0.0)
        if rest > 0:  # the server paces how often one phone contributes
            await clock.sleep(rest)

    async def _secure_upload(self, delta: dict[str, np.ndarray], task: dict[str, Any], t0: float,
                             drop_after: str | None) -> None:
        async def send(method: str, path: str, body: Any, raw: bytes | None) -> dict[str, Any]:
            if body is not None:
                return await self._json(method, path, body)
            hdrs = {"Content-Type": "application/octet-stream"} if raw is not None else None
            return _json_object((await self._request(method, path, data=raw, headers=hdrs))[1])

        try:
            outcome = await secure_round(send, self.clock.sleep, int(task["round"]), delta, list(self.specs),
                                         self.rng, drop_after=drop_after)
        except SecureRoundAborted:
            self.stats.rejected += 1  # the group aborted or closed without this phone: nothing merged
            return
        if outcome.dropped:
            self.stats.drops += 1
            return
        self.stats.participations += 1
        self.stats.latencies_s.append(self.clock.now() - t0)

    async def _send_truncated(self, body: bytes, cut: int, meta: dict[str, Any]) -> None:
        """Start the upload for real and lose the connection after ``cut`` of its bytes (the
        device's link broke): the server sees a body shorter than its Content-Length."""

        async def part() -> AsyncIterator[bytes]:
            yield body[:cut]
            raise ConnectionAbortedError("phone left coverage mid-upload")

        headers = {**self._upload_headers(body, meta), "Content-Length": str(len(body)),
                   "Authorization": f"Bearer {self.token}"}
        self.stats.bytes_up += cut
        try:
            async with self.session.post(self.server + "/v1/update", data=part(), headers=headers) as resp:
                await resp.read()  # not reached: the request cannot complete
        except (ConnectionAbortedError, aiohttp.ClientError, TimeoutError):
            pass

    def _upload_headers(self, body: bytes, meta: dict[str, Any]) -> dict[str, str]:
        """Content type and, with an enrolled key, a fresh signature over this upload."""
        headers = {"Content-Type": "application/octet-stream"}
        if self.key is not None:
            headers.update(self.key.headers(self.name, meta["base_version"], meta["update_id"], body))
        return headers

    async def _upload(self, body: bytes, meta: dict[str, Any], attempts: int = 8) -> dict[str, Any]:
        """POST the update; on 503/429 back off (Retry-After, doubled per attempt, jittered so that
        phones turned away together do not return together) and sign again."""
        path, session = "/v1/update", None
        if self.chain_checkin:  # held like a check-in once accepted: on this phone's own connection
            path, session = "/v1/update?checkin=" + ("inline" if self.inline_model else "json"), self.poll_session
        for attempt in range(attempts):
            try:
                _, payload, headers = await self._request("POST", path, data=body, session=session,
                                                          headers=self._upload_headers(body, meta))
                if headers.get("X-Fedfleet-Checkin") == "1":  # the answer is the next check-in's
                    answer = json.loads(headers.get("X-Fedfleet-Update", "{}"))
                    try:
                        self._next = self._checkin_answer(payload, headers)
                    except (ServerError, ValueError):
                        self._next = None  # the update was accepted; the next check-in is made anew
                else:
                    answer = json.loads(payload)
                return answer if isinstance(answer, dict) else {}
            except ServerError as exc:
                if exc.status not in (429, 503) or attempt == attempts - 1:
                    raise
                await self.clock.sleep((exc.retry_after or 1.0) * 2 ** min(attempt, 5) * (0.5 + self.rng.random()))
        return {}

    def _encoder(self, codec: dict[str, Any]) -> UpdateEncoder:
        """The update encoder the task asks for; kept across tasks for its error-feedback residual."""
        if self.encoder is None or codec != self._codec:
            self.encoder = UpdateEncoder(EncoderConfig.from_mapping(codec), self.rng.spawn(1)[0])
            self._codec = dict(codec)
        return self.encoder

    async def run(self, stop: asyncio.Event | None = None, max_errors: int = 20,
                  until: float | None = None, start_after: float = 0.0, joined: bool = False) -> PhoneStats:
        """Check in until the server says the task is done, ``stop`` is set, or the clock
        passes ``until``; the first check-in ``start_after`` seconds from now. A failed step
        (the server unreachable, restarting, or refusing) is retried with backoff (0.2 s doubled
        up to 10 s); the phone gives up, raising the error, after ``max_errors`` failures in a
        row (~2.5 min of a server gone), or at once on a 400 or 401 (retrying cannot help).
        ``joined``: the caller joined the clock for this phone already (it leaves when the run ends)."""
        backoff = 0.2
        failures = 0  # in a row: a server restarted now and then does not wear the phone out
        if not joined:
            self.clock.join()
        try:
            if start_after > 0:
                await self.clock.sleep(start_after)
            while (stop is None or not stop.is_set()) and (until is None or self.clock.now() < until):
                try:
                    if await self.step() == "done":
                        break
                    backoff, failures = 0.2, 0
                except (TimeoutError, aiohttp.ClientError, ServerError) as exc:
                    self.stats.errors += 1
                    failures += 1
                    if failures > max_errors or (isinstance(exc, ServerError) and exc.status in (400, 401)):
                        raise
                    await self.clock.sleep(backoff)
                    backoff = min(backoff * 2, 10.0)
        finally:
            self.clock.leave()
        return self.stats


def _count(data: Examples) -> int:
    examples = getattr(data, "examples", None)  # a fleet_columns.Shard knows without gathering
    if isinstance(examples, int):
        return examples
    x, _ = data
    return len(x)


def _json_object(payload: bytes) -> dict[str, Any]:
    answer = json.loads(payload)
    if not isinstance(answer, dict):
        raise ServerError(502, "bad_answer", "server answered with something other than a JSON object")
    return answer


def _server_error(status: int, payload: bytes) -> ServerError:
    try:
        data = json.loads(payload)
        return ServerError(status, str(data.get("error")), str(data.get("message")))
    except (ValueError, AttributeError):
        return ServerError(status, "http", payload[:200].decode(errors="replace"))
