"""Chunks of ``train_many`` on several threads (``batched_threads``): the cut into chunks; for a given
cut, results that do not depend on the threads, bit for bit; a cut for more threads, results equal to
one thread's up to rounding."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from fedfleet.device_runtime.batched import train_many
from fedfleet.device_runtime.batched_calls import chunk_bounds, chunk_phones
from fedfleet.device_runtime.batched_threads import module_copies
from fedfleet.device_runtime.runtimes.torch_runtime import TorchRuntime
from fedfleet.protocol.state import split_state
from tests.test_batched_state import (
    CFG,
    SIZES,
    BNDropoutCNN,
    assert_same,
    float64_model,
    make_jobs,
    per_phone,
)
from tests.test_batched_state import one_thread as one_thread  # autouse: one torch thread here too


def test_chunk_bounds_are_equal_and_cut_one_per_thread_that_keeps_its_least() -> None:
    assert chunk_bounds(50, 128, 25) == [(0, 50)]  # one thread: the fewest chunks
    assert chunk_bounds(50, 128, 25, threads=2) == [(0, 25), (25, 50)]
    assert chunk_bounds(50, 128, 30, threads=2) == [(0, 50)]  # two chunks would hold fewer than 30
    assert chunk_bounds(50, 128, 8, threads=3) == [(0, 17), (17, 34), (34, 50)]
    assert chunk_bounds(100, 64, 200) == [(0, 50), (50, 100)]  # at most 64: two
    assert chunk_bounds(10, 3, 1) == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert chunk_bounds(11, 4, 4, threads=8) == [(0, 4), (4, 8), (8, 11)]
    assert chunk_bounds(0, 8, 8) == []
    for n in range(1, 60):
        for most, least, threads in ((7, 3, 1), (16, 16, 2), (128, 9, 4)):
            sizes = [hi - lo for lo, hi in chunk_bounds(n, most, least, threads)]
            assert sum(sizes) == n and max(sizes) - min(sizes) <= 1 and max(sizes) <= max(most, 1)
            assert len(sizes) <= max(-(-n // most), threads)


def test_chunk_phones_follow_the_model_cost() -> None:
    assert chunk_phones(131, 16) == 25  # the digits CNN: three calls' worth of rows
    assert chunk_phones(11, 16) == 8  # a heavy model: at least 8 phones
    assert chunk_phones(4645, 16) > 128  # the digits MLP: never cut below the chunk limit


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_results_do_not_depend_on_which_thread_trains_a_chunk(digits: Any, dtype: torch.dtype) -> None:
    """Batch norm, dropout and FedProx, phones ending at different steps; the same four chunks on 1, 2
    and 3 threads give the same floats exactly."""
    model, params = float64_model(0.3)
    x = digits.x_train.astype(np.float64 if dtype == torch.float64 else np.float32)
    runs = []
    for workers in (1, 2, 3):
        cpu: list[float] = []
        runs.append(train_many(model, params, make_jobs(x, digits.y_train, 5), CFG, chunk=2, dtype=dtype,
                               workers=workers, cpu_seconds=cpu))
        assert len(cpu) == workers and all(c > 0 for c in cpu)
    for other in runs[1:]:
        for (d1, r1), (d2, r2) in zip(runs[0], other, strict=True):
            assert r1 == r2 and d1.keys() == d2.keys()
            for n in d1:
                np.testing.assert_array_equal(d1[n], d2[n])


SIXTEEN = (23, 0, 7, 16, 40, 2, 31, 10, 12, 9, 30, 1, 17, 24, 5, 8)


@pytest.mark.parametrize(("dtype", "atol"), [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_a_cut_for_more_threads_equals_one_thread_to_rounding(digits: Any, dtype: torch.dtype, atol: float) -> None:
    """16 phones, a chunk's fixed cost of one row: one thread trains one chunk, two threads two chunks
    of 8; every phone's update and state agree to rounding."""
    model, params = float64_model(0.3)
    x = digits.x_train.astype(np.float64 if dtype == torch.float64 else np.float32)
    runs = [train_many(model, params, make_jobs(x, digits.y_train, 4, SIXTEEN), CFG, dtype=dtype, call_rows=1,
                       workers=w) for w in (1, 2)]
    for (d1, r1), (d2, r2) in zip(*runs, strict=True):
        assert r1.steps == r2.steps and r1.num_examples == r2.num_examples and abs(r1.loss - r2.loss) <= atol
        for n in d1:
            np.testing.assert_allclose(d2[n], d1[n], rtol=0, atol=atol)


