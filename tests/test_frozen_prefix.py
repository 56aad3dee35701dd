"""A frozen backbone's features computed once per phone (export/frozen_prefix.py): where the model
is cut, the cut trains as the per-phone eager loop does, the features are kept across calls, and a
model whose frozen part is not a pure function of each example is not cut."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from fedfleet.device_runtime.batched import train_many
from fedfleet.device_runtime.runtimes.base import TrainConfig
from fedfleet.device_runtime.runtimes.torch_runtime import TorchRuntime
from fedfleet.device_runtime.trainer import BatchedTrainer
from fedfleet.export.frozen_prefix import FeatureCache, split
from fedfleet.export.model_state import state_names
from tests.test_batched_state import SIZES, assert_same, make_jobs, per_phone
from tests.test_batched_state import one_thread as one_thread  # autouse: one torch thread here too


class Backbone(nn.Module):
    """conv -> ReLU -> pool -> conv -> ReLU, then a head; ``frozen`` freezes everything but the head."""

    def __init__(self, frozen: bool = True, extra: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(6 * 4 * 4, 10)
        self.extra = extra
        if frozen:
            for p in [*self.conv1.parameters(), *self.conv2.parameters()]:
                p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv2(nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)))
        if self.extra is not None:
            h = self.extra(h)
        return self.head(self.drop(h.flatten(1)))  # dropout in the trained head: drawn per step, as eagerly


class EvalBackbone(Backbone):
    """A frozen backbone with batch norm that the model keeps in eval mode, as TransferMobileNet does."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(4)
        self.bn.requires_grad_(False)
        with torch.no_grad():
            self.bn.weight.uniform_(0.5, 1.5)  # statistics a pretrained backbone brings
            self.bn.bias.uniform_(-0.5, 0.5)
        self.block = nn.Sequential(self.conv1, self.bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv2(nn.functional.max_pool2d(torch.relu(self.block(x)), 2)))
        return self.head(self.drop(h.flatten(1)))

    def train(self, mode: bool = True) -> EvalBackbone:
        super().train(mode)
        self.bn.eval()
        return self


