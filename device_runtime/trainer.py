"""Local training off the event loop, on a small pool of shared runtimes.

An idle phone holds no model: a task borrows a runtime from the pool, loads the
downloaded parameters, trains, and returns the delta. Pool size = parallel trainings.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from collections.abc import Callable, Hashable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from fedfleet.device_runtime.batched import frozen_cut, train_many, vmap_failure
from fedfleet.device_runtime.runtimes import TrainConfig, TrainingRuntime, TrainResult
from fedfleet.device_runtime.runtimes.base import StatefulRuntime
from fedfleet.device_runtime.runtimes.torch_runtime import TorchRuntime
from fedfleet.export.frozen_prefix import FeatureCache
from fedfleet.export.task_loss import LossFn
from fedfleet.protocol.state import split_state, with_state

Params = dict[str, np.ndarray]
log = logging.getLogger(__name__)


class RuntimePool:
    def __init__(self, factory: Callable[[], TrainingRuntime], size: int = 1) -> None:
        if size < 1:
            raise ValueError("a runtime pool needs at least one runtime")
        self._free: asyncio.Queue[TrainingRuntime] = asyncio.Queue()
        for _ in range(size):
            self._free.put_nowait(factory())
        self._executor = ThreadPoolExecutor(max_workers=size, thread_name_prefix="fedfleet-train")
        self.size = size
        self.busy_s = 0.0  # thread CPU time spent in training arithmetic

    async def train(
        self, params: Mapping[str, np.ndarray], x: np.ndarray, y: np.ndarray, cfg: TrainConfig,
        rng: np.random.Generator, key: Hashable = None,
    ) -> tuple[Params, TrainResult]:
        """Train from ``params`` on (x, y); return (new params - params, result)."""
        runtime = await self._free.get()
        try:
            loop = asyncio.get_running_loop()
            delta, result, busy = await loop.run_in_executor(self._executor, _timed, _train_delta, runtime, params, x, y,
                                                             cfg, rng)
            self.busy_s += busy
            return delta, result
        finally:
            self._free.put_nowait(runtime)

    def submit(
        self, params: Mapping[str, np.ndarray], x: np.ndarray, y: np.ndarray, cfg: TrainConfig,
        rng: np.random.Generator, key: Hashable = None,
    ) -> asyncio.Future[tuple[Params, TrainResult]]:
        """Start one phone's training now; await the future for its result."""
        return asyncio.ensure_future(self.train(params, x, y, cfg, rng, key))

    def bind(self, clock: object) -> None:
        """Nothing to align with a virtual clock: each training starts when submitted."""

    def close(self) -> None:
        self._executor.shutdown(wait=True)


def _timed(fn: Callable[..., tuple[Params, TrainResult]], *args: object) -> tuple[Params, TrainResult, float]:
    t0 = time.thread_time()
    delta, result = fn(*args)
    return delta, result, time.thread_time() - t0