def test_threads_in_float64_equal_the_per_phone_loop(digits: Any) -> None:
    model, params = float64_model(0.3)
    x = digits.x_train.astype(np.float64)
    got = train_many(model, params, make_jobs(x, digits.y_train, 3), CFG, chunk=3, dtype=torch.float64, workers=2)
    want = per_phone(model, params, make_jobs(x, digits.y_train, 3), CFG, [{}] * len(SIZES))
    assert_same(got, want, atol=1e-10)


def test_the_models_copies_share_its_tensors_and_leave_it_unchanged(digits: Any) -> None:
    torch.manual_seed(0)
    model = BNDropoutCNN(0.2)
    before = {n: t.detach().clone() for n, t in model.state_dict().items()}
    params = TorchRuntime(model).get_params()
    train_many(model, params, make_jobs(digits.x_train, digits.y_train, 4), CFG, chunk=2, workers=2)
    (copy,) = module_copies(model, 1)
    assert copy is not model and all(a is b for a, b in zip(copy.parameters(), model.parameters(), strict=True))
    for n, t in model.state_dict().items():
        assert torch.equal(t, before[n]), n
    assert all(not m._forward_hooks for m in copy.modules())  # the batched layers were taken off again
    assert "forward" not in vars(copy.conv) and "forward" not in vars(model.conv)  # the batched convolution too


def test_a_failing_chunk_raises_on_the_caller(digits: Any) -> None:
    """A label outside the model's classes fails in one thread's chunk; train_many raises it."""
    model, params = float64_model(0.0)
    y = digits.y_train.copy()
    y[SIZES[0] + 3] = 99  # phone 2's data
    with pytest.raises(IndexError):
        train_many(model, params, make_jobs(digits.x_train, y, 6), CFG, chunk=2, workers=2)
    ok = train_many(model, params, make_jobs(digits.x_train, digits.y_train, 6), CFG, chunk=2, workers=2)
    assert len(ok) == len(SIZES) and all(np.isfinite(split_state(d)[0]["fc2.weight"]).all() for d, _ in ok)


async def test_the_trainer_trains_a_group_on_its_workers(digits: Any) -> None:
    """BatchedTrainer(workers=2) on the wall clock: a group's phones get what train_many on two threads gives."""
    import asyncio

    from fedfleet.device_runtime.trainer import BatchedTrainer

    torch.manual_seed(0)
    model = BNDropoutCNN(0.2)
    params = TorchRuntime(model).get_params()
    trainer = BatchedTrainer(model, chunk=2, quiet_s=0.001, workers=2)
    try:
        futures = [trainer.submit(params, x, y, CFG, rng, key=1) for x, y, rng in make_jobs(digits.x_train, digits.y_train, 9)]
        got = await asyncio.gather(*futures)
    finally:
        trainer.close()
    assert trainer.group_sizes == [len(SIZES)] and trainer.busy_s > 0
    want = train_many(model, params, make_jobs(digits.x_train, digits.y_train, 9), CFG, chunk=2, workers=2)
    for (d1, r1), (d2, r2) in zip(got, want, strict=True):
        assert r1 == r2
        for n in d2:
            np.testing.assert_array_equal(d1[n], d2[n])


def test_a_model_that_cannot_be_copied_trains_its_chunks_on_one_thread(digits: Any,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    """A user's module holding a lock cannot be deep-copied for a second thread: its chunks train on one
    thread, said once in the log, with the results two threads would give."""
    import threading

    model, params = float64_model(0.3)
    want = train_many(model, params, make_jobs(digits.x_train, digits.y_train, 3), CFG, chunk=2, workers=2)
    locked, _ = float64_model(0.3)
    locked.guard = threading.Lock()  # type: ignore[assignment]
    with caplog.at_level("WARNING"):
        got = train_many(locked, params, make_jobs(digits.x_train, digits.y_train, 3), CFG, chunk=2, workers=2)
        train_many(locked, params, make_jobs(digits.x_train, digits.y_train, 3), CFG, chunk=2, workers=2)
    assert module_copies(locked, 1) == []
    assert sum("cannot be copied" in r.getMessage() for r in caplog.records) == 1
    for (d1, r1), (d2, r2) in zip(got, want, strict=True):
        assert r1 == r2
        for n in d2:
            np.testing.assert_array_equal(d1[n], d2[n])
