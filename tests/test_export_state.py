"""Exporting models with batch norm and dropout, and models an exporter cannot take.

Real ExecuTorch and ONNX Runtime against eager PyTorch: the bundle of a BN + Dropout CNN trains
with the eager trajectory (dropout keeps every value in the exported programs: export.bn_decomp),
and a GRU classifier's bundle is refused in one line naming what failed, with nothing left claimed.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from fedfleet.device_runtime.runtimes.base import TrainConfig
from fedfleet.device_runtime.runtimes.loader import load_runtime
from fedfleet.device_runtime.runtimes.torch_runtime import TorchRuntime
from fedfleet.export.bn_decomp import batch_norm_functional, training_copy
from fedfleet.export.build import ExportConfig, export_bundle
from fedfleet.export.manifest import MANIFEST, MODEL_ONNX, MODEL_PTE, TRAIN_STEP_ONNX, WEIGHTS
from tests.exports import Finished
from tests.test_batched_state import BNDropoutCNN

ERROR = "fedfleet export: error: "
ARTIFACTS = (WEIGHTS, MODEL_PTE, MODEL_ONNX, TRAIN_STEP_ONNX)
CONFIG = ExportConfig(model="custom", dataset="digits", input_shape=(1, 8, 8), num_classes=10)


@pytest.fixture(scope="module")
def bn_bundle(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, nn.Module]]:
    torch.manual_seed(0)
    model = BNDropoutCNN(0.3)
    out = tmp_path_factory.mktemp("bn")
    manifest = export_bundle(CONFIG, out, model=model)
    assert all(info.available for info in manifest.artifacts.values()), manifest.artifacts
    yield out, model


@pytest.mark.parametrize("shape", [(2, 16), (6, 4, 5, 5)])
def test_batch_norm_decomposition_equals_the_kernel_in_float64(shape: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True)
    w, b = (torch.randn(shape[1], generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    rm, rv = torch.randn(shape[1], dtype=torch.float64), torch.rand(shape[1], dtype=torch.float64) + 0.5
    up = torch.randn(shape, generator=gen, dtype=torch.float64)
    erm, erv = rm.clone(), rv.clone()
    want = nn.functional.batch_norm(x, erm, erv, w, b, True, 0.1, 1e-5)
    got, _, _, grm, grv = batch_norm_functional(x, w, b, rm, rv, True, 0.1, 1e-5)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    torch.testing.assert_close((grm, grv), (erm, erv), rtol=0, atol=1e-12)  # running statistics as the layer keeps them
    for a, c in zip(torch.autograd.grad((got * up).sum(), [x, w, b]), torch.autograd.grad((want * up).sum(), [x, w, b]),
                    strict=True):
        torch.testing.assert_close(a, c, rtol=0, atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["executorch", "onnx"])
def test_bn_bundle_trains_as_eager_pytorch(bn_bundle: tuple[Path, nn.Module], digits: Any, kind: str) -> None:
    """Two epochs of SGD (FedProx on) from the same weights and batches: the same loss and weights as
    eager PyTorch (batch statistics; dropout keeping every value, which is what the programs do)."""
    bundle, model = bn_bundle
    reference = TorchRuntime(training_copy(model))
    runtime = load_runtime(kind, bundle)
    assert runtime.param_names() == reference.param_names()
    start = reference.get_params()
    runtime.set_params(start)
    x, y = digits.x_train[:58], digits.y_train[:58]  # batches of 8, the last of 2: never one example
    cfg = TrainConfig(local_epochs=2, batch_size=8, lr=0.1, prox_mu=0.1)
    got = runtime.train(x, y, cfg, np.random.default_rng(4))
    want = reference.train(x, y, cfg, np.random.default_rng(4))
    assert got.steps == want.steps == 16
    assert got.loss == pytest.approx(want.loss, rel=1e-4)
    after, expected = runtime.get_params(), reference.get_params()
    moved = max(float(np.abs(expected[n] - start[n]).max()) for n in start)
    assert moved > 1e-2
    for n in expected:
        np.testing.assert_allclose(after[n], expected[n], rtol=1e-3, atol=1e-4, err_msg=n)
    # Batch norm trained: its weights moved with the rest.
    assert float(np.abs(after["bn2.weight"] - start["bn2.weight"]).max()) > 1e-3


@pytest.mark.slow
def test_bn_inference_model_keeps_batch_norm_weights_feedable(bn_bundle: tuple[Path, nn.Module], digits: Any) -> None:
    """model.onnx evaluates the weights it is fed, batch norm's included (not folded into the layer
    before it), with the exported running statistics, as eager eval mode does."""
    bundle, model = bn_bundle
    runtime = load_runtime("onnx", bundle)
    eager = TorchRuntime(copy.deepcopy(model))
    params = {n: v * 1.5 for n, v in eager.get_params().items()}
    runtime.set_params(params)
    eager.set_params(params)
    x, y = digits.x_test[:64], digits.y_test[:64]
    assert runtime.evaluate(x, y).loss == pytest.approx(eager.evaluate(x, y).loss, rel=1e-4)


@pytest.mark.slow
def test_a_model_the_exporters_cannot_take_is_refused_in_one_line(gru_refusal: Finished) -> None:
    """A GRU (`fedfleet export --model tests.exports:gru_classifier`, tests/exports.py): ExecuTorch lowering and
    the ONNX inference export fail; the one line names each artifact and what failed, and withdrawing leaves
    no manifest and no artifact. train_step.onnx, which passed its check against eager, is withdrawn with
    the rest: a bundle is all or nothing."""
    assert gru_refusal.returncode == 2, gru_refusal.output[-3000:]
    (line,) = [line for line in gru_refusal.output.splitlines() if line.startswith(ERROR)]
    lines = re.split(rf"; (?=(?:{'|'.join(map(re.escape, ARTIFACTS))}): )", line.removeprefix(ERROR))
    assert [line.split(":")[0] for line in lines] == [MODEL_ONNX, MODEL_PTE]
    assert "fails at" in lines[1] and "lowering" in lines[1]
    assert "gru.weight_ih_l0" in lines[0]
    out = gru_refusal.out
    assert not (out / MANIFEST).exists() and not (out / TRAIN_STEP_ONNX).exists()
    assert list(out.iterdir()) == []
