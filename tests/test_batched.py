"""``train_many`` against the oracle: eager ``TorchRuntime.train``, one phone at a time."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from fedfleet.device_runtime.batched import Job, Params, train_many
from fedfleet.device_runtime.runtimes.base import TrainConfig, TrainResult, iterate_batches
from fedfleet.device_runtime.runtimes.torch_runtime import TorchRuntime
from fedfleet.export.models import ModelSpec, build_model

# Unequal phones: partial last batches, an idle phone (no data), a single example, and one
# phone still training after all others have finished (FedProx must not pull the idle ones).
SIZES = (23, 0, 7, 16, 40, 1, 31, 9)
CFG = TrainConfig(local_epochs=2, batch_size=8, lr=0.1, prox_mu=0.5)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models on shared cores: intra-op threads only spin (see RuntimePool)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_jobs(x: np.ndarray, y: np.ndarray, seed: int, sizes: tuple[int, ...] = SIZES) -> list[Job]:
    """Disjoint slices of (x, y), one fresh generator per phone."""
    cuts = np.cumsum([0, *sizes])
    return [(x[a:b], y[a:b], np.random.default_rng([seed, i])) for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:], strict=True))]


def per_phone(model: nn.Module, params: Params, jobs: list[Job], cfg: TrainConfig) -> list[tuple[Params, TrainResult]]:
    """What the fleet does today: load params, train, take new - start (RuntimePool.train)."""
    runtime = TorchRuntime(model)
    out = []
    for x, y, rng in jobs:
        runtime.set_params(params)
        result = runtime.train(x, y, cfg, rng)
        new = runtime.get_params()
        out.append(({n: new[n] - params[n] for n in params}, result))
    return out


def assert_same(
    got: list[tuple[Params, TrainResult]], want: list[tuple[Params, TrainResult]], atol: float, rtol: float = 0.0
) -> None:
    assert len(got) == len(want)
    for (d_got, r_got), (d_want, r_want) in zip(got, want, strict=True):
        assert (r_got.steps, r_got.num_examples) == (r_want.steps, r_want.num_examples)
        assert r_got.loss == pytest.approx(r_want.loss, abs=atol, rel=rtol)
        assert d_got.keys() == d_want.keys()
        for n in d_want:
            assert d_got[n].dtype == d_want[n].dtype
            np.testing.assert_allclose(d_got[n], d_want[n], atol=atol, rtol=rtol, err_msg=n)


def run_both(
    name: str, x: np.ndarray, y: np.ndarray, cfg: TrainConfig, dtype: torch.dtype, chunk: int = 3
) -> tuple[list[tuple[Params, TrainResult]], list[tuple[Params, TrainResult]]]:
    """(train_many, per-phone) from the same float32 start, on twin generators; the
    generators' states must match afterwards."""
    model = build_model(ModelSpec(name, tuple(x.shape[1:]), 10), seed=3)  # type: ignore[arg-type]
    params = TorchRuntime(model).get_params()  # float32: exact in float64 too
    if dtype == torch.float64:
        model.double()
        x = x.astype(np.float64)
    jobs_batched, jobs_ref = make_jobs(x, y, seed=7), make_jobs(x, y, seed=7)
    got = train_many(model, params, jobs_batched, cfg, chunk=chunk, dtype=dtype)
    want = per_phone(model, params, jobs_ref, cfg)
    for (_, _, a), (_, _, b) in zip(jobs_batched, jobs_ref, strict=True):
        assert a.bit_generator.state == b.bit_generator.state
    return got, want


@pytest.mark.parametrize("mu", [0.0, 0.5])
@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_float64_equals_per_phone(digits: Any, name: str, mu: float) -> None:
    cfg = TrainConfig(local_epochs=2, batch_size=8, lr=0.1, prox_mu=mu)
    got, want = run_both(name, digits.x_train, digits.y_train, cfg, torch.float64)
    assert_same(got, want, atol=1e-12)
    assert max(float(np.abs(a).max()) for d, _ in want for a in d.values()) > 1e-3  # it did train


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_float32_equals_per_phone_to_rounding(digits: Any, name: str) -> None:
    cfg = TrainConfig(local_epochs=4, batch_size=8, lr=0.1, prox_mu=0.5)
    got, want = run_both(name, digits.x_train, digits.y_train, cfg, torch.float32)
    assert_same(got, want, atol=1e-5, rtol=1e-5)


def test_mobilenet_head_equals_per_phone() -> None:
    """Only the head is stacked; the frozen backbone (eval-mode batch norm) is shared."""
    rng = np.random.default_rng(0)
    x = rng.random((sum(SIZES), 1, 16, 16))
    y = rng.integers(0, 10, len(x))
    got, want = run_both("mobilenet", x, y, CFG, torch.float64, chunk=4)
    assert_same(got, want, atol=1e-12)
    assert set(got[0][0]) == {"head.weight", "head.bias"}


