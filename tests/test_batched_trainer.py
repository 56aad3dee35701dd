"""``BatchedTrainer``: results handed back chunk by chunk on the wall clock, together on a virtual
clock, equal to per-phone training, and a failing chunk reported to every phone still waiting."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

from device_runtime import trainer
from device_runtime.batched import Chunk, Params
from device_runtime.runtimes.base import TrainConfig, TrainResult
from device_runtime.runtimes.torch_runtime import TorchRuntime
from device_runtime.trainer import BatchedTrainer
from device_runtime.vclock import VirtualClock
from export.models import ModelSpec, build_model
from tests.test_batched import assert_same, make_jobs, per_phone

# Distinct step counts at batch 4, so the longest-first order (and so each chunk's phones) is known.
SIZES = (5, 17, 9, 21, 13, 1)
CFG = TrainConfig(local_epochs=1, batch_size=4, lr=0.1)
FIRST_CHUNK = {3, 1, 4}  # the three phones with the most steps (21, 17, 13 examples)
CHUNK = 3


class Gate:
    """Wraps ``train_chunks`` so the worker thread stops after handing over the first chunk until
    the test opens the gate; ``fail`` makes the second chunk raise instead of training."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fail: bool = False) -> None:
        self.handed = threading.Event()  # the first chunk was handed over
        self.open = threading.Event()
        real = trainer.train_chunks

        def gated(*args: Any, **kwargs: Any) -> Iterator[Chunk]:
            for i, chunk in enumerate(real(*args, **kwargs)):
                if i == 1:
                    self.open.wait(timeout=30)
                    if fail:
                        raise RuntimeError("chunk 2 failed")
                yield chunk
                if i == 0:
                    self.handed.set()

        monkeypatch.setattr(trainer, "train_chunks", gated)

    async def wait_handed(self) -> None:
        """Returns once the worker handed over chunk 1. Its results, if queued on the loop
        (call_soon_threadsafe), are queued before this wakes up, so they are set by then."""
        assert await asyncio.to_thread(self.handed.wait, 30)


@pytest.fixture
def setup(digits: Any) -> tuple[torch.nn.Module, Params, list[Any]]:
    torch.set_num_threads(1)
    model = build_model(ModelSpec("mlp", digits.input_shape, digits.num_classes), seed=2)
    params = TorchRuntime(model).get_params()
    return model, params, make_jobs(digits.x_train, digits.y_train, seed=5, sizes=SIZES)


def submit_all(pool: BatchedTrainer, params: Params, jobs: list[Any]) -> list[asyncio.Future[tuple[Params, TrainResult]]]:
    return [pool.submit(params, x, y, CFG, rng, key=1) for x, y, rng in jobs]


async def test_wall_clock_hands_back_each_chunk_as_soon_as_it_is_trained(
    setup: Any, digits: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, params, jobs = setup
    gate = Gate(monkeypatch)
    pool = BatchedTrainer(model, chunk=CHUNK, min_group=2, quiet_s=0.001)
    try:
        futures = submit_all(pool, params, jobs)
        await gate.wait_handed()
        assert {i for i, f in enumerate(futures) if f.done()} == FIRST_CHUNK  # the rest still training
        gate.open.set()
        got = await asyncio.gather(*futures)
    finally:
        gate.open.set()
        pool.close()
    assert pool.group_sizes == [len(SIZES)]
    want = per_phone(model, params, make_jobs(digits.x_train, digits.y_train, seed=5, sizes=SIZES), CFG)
    assert_same(list(got), want, atol=1e-5, rtol=1e-5)
    assert all(d.dtype == np.float32 for delta, _ in got for d in delta.values())


async def test_virtual_clock_hands_back_the_group_together(setup: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """At one virtual instant, which phone goes on first must not depend on the worker's speed."""
    model, params, jobs = setup
    gate = Gate(monkeypatch)
    clock = VirtualClock()
    pool = BatchedTrainer(model, chunk=CHUNK, min_group=2)
    pool.bind(clock)
    try:
        futures = submit_all(pool, params, jobs)
        clock.before_advance[0]()  # the clock is about to move on: the group is released
        await gate.wait_handed()
        await asyncio.sleep(0.05)
        assert not any(f.done() for f in futures)
        gate.open.set()
        await asyncio.gather(*futures)
    finally:
        gate.open.set()
        pool.close()


async def test_a_failing_chunk_reaches_every_phone_still_waiting(setup: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    model, params, jobs = setup
    gate = Gate(monkeypatch, fail=True)
    pool = BatchedTrainer(model, chunk=CHUNK, min_group=2, quiet_s=0.001)
    try:
        futures = submit_all(pool, params, jobs)
        await gate.wait_handed()
        gate.open.set()
        outcomes = await asyncio.gather(*futures, return_exceptions=True)
    finally:
        gate.open.set()
        pool.close()
    for i, outcome in enumerate(outcomes):
        if i in FIRST_CHUNK:
            assert isinstance(outcome, tuple)  # trained before the failure: kept
        else:
            assert isinstance(outcome, RuntimeError) and str(outcome) == "chunk 2 failed"
    assert pool.group_sizes == []  # a failed group is not counted as a call


async def test_small_group_trains_on_the_eager_runtime_and_equals_per_phone(setup: Any, digits: Any) -> None:
    model, params, jobs = setup
    pool = BatchedTrainer(model, chunk=CHUNK, min_group=len(SIZES) + 1, quiet_s=0.001)
    try:
        got = await asyncio.gather(*submit_all(pool, params, jobs))
    finally:
        pool.close()
    want = per_phone(model, params, make_jobs(digits.x_train, digits.y_train, seed=5, sizes=SIZES), CFG)
    assert_same(list(got), want, atol=0.0)
