"""Batch norm running statistics on ExecuTorch and ONNX Runtime phones (export/state_outputs.py).

Real ExecuTorch and ONNX Runtime against eager PyTorch: the exported programs update the running
statistics as the eager layer does, the runtimes carry them from step to step, start from the state
they are given and report the state they end with; phones on them (alone, and next to eager phones)
federate the statistics through the real server over loopback, and the server evaluates with the merge.
"""

from __future__ import annotations

import asyncio
import copy
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
import torch
from torch import nn

from fedfleet.device_runtime.emulated_device import PhoneClient
from fedfleet.device_runtime.runtimes.base import StatefulRuntime, TrainConfig
from fedfleet.device_runtime.runtimes.loader import load_runtime
from fedfleet.device_runtime.runtimes.torch_runtime import TorchRuntime, evaluate_module
from fedfleet.device_runtime.trainer import RuntimePool
from fedfleet.export.build import ExportConfig, export_bundle, export_model
from fedfleet.export.manifest import MODEL_PTE, TRAIN_STEP_ONNX
from fedfleet.export.model_state import initial_state
from fedfleet.export.state_outputs import eager_state_step, example_state, program_state_names, stateful_copy
from fedfleet.server.app import make_app
from fedfleet.server.config import ServerConfig
from fedfleet.server.state import COORD
from tests.test_batched_state import BNDropoutCNN
from tests.test_model_state import oracle

MODEL = "tests.test_runtime_bn_state:bn_dropout_cnn"  # conv -> BN2d -> ... -> linear -> BN1d -> ... -> linear
CONFIG = ExportConfig(model=MODEL, dataset="digits", input_shape=(1, 8, 8), num_classes=10)
# Running statistics after a task against eager PyTorch's: float32 sums in another order, over 16 steps.
RTOL, ATOL = 1e-4, 1e-5


def bn_dropout_cnn() -> nn.Module:
    """The task's model, as a user's MODULE:ATTR names it (built under the task's seed)."""
    return BNDropoutCNN(0.3)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bncnn")
    manifest = export_bundle(CONFIG, out)
    assert all(info.available for info in manifest.artifacts.values()), manifest.artifacts
    names = list(initial_state(export_model(CONFIG)))
    for artifact in (MODEL_PTE, TRAIN_STEP_ONNX):
        assert [n for n in manifest.signatures[artifact]["inputs"] if n.startswith("state.")] == \
            ["state." + n for n in names]
    return out


def without_dropout(model: nn.Module) -> nn.Module:
    """What the exported programs train: eager batch norm, every dropout mask keeping all values."""
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.p = 0.0
    return model