class EarlyNorm(Backbone):
    """Frozen, but batch norm in training mode right after a wide first convolution: the prefix before
    it is one layer whose output is 80 times the input (5,120 numbers an example)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 80, 3, padding=1).requires_grad_(False)
        self.conv2 = nn.Conv2d(80, 6, 3, padding=1).requires_grad_(False)
        self.bn = nn.BatchNorm2d(80).requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv2(nn.functional.max_pool2d(torch.relu(self.bn(self.conv1(x))), 2)))
        return self.head(self.drop(h.flatten(1)))


class Branching(Backbone):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float(x.sum()) > 0:  # control flow on a value: fx cannot trace it
            x = x * 1.0
        return super().forward(x)


class ReadsInput(Backbone):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + x.flatten(1)[:, :10]  # the trained part reads the input too


def seeded(make: Callable[[], nn.Module]) -> nn.Module:
    torch.manual_seed(0)  # the test's model initialisation only
    return make().train()


def cut_of(model: nn.Module, digits: Any) -> Any:
    return split(model.train(), torch.as_tensor(digits.x_train[:2]), [])


def test_a_batch_statistic_is_caught_though_the_first_examples_are_equal(digits: Any) -> None:
    """The check pairs the first example with the first one unlike it: two equal examples would make a
    batch mean look like a function of each."""
    model = seeded(lambda: Backbone(extra=lambda h: h - h.mean(dim=0, keepdim=True)))
    params = TorchRuntime(model).get_params()
    x = np.concatenate([np.repeat(digits.x_train[:1], 6, axis=0), digits.x_train[1:30]])
    y = np.concatenate([np.repeat(digits.y_train[:1], 6), digits.y_train[1:30]])
    cache = FeatureCache()
    train_many(model, params, make_jobs(x, y, 0, (4, 31)), TrainConfig(batch_size=8), features=cache)
    assert cache.computed == 0


def test_a_frozen_backbone_is_cut_after_it(digits: Any) -> None:
    for make in (Backbone, EvalBackbone):
        cut = cut_of(seeded(make), digits)
        assert cut is not None and cut.shape == (96,)  # the flattened features
        assert {n for n, p in cut.rest.named_parameters() if p.requires_grad} == {"head.weight", "head.bias"}


def frozen_norm() -> nn.Module:
    """Frozen batch norm in training mode: the statistics of the batch, and running statistics that move."""
    return Backbone(extra=nn.BatchNorm2d(6).requires_grad_(False))


@pytest.mark.parametrize("why", ["trained", "random", "batch mean", "branching", "reads input", "wide features"])
def test_no_cut_where_the_frozen_part_is_not_a_function_of_each_example(digits: Any, why: str) -> None:
    makes: dict[str, Callable[[], nn.Module]] = {
        "trained": lambda: Backbone(frozen=False),
        "random": lambda: Backbone(extra=lambda h: h + 0.01 * torch.randn_like(h)),
        "batch mean": lambda: Backbone(extra=lambda h: h - h.mean(dim=0, keepdim=True)),
        "branching": Branching,
        "reads input": ReadsInput,
        "wide features": EarlyNorm,
    }
    assert cut_of(seeded(makes[why]), digits) is None


@pytest.mark.parametrize("layer", ["dropout", "batch norm"])
def test_the_cut_comes_before_a_frozen_layer_that_acts_per_batch(digits: Any, layer: str) -> None:
    """Frozen dropout (random in training mode) and frozen batch norm in training mode stay in the
    trained part: the features end before them."""
    model = seeded(lambda: Backbone(extra=nn.Dropout(0.5)) if layer == "dropout" else frozen_norm())
    cut = cut_of(model, digits)
    assert cut is not None and cut.shape == (6, 4, 4) and cut.rest.extra is model.extra


@pytest.mark.parametrize("workers", [1, 2])
def test_the_cut_trains_as_the_per_phone_loop_float64(digits: Any, workers: int) -> None:
    """Deltas, losses, steps and batch norm state to 1e-10 against the eager runtime, with dropout in the
    head, FedProx, two epochs, partial batches and an idle phone; the features computed once per phone."""
    for make in (Backbone, EvalBackbone, frozen_norm):
        model = seeded(make)
        params = TorchRuntime(model).get_params()
        model = model.double()
        cfg = TrainConfig(local_epochs=2, batch_size=8, lr=0.1, prox_mu=0.5)
        x = digits.x_train.astype(np.float64)
        assert split(model.train(), torch.as_tensor(x[:2]), state_names(model)) is not None
        cache = FeatureCache()
        got = train_many(model, params, make_jobs(x, digits.y_train, 3), cfg, chunk=3, dtype=torch.float64,
                         workers=workers, features=cache)
        want = per_phone(model, params, make_jobs(x, digits.y_train, 3), cfg, [{}] * len(SIZES))
        assert_same(got, want, atol=1e-10)
        assert cache.computed == sum(SIZES)


def test_features_are_kept_from_one_call_to_the_next(digits: Any) -> None:
    """The second call computes no features and gives the same bits; new frozen weights or new examples
    are computed anew."""
    model = seeded(Backbone)
    params = TorchRuntime(model).get_params()
    cfg = TrainConfig(local_epochs=1, batch_size=8, lr=0.1)
    cache = FeatureCache()
    first = train_many(model, params, make_jobs(digits.x_train, digits.y_train, 1), cfg, features=cache)
    second = train_many(model, params, make_jobs(digits.x_train, digits.y_train, 1), cfg, features=cache)
    assert cache.computed == sum(SIZES)
    for (a, _), (b, _) in zip(first, second, strict=True):
        for n in a:
            np.testing.assert_array_equal(a[n], b[n])
    train_many(model, params, make_jobs(digits.x_train[1:], digits.y_train[1:], 1), cfg, features=cache)
    assert cache.computed == 2 * sum(SIZES)  # every phone's examples moved by one
    assert isinstance(model, Backbone)
    with torch.no_grad():
        model.conv1.weight.add_(0.1)
    third = train_many(model, params, make_jobs(digits.x_train, digits.y_train, 1), cfg, features=cache)
    assert cache.computed == 3 * sum(SIZES)
    assert not np.allclose(third[0][0]["head.weight"], first[0][0]["head.weight"])


def test_the_cache_drops_the_least_recently_used_beyond_its_bytes(digits: Any) -> None:
    cut = cut_of(seeded(Backbone), digits)
    one = 10 * 96 * 4  # ten examples' float32 features
    cache = FeatureCache(max_bytes=2 * one)
    a, b, c = (digits.x_train[i * 10:(i + 1) * 10] for i in range(3))
    for x in (a, b, a, c):  # a used again before c: b is the least recent
        cache.features(cut, [x], torch.float32)
    assert cache.computed == 30 and cache.bytes == 2 * one
    cache.features(cut, [a], torch.float32)
    assert cache.computed == 30
    cache.features(cut, [b], torch.float32)
    assert cache.computed == 40


@pytest.mark.parametrize("threads", [1, 3])
def test_features_computed_together_equal_each_phones_alone(digits: Any, threads: int) -> None:
    """Phones' examples go through the backbone in calls of up to CHUNK_EXAMPLES across phones, on one or
    more threads; each phone's features equal its examples' alone, and a phone's examples seen twice in
    one call are computed once."""
    cut = cut_of(seeded(Backbone), digits)
    xs = [digits.x_train[a:b] for a, b in ((0, 700), (700, 705), (705, 1300), (0, 700))]
    cache = FeatureCache()
    got = cache.features(cut, xs, torch.float32, threads)
    assert cache.computed == 1300
    with torch.no_grad():
        for x, f in zip(xs, got, strict=True):
            np.testing.assert_allclose(f, cut.features(torch.from_numpy(x)).numpy(), rtol=1e-5, atol=1e-6)


def test_a_run_computes_each_phones_features_once(digits: Any) -> None:
    """BatchedTrainer keeps the features from one group to the next: the same phones' second task
    computes none."""
    model = seeded(Backbone)
    params = TorchRuntime(model).get_params()
    cfg = TrainConfig(local_epochs=1, batch_size=8, lr=0.1)
    trainer = BatchedTrainer(model)

    async def group() -> list[Any]:
        jobs = make_jobs(digits.x_train, digits.y_train, 2)
        return await asyncio.gather(*(trainer.train(params, x, y, cfg, rng, key=1) for x, y, rng in jobs))

    try:
        asyncio.run(group())
        asyncio.run(group())
    finally:
        trainer.close()
    assert trainer.calls == 2 and trainer.features.computed == sum(SIZES)


def backbone_task() -> nn.Module:
    """A task model (``--model tests.test_frozen_prefix:backbone_task``): digits through a frozen backbone
    with batch norm in eval mode, and a trained head."""
    return EvalBackbone()


def test_a_single_phone_trains_on_its_features_too(digits: Any) -> None:
    """Below BatchedTrainer's min_group a phone would train eagerly, its backbone at every step; with a
    frozen backbone it trains on its features, as the eager loop would train it (float32 rounding), and
    its second task computes none."""
    model = seeded(Backbone)
    params = TorchRuntime(model).get_params()
    cfg = TrainConfig(local_epochs=2, batch_size=8, lr=0.1)
    trainer = BatchedTrainer(model, min_group=4)
    x, y = digits.x_train[:37], digits.y_train[:37]

    async def one() -> Any:
        return await trainer.train(params, x, y, cfg, np.random.default_rng(4), key=1)

    try:
        got = [asyncio.run(one()), asyncio.run(one())]
    finally:
        trainer.close()
    assert trainer.calls == 2 and trainer.features.computed == 37
    want = per_phone(model, params, [(x, y, np.random.default_rng(4))], cfg, [{}])
    assert_same(got[:1], want, atol=2e-6)


def test_the_server_evaluates_the_head_on_the_test_splits_features(digits: Any) -> None:
    """The server's evaluation of each version equals the whole model's, computed with plain PyTorch;
    the backbone's features of the test split are computed once."""
    from fedfleet.export.task_model import task_model
    from fedfleet.server.evaluation import Evaluator

    spec = ("tests.test_frozen_prefix:backbone_task", (1, 8, 8), 10)
    evaluator = Evaluator(spec, digits.x_test, digits.y_test, seed=3)
    oracle = task_model(*spec, seed=3).eval()
    rng = np.random.default_rng(0)
    x, y = torch.from_numpy(digits.x_test), torch.from_numpy(digits.y_test)
    features = None
    for _ in range(2):  # two versions: the head moves, the features stay
        params = {n: (p.detach().numpy() + rng.normal(0, 0.2, p.shape)).astype(np.float32)
                  for n, p in oracle.named_parameters() if p.requires_grad}
        got = evaluator.evaluate(params)
        assert evaluator._cut is not None
        features = evaluator._cut[1] if features is None else features
        assert evaluator._cut[1] is features
        with torch.no_grad():
            for n, v in params.items():
                dict(oracle.named_parameters())[n].copy_(torch.from_numpy(v))
            logits = oracle(x)
        assert got.loss == pytest.approx(float(nn.functional.cross_entropy(logits, y)), rel=1e-5)
        assert got.accuracy == int((logits.argmax(1) == y).sum()) / len(y)


