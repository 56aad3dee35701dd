"""Typed app keys and the background work around the coordinator (publishing, deadlines)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, fields
from pathlib import Path

from aiohttp import web

from fedfleet.protocol import decode_message
from fedfleet.server.config import ServerConfig
from fedfleet.server.coordinator import DRAFT, Coordinator
from fedfleet.server.evaluation import Evaluator
from fedfleet.server.metrics import RoundRecord
from fedfleet.server.security import NonceBook
from fedfleet.server.store import Store
from fedfleet.server.updates import Published

CONFIG = web.AppKey("config", ServerConfig)
STORE = web.AppKey("store", Store)
COORD = web.AppKey("coordinator", Coordinator)
EVALUATOR = web.AppKey("evaluator", Evaluator)
MODEL_FINGERPRINT = web.AppKey("model_fingerprint", str)  # export.task_model.model_fingerprint of the task's model
PUBLISH_QUEUE = web.AppKey("publish_queue", asyncio.Queue)
log = logging.getLogger("fedfleet.server")


@dataclass
class UploadGate:
    """Upload slots: uploads in progress (``active``), the uploads queued for a slot in arrival
    order, and whether the server is shutting down (then it takes no more).

    A queue rather than an immediate 503: when a merge hands out thousands of tasks at once, their
    uploads come back together, and answering all but the first few with "busy" made them back off
    for seconds (past the round's deadline at 10,000 phones). A queued upload has not been read:
    its body waits in its socket, so the queue costs little memory; it is still bounded in length
    and in time, and beyond either the answer is 503 as before."""

    active: int = 0
    closing: bool = False
    waiting: deque[asyncio.Future[None]] = field(default_factory=deque)

    async def enter(self, limit: int, max_waiting: int, wait_s: float) -> bool:
        """Take a slot: at once while fewer than ``limit`` are taken and nobody queues, else after
        the uploads queued before this one, waiting up to ``wait_s``. False (no slot taken) when
        the server is closing, the queue is full or the wait ran out."""
        if self.closing:
            return False
        if self.active < limit and not self.waiting:
            self.active += 1
            return True
        if len(self.waiting) >= max_waiting or wait_s <= 0:
            return False
        turn = asyncio.get_running_loop().create_future()
        self.waiting.append(turn)
        try:
            await asyncio.wait_for(asyncio.shield(turn), wait_s)
        except BaseException as exc:  # the wait ran out, or the request was cancelled (the phone left)
            if turn.done():  # handed a slot just as the wait ended: pass it on
                self.leave()
            else:
                turn.cancel()
                self.waiting.remove(turn)
            if isinstance(exc, TimeoutError):
                return False
            raise
        if self.closing:  # woken to learn that the server is shutting down
            self.leave()
            return False
        return True

    def leave(self) -> None:
        """Give a slot back: to the longest-waiting upload, if any (``active`` is unchanged)."""
        while self.waiting:
            turn = self.waiting.popleft()
            if not turn.done():
                turn.set_result(None)
                return
        self.active -= 1


class WorkSignal:
    """Wakes check-ins held for work (long poll) whenever work may have appeared: an update
    freed a slot, a merge opened a round, a deadline passed.

    Check-ins that were held go first: a phone whose check-in comes with its upload (which
    may itself have opened the round) waits in ``settled`` until every check-in the last
    notify woke has run again, so phones that sat a round out are not overtaken by those
    that just contributed (with sample 0.5, they would otherwise never get a seat)."""

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self._waiting = 0  # check-ins blocked in wait()
        self._waking = 0  # of those, woken by a notify and not yet running again
        self._settled = asyncio.Event()
        self._settled.set()

    def notify(self) -> None:
        self._event.set()
        self._event = asyncio.Event()
        self._waking = self._waiting  # everyone blocked now was woken (earlier wakers included)
        if self._waking:
            self._settled.clear()

    async def wait(self, timeout_s: float) -> None:
        event = self._event
        self._waiting += 1
        try:
            await asyncio.wait_for(event.wait(), timeout_s)
        except TimeoutError:
            pass
        finally:
            self._waiting -= 1
            if event.is_set():  # it was blocked when a notify came: counted in _waking
                self._waking -= 1
                if self._waking <= 0:
                    self._waking = 0
                    self._settled.set()

    async def settled(self) -> None:
        """Return once the check-ins woken by the last notify have all run again."""
        await self._settled.wait()


UPLOADS = web.AppKey("uploads", UploadGate)
WORK = web.AppKey("work", WorkSignal)
NONCES = web.AppKey("nonces", NonceBook)
TICK_S = 0.2
TICK_MAX_S = 10.0  # the longest pause between ticks after failed ones


def schedule_merge(app: web.Application) -> None:
    """Merge the open round now (a state change with no await) and queue its evaluation."""
    published = app[COORD].merge()
    app[PUBLISH_QUEUE].put_nowait(published)
    app[WORK].notify()


async def _publisher(app: web.Application) -> None:
    """Evaluate published versions off the event loop, in order, and record them.

    A version whose evaluation or recording raises is logged with its traceback and the publisher
    goes on with the next one: the version itself is durable, and its draft record, committed with
    it, is evaluated again at the next start (``recover_records``). Every version taken from the
    queue is marked done, so shutdown, which waits for the queue, is never held up by a failure."""
    queue: asyncio.Queue[Published] = app[PUBLISH_QUEUE]
    while True:
        pub = await queue.get()
        try:
            await _record(app, pub)
        except Exception:
            log.exception("recording version %d failed; its draft record stays in the store", pub.version)
        finally:
            queue.task_done()


async def _record(app: web.Application, pub: Published) -> None:
    coord, evaluator, data_dir = app[COORD], app.get(EVALUATOR), app[CONFIG].data_dir
    record = pub.record
    if evaluator is not None and pub.params:
        ev = await asyncio.to_thread(evaluator.evaluate, pub.params)
        record.accuracy, record.loss = ev.accuracy, ev.loss
        if ev.metrics:  # the task's own (--metrics), by their names
            record.extra["metrics"] = ev.metrics
    coord.record(record)  # replaces the draft committed with the version
    if data_dir:
        with (Path(data_dir) / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(coord.history[-1]) + "\n")  # the row just recorded (to_json once)


def recover_records(app: web.Application) -> None:
    """After a crash: make metrics.jsonl the recorded rounds again (the store is the truth: a kill
    may have come between a record and its line, or in the middle of a line), then queue the
    versions whose record is still a draft for the publisher, oldest first.

    A recovered record is the one committed with its version (counts, bytes, latencies, train
    loss, timings, robust report as of the merge) with ``recovered: true``; its accuracy and
    loss are evaluated now, on the version's stored parameters (none if the store no longer keeps
    that version), and its ``aggregate_ms`` leaves out the version's commit."""
    coord, store, data_dir = app[COORD], app[STORE], app[CONFIG].data_dir
    if data_dir is not None:
        path = Path(data_dir) / "metrics.jsonl"
        if coord.history or path.exists():
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(json.dumps(row) + "\n" for row in coord.history))
            os.replace(tmp, path)
    names = {f.name for f in fields(RoundRecord)} - {"extra"}
    for row in coord.drafts:
        known = {k: v for k, v in row.items() if k in names}
        extra = {k: v for k, v in row.items() if k not in names and k != DRAFT}
        record = RoundRecord(**known, extra={**extra, "recovered": True})
        blob = store.version_blob(record.version)
        params = decode_message(blob).tensors if blob is not None else {}
        app[PUBLISH_QUEUE].put_nowait(Published(record.version, params, record))
    coord.drafts = []


