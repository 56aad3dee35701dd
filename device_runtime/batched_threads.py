"""Chunks of a batched training call trained side by side on several threads.

Torch's kernels release the GIL, so two threads each running a chunk's vmapped steps use two cores;
what they cannot share is the model: ``torch.func.functional_call`` swaps a module's tensors for the
stacked ones while a call runs, and the batched layers are patched onto the modules. Each extra thread
therefore trains on a copy of the model's modules that shares every parameter and buffer with it (the
steps pass all of them explicitly; a copy costs the modules' Python objects, not their tensors). The
copies are kept per model and made once.

Which thread takes which chunk is first come, first served, but a chunk's result depends only on its
phones, so nothing a thread does changes any float.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from itertools import chain
from typing import TypeVar

from torch import nn

S = TypeVar("S")  # a step
R = TypeVar("R")  # one chunk's results

_COPIES: weakref.WeakKeyDictionary[nn.Module, list[nn.Module]] = weakref.WeakKeyDictionary()
_UNCOPYABLE: weakref.WeakSet[nn.Module] = weakref.WeakSet()
_LOCK = threading.Lock()
log = logging.getLogger(__name__)


def module_copies(model: nn.Module, count: int) -> list[nn.Module]:
    """Up to ``count`` copies of ``model``'s modules sharing its tensors (made on first use, then kept).
    A model that cannot be copied (a module holding a lock, an open file, a generator) gets none, said
    once in the log: its chunks then train on one thread."""
    with _LOCK:
        copies = _COPIES.setdefault(model, [])
        while len(copies) < count and model not in _UNCOPYABLE:
            shared = {id(t): t for t in chain(model.parameters(), model.buffers())}
            try:
                copies.append(copy.deepcopy(model, memo=shared))
            except Exception as exc:  # a user's module; its own training is unaffected
                _UNCOPYABLE.add(model)
                log.warning("batched training: %s cannot be copied for a second training thread (%s: %s); "
                            "its chunks train on one thread", type(model).__name__, type(exc).__name__, exc)
        return copies[:count]


def in_threads(model: nn.Module, chunks: Sequence[list[int]], workers: int,
               make: Callable[[nn.Module], AbstractContextManager[S]],
               train: Callable[[S, list[int]], list[R]], cpu_seconds: list[float] | None = None) -> Iterator[R]:
    """Every chunk's results: ``train(step, chunk)`` with ``step`` from ``make(model)`` on this thread when
    ``workers`` is 1, else on ``workers`` threads, each with its own copy of ``model``. A thread's
    exception is raised here (the first one's, in thread order). ``cpu_seconds`` gets each thread's CPU
    seconds."""
    models = [model, *module_copies(model, workers - 1)] if workers > 1 and len(chunks) > 1 else [model]
    if len(models) == 1:  # one thread, or a model that cannot be copied
        t0 = time.thread_time()
        try:
            with make(model) as step:
                for ids in chunks:
                    yield from train(step, ids)
        finally:
            if cpu_seconds is not None:
                cpu_seconds.append(time.thread_time() - t0)
        return
    queue = iter(chunks)
    taking = threading.Lock()

    def work(m: nn.Module) -> list[R]:
        t0 = time.thread_time()
        out: list[R] = []
        try:
            with make(m) as step:
                while True:
                    with taking:
                        ids = next(queue, None)
                    if ids is None:
                        return out
                    out.extend(train(step, ids))
        finally:
            if cpu_seconds is not None:
                cpu_seconds.append(time.thread_time() - t0)

    with ThreadPoolExecutor(max_workers=len(models), thread_name_prefix="fedfleet-chunk") as pool:
        futures = [pool.submit(work, m) for m in models]
        for f in futures:
            yield from f.result()