def test_tracing_leaves_modules_other_threads_run_alone() -> None:
    """torch.fx patches nn.Module for the whole process while it traces; a fleet's training or a server's
    evaluation running its modules on another thread meanwhile must compute as usual (with fx's own
    symbolic_trace it fails: ``module is not installed as a submodule``)."""
    import threading

    from fedfleet.export.frozen_prefix import trace

    busy = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    want = busy(x)
    errors: list[str] = []
    stop = threading.Event()

    def work() -> None:
        while not stop.is_set():
            try:
                assert torch.equal(busy(x), want)
            except Exception as exc:  # whatever the patched module call raises
                errors.append(repr(exc))
                return

    thread = threading.Thread(target=work)
    thread.start()
    try:
        for _ in range(200):
            traced = trace(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Sequential(nn.Linear(4, 2))))
    finally:
        stop.set()
        thread.join()
    assert errors == []
    assert [n.op for n in traced.graph.nodes] == ["placeholder", "call_module", "call_module", "call_module", "output"]


def test_a_deep_backbones_features_may_be_wider_than_a_small_input() -> None:
    """The built-in mobilenet on 8x8 digits: 576 features an example for 64 inputs, the whole backbone
    saved; kept."""
    from fedfleet.export.models import ModelSpec, build_model

    model = build_model(ModelSpec("mobilenet", (1, 8, 8), 10), seed=0).train()
    examples = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    cut = split(model, examples, state_names(model))
    assert cut is not None and cut.shape == (576,)