def assert_state_close(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert list(got) == list(want)
    for n, w in want.items():
        assert got[n].dtype == w.dtype, n
        if w.dtype.kind == "i":
            assert np.array_equal(got[n], w), n
        else:
            np.testing.assert_allclose(got[n], w, rtol=RTOL, atol=ATOL, err_msg=n)


@pytest.mark.parametrize("kind", ["executorch", "onnx"])
def test_state_after_local_training_equals_eager(bundle: Path, digits: Any, kind: str) -> None:
    """From a given state (not the initial one), two epochs of SGD: the running statistics (and the
    weights) equal eager PyTorch's; a state that is not given starts from the bundle's."""
    model = export_model(CONFIG)
    runtime = load_runtime(kind, bundle)
    assert isinstance(runtime, StatefulRuntime)
    initial = initial_state(model)
    assert_state_close(runtime.get_state(), initial)
    reference = TorchRuntime(without_dropout(model))
    rng = np.random.default_rng(7)
    start = {n: (v + rng.normal(size=v.shape).astype(v.dtype) * 0.5 + (0.5 if "var" in n else 0.0))
             if v.dtype.kind == "f" else np.array(7, v.dtype) for n, v in initial.items()}
    params = reference.get_params()
    runtime.set_params(params)
    runtime.set_state(start)
    reference.set_state(start)
    x, y = digits.x_train[:58], digits.y_train[:58]  # batches of 8, the last of 2
    cfg = TrainConfig(local_epochs=2, batch_size=8, lr=0.1)
    got = runtime.train(x, y, cfg, np.random.default_rng(4))
    want = reference.train(x, y, cfg, np.random.default_rng(4))
    assert got.steps == want.steps == 16
    end = reference.get_state()
    assert_state_close(runtime.get_state(), end)
    assert int(end["bn1.num_batches_tracked"]) == 7 + 16
    moved = float(np.abs(end["bn2.running_mean"] - start["bn2.running_mean"]).max())
    assert moved > 1e-2
    for n, w in reference.get_params().items():
        np.testing.assert_allclose(runtime.get_params()[n], w, rtol=1e-3, atol=1e-4, err_msg=n)
    if kind == "onnx":  # model.onnx evaluates with the runtime's statistics, as eager eval mode does
        assert runtime.evaluate(digits.x_test[:64], digits.y_test[:64]).loss == pytest.approx(
            reference.evaluate(digits.x_test[:64], digits.y_test[:64]).loss, rel=1e-4)
    runtime.set_state({})
    assert_state_close(runtime.get_state(), initial)


def _program_pool(kind: str, bundle: Path, model: nn.Module) -> RuntimePool:
    if kind == "torch":
        return RuntimePool(lambda: TorchRuntime(copy.deepcopy(model)))
    return RuntimePool(lambda: load_runtime(kind, bundle))


@pytest.mark.parametrize("kinds", [("executorch",) * 3, ("onnx",) * 3, ("torch", "onnx", "torch", "onnx")],
                         ids=["executorch", "onnx", "torch+onnx"])
async def test_sync_round_merges_program_phones_state(aiohttp_client: Any, tmp_path: Path, digits: Any, bundle: Path,
                                                      kinds: tuple[str, ...]) -> None:
    """One sync round of phones on ExecuTorch / ONNX Runtime (and eager phones beside them): every update
    is taken, the server's state is the example-weighted mean of what each phone's eager oracle ends
    with, and the server evaluates the new version with that state."""
    cfg = ServerConfig(model=MODEL, input_shape=(1, 8, 8), num_classes=10, round_timeout_s=60.0,
                       data_dir=str(tmp_path), sample_fraction=1.0, min_cohort=len(kinds), rounds=1, local_epochs=1)
    client = await aiohttp_client(make_app(cfg, test_data=(digits.x_test, digits.y_test)))
    url = str(client.make_url("")).rstrip("/")
    coord = client.server.app[COORD]
    model = export_model(CONFIG)  # the server's version 0 is built from the same seed
    start_params = {n: v.copy() for n, v in coord.params.items()}
    start_state = {n: v.copy() for n, v in coord.state.items()}
    sizes = [24, 40, 18, 34][: len(kinds)]
    cuts = np.cumsum([0, *sizes])
    data = [(digits.x_train[a:b], digits.y_train[a:b]) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
    pools = {kind: _program_pool(kind, bundle, model) for kind in set(kinds)}
    async with aiohttp.ClientSession() as session:
        phones = [PhoneClient(session, url, f"{kind}-{i}", d, pools[kind], np.random.default_rng([5, i]), sign=False,
                              chain_checkin=False) for i, (kind, d) in enumerate(zip(kinds, data, strict=True))]
        rngs = [copy.deepcopy(p.rng) for p in phones]
        for p in phones:
            await p.register()
        await asyncio.wait_for(asyncio.gather(*[p.run() for p in phones]), 120)
    assert coord.version == 1 and coord.rejections == {}
    plan = phones[0].task["train"]
    train = TrainConfig(**{k: plan[k] for k in ("local_epochs", "batch_size", "lr", "prox_mu")})
    ends = []
    for kind, (x, y), rng in zip(kinds, data, rngs, strict=True):  # each phone's oracle, trained eagerly
        rng.random()  # the availability draw of the phone's check-in
        reference = TorchRuntime(copy.deepcopy(model) if kind == "torch" else without_dropout(model))
        reference.set_params(start_params)
        reference.set_state(start_state)
        reference.train(x, y, train, rng)
        ends.append(reference.get_state())
    want = oracle(ends, sizes)
    for n, w in want.items():
        np.testing.assert_allclose(coord.state[n], w, rtol=RTOL, atol=ATOL, err_msg=n)
    assert not np.allclose(coord.state["bn1.running_mean"], start_state["bn1.running_mean"])
    for _ in range(200):  # the publisher evaluates the new version off the event loop
        if coord.history and coord.history[-1].get("accuracy") is not None:
            break
        await asyncio.sleep(0.05)
    record = coord.history[-1]
    evaluated = copy.deepcopy(model)
    with torch.no_grad():
        named, buffers = dict(evaluated.named_parameters()), dict(evaluated.named_buffers())
        for n, v in coord.params.items():
            named[n].copy_(torch.from_numpy(v))
        for n, v in coord.state.items():
            buffers[n].copy_(torch.from_numpy(np.asarray(v)))
    with_merged = evaluate_module(evaluated, digits.x_test, digits.y_test)
    assert record["loss"] == pytest.approx(with_merged.loss, rel=1e-5)
    with torch.no_grad():
        for n, v in start_state.items():
            buffers[n].copy_(torch.from_numpy(np.asarray(v)))
    assert evaluate_module(evaluated, digits.x_test, digits.y_test).loss != pytest.approx(record["loss"], rel=1e-3)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_program_statistics_follow_the_eager_layer_in_float64(momentum: float | None) -> None:
    """What the programs are exported from (export.state_outputs.stateful_copy), three steps fed back
    into themselves: the eager layer's running statistics, momentum=None (a cumulative average)
    included, to float64 rounding."""
    torch.manual_seed(0)
    model = BNDropoutCNN(0.3, momentum).double()
    copy_, channel = stateful_copy(model)
    names = program_state_names(model)
    state = example_state(model, names)
    eager_state = list(state)
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        x = torch.rand((6, 1, 8, 8), generator=gen, dtype=torch.float64)
        channel.load(state)
        copy_(x)
        state = channel.collect()
        eager_state = eager_state_step(model, x, eager_state, names, {})
    for n, got, want in zip(names, state, eager_state, strict=True):
        assert got.dtype == want.dtype, n
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12, msg=n)
    assert int(state[names.index("bn1.num_batches_tracked")]) == 3