def _train_delta(
    runtime: TrainingRuntime,
    params: Mapping[str, np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    cfg: TrainConfig,
    rng: np.random.Generator,
) -> tuple[Params, TrainResult]:
    """(new params - params, with the end state under "state:" names, result); the start state is
    ``params``' state entries (a runtime without state support ignores them)."""
    params, state = split_state(params)
    runtime.set_params(params)
    if isinstance(runtime, StatefulRuntime):
        runtime.set_state(state)
    result = runtime.train(x, y, cfg, rng)
    new = runtime.get_params()
    delta = {n: (new[n] - params[n]).astype(np.float32) for n in params}
    if isinstance(runtime, StatefulRuntime):
        delta = with_state(delta, runtime.get_state())
    return delta, result


class BatchedTrainer:
    """Trains the phones that start from the same model version together (``train_many``:
    one vmapped step over their stacked parameters, equal to training them one by one up to
    float32 rounding). Groups run one at a time on one worker thread, beside the event loop; a group's
    chunks train on ``workers`` threads side by side (``train_many``; more threads may cut a group into more
    chunks, which moves a phone's floats only by rounding).

    Which requests form a group: on the wall clock, those for the same (version, plan)
    arriving until none came for ``quiet_s`` (a round's phones get their tasks in one burst),
    at most ``window_s`` after the first; on a virtual clock (``bind``), those submitted at the same
    virtual instant, flushed when the clock is about to move on, so grouping (and therefore
    every float) is the same from run to run. A group smaller than ``min_group`` trains phone
    by phone on the eager runtime (the reference path): a vmapped call costs a few plain steps
    of fixed overhead, so it only pays from about 4 phones on (bench/bench_batched.py). A model with a
    frozen backbone (``batched.frozen_cut``) trains batched at any group size: there the batched path
    runs the backbone once per phone's examples, the phone-by-phone path at every step.

    ``device`` (resolved: "cpu" or "cuda", export.accelerator.resolve_device) is where the vmapped
    groups train; the phone-by-phone path and the codec stay on the CPU. The worker thread's torch
    intra-op threads are the process's (fedfleet.tuning.set_torch_threads, before the first group)."""

    def __init__(self, model: torch.nn.Module, chunk: int = 128, window_s: float = 0.02, min_group: int = 4,
                 quiet_s: float = 0.003, release_every: int = 0, device: str = "cpu",
                 loss: LossFn | None = None, workers: int = 1) -> None:
        self.model, self.chunk, self.window_s, self.min_group = model, chunk, window_s, min_group
        self.workers = workers  # threads training a group's chunks side by side (train_many)
        self.device = device
        self.quiet_s = min(quiet_s, window_s)
        self.loss = loss  # the task's own (export/task_loss.py), per phone under vmap; None: cross-entropy
        # Its own copy: eager training moves batch norm buffers, which train_many reads as the start state.
        self._eager = TorchRuntime(copy.deepcopy(model), loss=loss)
        self._groups: dict[Hashable, list[_Request]] = {}
        self._arrivals: dict[Hashable, tuple[float, float]] = {}  # wall clock: group's first and last request
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedfleet-vmap")
        self._virtual = False
        self.busy_s = 0.0  # thread CPU time spent in training arithmetic
        self.calls = 0
        self.unbatchable: str | None = None  # why vmap cannot train the model ("" : it can; None: not known yet)
        self.group_sizes: list[int] = []
        self.features = FeatureCache()  # a frozen backbone's features of each phone's examples (train_many)
        # Wall clock, a server in another process: wake the phones of a finished group this many per
        # loop pass (0: all in one pass); see _run.
        self.release_every = release_every

    def bind(self, clock: object) -> None:
        """Group by virtual instant: flush whenever ``clock`` is about to advance."""
        hooks = getattr(clock, "before_advance", None)
        if hooks is not None:
            hooks.append(self._flush_all)
            self._virtual = True

    def submit(
        self, params: Mapping[str, np.ndarray], x: np.ndarray, y: np.ndarray, cfg: TrainConfig,
        rng: np.random.Generator, key: Hashable = None,
    ) -> asyncio.Future[tuple[Params, TrainResult]]:
        """Queue one phone's training; the future resolves once its group has run."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[tuple[Params, TrainResult]] = loop.create_future()
        group_key = (key if key is not None else id(params), cfg)
        group = self._groups.setdefault(group_key, [])
        if not self._virtual:
            now = loop.time()
            if not group:
                self._arrivals[group_key] = (now, now)
                loop.call_later(self.quiet_s, self._flush_when_quiet, group_key)
            else:
                self._arrivals[group_key] = (self._arrivals[group_key][0], now)
        group.append(_Request(params, x, y, rng, fut))
        return fut

    def _flush_when_quiet(self, group_key: Hashable) -> None:
        """Flush once no request has joined for ``quiet_s``, or ``window_s`` after the first."""
        if not self._groups.get(group_key):
            return
        now = asyncio.get_running_loop().time()
        first, last = self._arrivals[group_key]
        due = min(last + self.quiet_s, first + self.window_s)
        if now >= due - 1e-4:
            self._flush(group_key)
        else:
            asyncio.get_running_loop().call_later(due - now, self._flush_when_quiet, group_key)

    async def train(
        self, params: Mapping[str, np.ndarray], x: np.ndarray, y: np.ndarray, cfg: TrainConfig,
        rng: np.random.Generator, key: Hashable = None,
    ) -> tuple[Params, TrainResult]:
        return await self.submit(params, x, y, cfg, rng, key)

    def _flush_all(self) -> None:
        for group_key in list(self._groups):
            self._flush(group_key)

    def _flush(self, group_key: Hashable) -> None:
        group = self._groups.pop(group_key, [])
        self._arrivals.pop(group_key, None)
        if group:
            asyncio.ensure_future(self._run(group, group_key[1]))  # type: ignore[index]

    async def _run(self, group: list[_Request], cfg: TrainConfig) -> None:
        jobs = [(r.x, r.y, r.rng) for r in group]
        starts = [r.params for r in group]  # one version's parameters; the state may be each phone's own
        loop = asyncio.get_running_loop()
        try:
            results = await loop.run_in_executor(self._executor, self._train_group, starts, jobs, cfg)
        except Exception as exc:  # every phone of the group hears about it
            for r in group:
                if not r.fut.done():
                    r.fut.set_exception(exc)
            return
        self.calls += 1
        self.group_sizes.append(len(group))
        for i, (r, (delta, result)) in enumerate(zip(group, results, strict=True)):
            if not r.fut.done():
                r.fut.set_result(({n: d.astype(np.float32) if d.dtype.kind == "f" else d for n, d in delta.items()},
                                  result))
            if self.release_every and not self._virtual and (i + 1) % self.release_every == 0:
                # Woken all at once, every phone of the group would encode and sign its upload before
                # any went out (on Python 3.11 aiohttp writes a request's body from a task of its own,
                # which runs only after all that), leaving a server in another process idle meanwhile;
                # woken a few per loop pass, their uploads are on the wire while the next few encode.
                # (Not with the server on this loop: there its group commit would be cut into more
                # transactions; and a virtual clock keeps one instant's order as it is.)
                await asyncio.sleep(0)

    def _train_group(self, starts: list[Mapping[str, np.ndarray]],
                     jobs: list[tuple[np.ndarray, np.ndarray, np.random.Generator]],
                     cfg: TrainConfig) -> list[tuple[Params, TrainResult]]:
        if (len(jobs) >= self.min_group or self._cuts(jobs)) and self._batchable(starts[0], jobs):
            states = [split_state(p)[1] for p in starts]
            cpu: list[float] = []  # each training thread's
            try:
                return train_many(self.model, split_state(starts[0])[0], jobs, cfg, states=states, chunk=self.chunk,
                                  device=self.device, loss=self.loss, workers=self.workers, cpu_seconds=cpu,
                                  features=self.features)
            finally:
                self.busy_s += sum(cpu)
        t0 = time.thread_time()
        try:
            return [_train_delta(self._eager, p, x, y, cfg, rng) for p, (x, y, rng) in zip(starts, jobs, strict=True)]
        finally:
            self.busy_s += time.thread_time() - t0

    def _cuts(self, jobs: list[tuple[np.ndarray, np.ndarray, np.random.Generator]]) -> bool:
        """Whether the model has a frozen backbone train_many runs once per phone (``batched.frozen_cut``):
        then a group of any size trains batched, where the phone-by-phone path would run the backbone at
        every step."""
        if self.device != "cpu" or self.unbatchable:
            return False
        self.model.train()
        return frozen_cut(self.model, jobs) is not None

    def _batchable(self, params: Mapping[str, np.ndarray],
                   jobs: list[tuple[np.ndarray, np.ndarray, np.random.Generator]]) -> bool:
        """Whether vmap can train this model, found out once (on the first group with data): a model
        with an op vmap cannot batch (``aten::gru``), or a loss vmap cannot batch (one that calls
        ``.item()``), trains phone by phone, said in one log line."""
        if self.unbatchable is None:
            first = next(((x[:1], y[:1]) for x, y, _ in jobs if len(x)), None)
            if first is None:
                return True
            self.unbatchable = vmap_failure(self.model, params, first[0], self.loss, first[1]) or ""
            if self.unbatchable:
                log.warning("batched training cannot vmap this model (%s): its phones train one by one",
                            self.unbatchable)
        return not self.unbatchable

    def close(self) -> None:
        self._executor.shutdown(wait=True)


@dataclass
class _Request:
    params: Mapping[str, np.ndarray]
    x: np.ndarray
    y: np.ndarray
    rng: np.random.Generator
    fut: asyncio.Future[tuple[Params, TrainResult]]
