"""The project's own batch norm example (`examples.custom_task:bn_cnn`: conv-BN-pool, adaptive average
pooling, dropout) exports, and its bundle trains and evaluates as eager PyTorch does.

Real ExecuTorch and ONNX Runtime against eager PyTorch. Adaptive average pooling's backward has no
ExecuTorch kernel and no ONNX translation: the training programs compute it as means over windows
(export/pool_decomp.py), checked here against ATen's kernels in float64. Both phones evaluate with
their running statistics (model.pte's ``evaluate`` method, model.onnx), as eager eval mode does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedfleet.device_runtime.runtimes.base import StatefulRuntime, TrainConfig
from fedfleet.device_runtime.runtimes.loader import load_runtime
from fedfleet.device_runtime.runtimes.torch_runtime import TorchRuntime
from fedfleet.export.build import ExportConfig, export_bundle, export_model
from fedfleet.export.manifest import MODEL_PTE
from fedfleet.export.model_state import initial_state
from fedfleet.export.pool_decomp import adaptive_avg_pool2d, adaptive_avg_pool2d_backward
from tests.test_runtime_bn_state import assert_state_close, without_dropout

aten = torch.ops.aten
CONFIG = ExportConfig(model="examples.custom_task:bn_cnn", dataset="digits", input_shape=(1, 8, 8), num_classes=10)


@pytest.mark.parametrize(("side", "out"), [((4, 4), (2, 2)), ((4, 4), (1, 1)), ((6, 8), (3, 1)), ((7, 5), (3, 2)),
                                           ((5, 5), (4, 5))])
def test_pool_decomposition_equals_aten_in_float64(side: tuple[int, int], out: tuple[int, int]) -> None:
    """Divisible, global and overlapping windows: forward and backward equal ATen's kernels."""
    gen = torch.Generator().manual_seed(side[0] * 10 + out[0])
    x = torch.randn((3, 2, *side), generator=gen, dtype=torch.float64)
    want = aten._adaptive_avg_pool2d(x, list(out))
    torch.testing.assert_close(adaptive_avg_pool2d(x, out), want, rtol=0, atol=1e-12)
    grad = torch.randn(want.shape, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(adaptive_avg_pool2d_backward(grad, x), aten._adaptive_avg_pool2d_backward(grad, x),
                               rtol=0, atol=1e-12)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("example_bn")
    manifest = export_bundle(CONFIG, out)
    assert all(info.available for info in manifest.artifacts.values()), manifest.artifacts
    assert manifest.signatures[MODEL_PTE]["evaluate_outputs"] == ["logits"]
    return out


def _start(runtime: Any, reference: TorchRuntime, initial: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Put the same weights and a state that is not the initial one into both; return the state."""
    rng = np.random.default_rng(7)
    state = {n: (v + rng.normal(size=v.shape).astype(v.dtype) * 0.5 + (0.5 if "var" in n else 0.0))
             if v.dtype.kind == "f" else np.array(7, v.dtype) for n, v in initial.items()}
    runtime.set_params(reference.get_params())
    runtime.set_state(state)
    reference.set_state(state)
    return state


@pytest.mark.parametrize("kind", ["executorch", "onnx"])
def test_example_trains_as_eager_pytorch(bundle: Path, digits: Any, kind: str) -> None:
    """Two epochs of SGD (FedProx on) from the same weights, state and batches: the loss, weights and
    running statistics of eager PyTorch (dropout keeping every value, as the programs do)."""
    model = export_model(CONFIG)
    runtime = load_runtime(kind, bundle)
    assert isinstance(runtime, StatefulRuntime)
    reference = TorchRuntime(without_dropout(model))
    start = _start(runtime, reference, initial_state(model))
    params = reference.get_params()
    x, y = digits.x_train[:58], digits.y_train[:58]  # batches of 8, the last of 2
    cfg = TrainConfig(local_epochs=2, batch_size=8, lr=0.1, prox_mu=0.1)
    got = runtime.train(x, y, cfg, np.random.default_rng(4))
    want = reference.train(x, y, cfg, np.random.default_rng(4))
    assert got.steps == want.steps == 16
    assert got.loss == pytest.approx(want.loss, rel=1e-4)
    assert_state_close(runtime.get_state(), reference.get_state())
    assert float(np.abs(reference.get_state()["features.5.running_mean"] - start["features.5.running_mean"]).max()) > 1e-2
    after = runtime.get_params()
    for n, w in reference.get_params().items():
        np.testing.assert_allclose(after[n], w, rtol=1e-3, atol=1e-4, err_msg=n)
    assert max(float(np.abs(after[n] - params[n]).max()) for n in params) > 1e-2


@pytest.mark.parametrize("kind", ["executorch", "onnx"])
def test_example_evaluates_with_its_running_statistics(bundle: Path, digits: Any, kind: str) -> None:
    """A phone evaluates as eager eval mode does, with the weights and running statistics it holds (not
    the batch's statistics): trained eagerly, then the same loss and accuracy with the trained statistics,
    and again with the initial ones, which evaluate differently."""
    reference = TorchRuntime(export_model(CONFIG))
    reference.train(digits.x_train[:400], digits.y_train[:400], TrainConfig(local_epochs=3, batch_size=16, lr=0.1),
                    np.random.default_rng(3))
    runtime = load_runtime(kind, bundle)
    assert isinstance(runtime, StatefulRuntime)
    runtime.set_params(reference.get_params())
    x, y = digits.x_test[:100], digits.y_test[:100]
    losses = []
    for state in (reference.get_state(), {}):
        runtime.set_state(state)
        reference.set_state(state)
        got, want = runtime.evaluate(x, y, batch_size=32), reference.evaluate(x, y)
        assert got.loss == pytest.approx(want.loss, rel=1e-4)
        assert got.accuracy == want.accuracy and got.num_examples == 100
        losses.append(got.loss)
    assert losses[0] < 1.0 and losses[1] != pytest.approx(losses[0], rel=0.1), losses