def test_idle_phone_gets_zero_delta_and_zero_steps(digits: Any) -> None:
    model = build_model(ModelSpec("mlp", (1, 8, 8), 10))
    params = TorchRuntime(model).get_params()
    out = train_many(model, params, make_jobs(digits.x_train, digits.y_train, seed=1), CFG, chunk=2)
    delta, result = out[SIZES.index(0)]
    assert result == TrainResult(loss=0.0, num_examples=0, steps=0)
    assert all(not d.any() for d in delta.values())
    assert [r.steps for _, r in out] == [2 * -(-n // CFG.batch_size) for n in SIZES]


def test_chunk_size_does_not_change_the_result(digits: Any) -> None:
    model = build_model(ModelSpec("cnn", (1, 8, 8), 10)).double()
    params = {n: p.detach().numpy() for n, p in model.named_parameters()}
    x = digits.x_train.astype(np.float64)
    runs = [
        train_many(model, params, make_jobs(x, digits.y_train, seed=2), CFG, chunk=c, dtype=torch.float64)
        for c in (1, 3, len(SIZES))
    ]
    for other in runs[1:]:
        assert_same(other, runs[0], atol=1e-12)


def test_model_is_left_unchanged(digits: Any) -> None:
    model = build_model(ModelSpec("mlp", (1, 8, 8), 10))
    before = {n: t.clone() for n, t in model.state_dict().items()}
    params = TorchRuntime(model).get_params()
    train_many(model, params, make_jobs(digits.x_train, digits.y_train, seed=1), CFG)
    for n, t in model.state_dict().items():
        assert torch.equal(t, before[n]), n


def test_rejects_missing_params() -> None:
    model = build_model(ModelSpec("mlp", (1, 8, 8), 10))
    with pytest.raises(ValueError, match="fc2.bias"):
        train_many(model, {"fc1.weight": np.zeros((32, 64), np.float32)}, [], CFG)


@pytest.mark.parametrize("mu", [0.0, 0.5])
def test_eager_runtime_steps_exactly_as_torch_optim_sgd(digits: Any, mu: float) -> None:
    """TorchRuntime takes its SGD steps by hand (torch.optim's first use imports torch._dynamo);
    they must be torch.optim.SGD's, bit for bit, with and without the FedProx term."""
    cfg = TrainConfig(local_epochs=2, batch_size=8, lr=0.1, prox_mu=mu)
    model = build_model(ModelSpec("mlp", digits.input_shape, digits.num_classes), seed=1)
    reference = build_model(ModelSpec("mlp", digits.input_shape, digits.num_classes), seed=1)
    x, y = digits.x_train[:37], digits.y_train[:37]
    TorchRuntime(model).train(x, y, cfg, np.random.default_rng(3))

    params = [p for p in reference.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=cfg.lr)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))
    for idx in iterate_batches(len(x), cfg, np.random.default_rng(3)):
        ti = torch.from_numpy(idx)
        loss = nn.functional.cross_entropy(reference(xt[ti]), yt[ti])
        if mu:
            loss = loss + 0.5 * mu * sum(((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    for (name, got), want in zip(model.state_dict().items(), reference.state_dict().values(), strict=True):
        assert torch.equal(got, want), name


@pytest.mark.parametrize("release_every", [0, 2])
async def test_a_finished_group_wakes_its_phones_a_few_per_loop_pass(digits: Any, release_every: int) -> None:
    """BatchedTrainer on the wall clock: with ``release_every`` = k, the phones of a finished group
    are woken k per event-loop pass (so their uploads go out while the next ones encode), with 0 all
    in one pass; either way every phone gets exactly what training it alone gives."""
    import asyncio

    from fedfleet.device_runtime.trainer import BatchedTrainer

    model = build_model(ModelSpec("mlp", tuple(digits.x_train.shape[1:]), 10), seed=3)  # type: ignore[arg-type]
    params = TorchRuntime(model).get_params()
    cfg = TrainConfig(local_epochs=1, batch_size=8, lr=0.1)
    sizes = (9, 12, 7, 16, 5, 11)
    trainer = BatchedTrainer(model, quiet_s=0.001, release_every=release_every)
    passes = [0]

    def tick() -> None:  # counts event-loop passes
        passes[0] += 1
        loop.call_soon(tick)

    loop = asyncio.get_running_loop()
    loop.call_soon(tick)
    woken: list[int] = []
    try:
        futures = [trainer.submit(params, x, y, cfg, rng, key=1) for x, y, rng in make_jobs(digits.x_train, digits.y_train, 7, sizes)]
        for f in futures:
            f.add_done_callback(lambda _: woken.append(passes[0]))
        got = await asyncio.gather(*futures)
    finally:
        trainer.close()
    assert trainer.group_sizes == [len(sizes)]  # one vmapped group
    expected_passes = len(sizes) // release_every if release_every else 1
    assert len(set(woken)) == expected_passes and woken == sorted(woken)
    want = per_phone(model, params, make_jobs(digits.x_train, digits.y_train, 7, sizes), cfg)
    assert_same(list(got), want, atol=1e-5)