async def _ticker(app: web.Application) -> None:
    """Close rounds whose deadline passed even when no request arrives.

    A tick that raises (a merge whose strategy has a bug) is logged with its traceback and the
    ticker goes on: a merge changes nothing before the strategy's result has passed its checks
    (the round and its updates stay as they were), so the next tick tries the round again, as the
    next upload would. After a failure the ticks are spaced out, doubling up to ``TICK_MAX_S``, so a
    merge that fails every time logs a few lines a minute rather than five a second."""
    wait = TICK_S
    while True:
        await asyncio.sleep(wait)
        try:
            _tick(app)
        except Exception:
            wait = min(2 * wait, TICK_MAX_S)
            log.exception("closing round %d at its deadline failed; trying again in %.1f s",
                          app[COORD].merges + 1, wait)
        else:
            wait = TICK_S


def _tick(app: web.Application) -> None:
    coord = app[COORD]
    before = coord.openings()
    coord.tick()
    if coord.ready():
        schedule_merge(app)
    elif coord.openings() != before:
        app[WORK].notify()  # a slot timed out or a round restarted: held check-ins look again


async def stop_holding(app: web.Application) -> None:
    """On shutdown, before aiohttp waits for the requests in progress: held check-ins (long polls)
    answer now instead of waiting out ``checkin_hold_s`` for phones that may be gone, and new uploads
    are refused (503, retry later). ``background``'s cleanup then lets uploads in progress finish."""
    app[UPLOADS].closing = True
    app[WORK].notify()


async def background(app: web.Application) -> AsyncIterator[None]:
    app[PUBLISH_QUEUE] = asyncio.Queue()
    recover_records(app)
    app[COORD].open()  # the first period opens as the server starts serving
    tasks = [asyncio.create_task(_publisher(app)), asyncio.create_task(_ticker(app))]
    yield
    app[UPLOADS].closing = True  # graceful: acknowledged work is durable; refuse new uploads
    app[WORK].notify()
    for _ in range(100):  # let uploads in progress finish (at most ~5 s)
        if not app[UPLOADS].active:
            break
        await asyncio.sleep(0.05)
    await app[PUBLISH_QUEUE].join()  # finish recording what was merged
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    app[STORE].flush()  # nothing accepted is left only in memory
    app[STORE].close()
