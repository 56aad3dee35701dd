"""Exported runtimes against eager PyTorch: same loss, gradients and SGD trajectory.

Oracle: ``TorchRuntime`` on the model rebuilt from the manifest. Real ExecuTorch and ONNX
Runtime, no mocks. Each model the tests need is exported once, by the real CLI in a background
process (tests/exports.py), and shared. MobileNet (a ~100 s export) is marked slow.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from fedfleet.device_runtime.runtimes.base import TrainConfig, TrainingRuntime
from fedfleet.device_runtime.runtimes.loader import load_runtime
from fedfleet.export.manifest import (
    MANIFEST,
    MODEL_ONNX,
    MODEL_PTE,
    TRAIN_STEP_ONNX,
    HashMismatch,
    MissingFile,
    ParameterMismatch,
    UnknownFormatVersion,
)
from tests.exports import Exports

MODELS = ("mlp", "cnn", pytest.param("mobilenet", marks=pytest.mark.slow))
EXPORTED = ("executorch", "onnx")
SHAPE = (1, 8, 8)  # the digits dataset the bundles are exported for


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """The eager oracle on one thread, like the other runtimes (and several times faster on 2 busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.random((n, *SHAPE), dtype=np.float32), rng.integers(0, 10, n)


def max_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    assert list(a) == list(b)
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def perturbed(rt: TrainingRuntime, seed: int) -> dict[str, np.ndarray]:
    """Weights unlike the exported ones, so set_params is exercised too."""
    rng = np.random.default_rng(seed)
    return {
        n: (v + 0.05 * rng.standard_normal(v.shape)).astype(np.float32) for n, v in rt.get_params().items()
    }


@pytest.mark.parametrize("model", MODELS)
def test_exported_weights_and_names_equal_eager(exports: Exports, model: str) -> None:
    ref = load_runtime("torch", exports.bundle(model)).get_params()
    for kind in EXPORTED:
        rt = load_runtime(kind, exports.bundle(model))
        assert rt.param_names() == list(ref)
        assert max_diff(rt.get_params(), ref) == 0.0


@pytest.mark.parametrize("kind", EXPORTED)
@pytest.mark.parametrize("model", MODELS)
def test_one_step_at_lr_1_is_minus_the_eager_gradient(exports: Exports, model: str, kind: str) -> None:
    ref, rt = load_runtime("torch", exports.bundle(model)), load_runtime(kind, exports.bundle(model))
    start = perturbed(ref, seed=1)
    cfg = TrainConfig(local_epochs=1, batch_size=13, lr=1.0)  # one odd-sized batch: w1 - w0 = -grad
    x, y = data(13, seed=2)
    deltas, losses = [], []
    for r in (ref, rt):
        r.set_params(start)
        losses.append(r.train(x, y, cfg, np.random.default_rng(3)).loss)
        deltas.append({n: v - start[n] for n, v in r.get_params().items()})
    assert abs(losses[0] - losses[1]) < 1e-5
    assert max_diff(deltas[0], deltas[1]) < 1e-5
    assert max(float(np.abs(v).max()) for v in deltas[0].values()) > 1e-3  # the step did something


@pytest.mark.parametrize("kind", EXPORTED)
@pytest.mark.parametrize("model", MODELS)
def test_fifty_fedprox_steps_follow_eager(exports: Exports, model: str, kind: str) -> None:
    ref, rt = load_runtime("torch", exports.bundle(model)), load_runtime(kind, exports.bundle(model))
    cfg = TrainConfig(local_epochs=1, batch_size=16, lr=0.05, prox_mu=0.1)
    x, y = data(155, seed=4)  # 10 steps per task, the last on 11 examples
    for task in range(5):
        results = [r.train(x, y, cfg, np.random.default_rng(task)) for r in (ref, rt)]
        assert results[0].steps == results[1].steps == 10
        assert abs(results[0].loss - results[1].loss) < 1e-4
        assert max_diff(ref.get_params(), rt.get_params()) < 1e-4
    evals = [r.evaluate(x, y, batch_size=40) for r in (ref, rt)]
    assert abs(evals[0].loss - evals[1].loss) < 1e-4
    assert evals[0].accuracy == evals[1].accuracy


def test_executorch_rejects_batches_above_max_batch(mlp_bundle: Path) -> None:
    rt = load_runtime("executorch", mlp_bundle)
    x, y = data(100, seed=5)
    with pytest.raises(ValueError, match="max_batch"):
        rt.train(x, y, TrainConfig(batch_size=65), np.random.default_rng(0))


@pytest.mark.parametrize("model", MODELS)
def test_onnx_graphs_use_standard_float32_ops(exports: Exports, model: str) -> None:
    for name in (MODEL_ONNX, TRAIN_STEP_ONNX):
        proto = onnx.load(str(exports.bundle(model) / name))
        assert {o.domain for o in proto.opset_import} <= {"", "ai.onnx"}
        assert all(o.version >= 17 for o in proto.opset_import)
        assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}
        float_inputs = [i for i in proto.graph.input if i.name != "y"]
        assert all(i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for i in float_inputs)


# --- bad bundles fail at load with a named error, before any training ---


@pytest.fixture
def mlp_copy(mlp_bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(mlp_bundle, tmp_path / "bundle"))


def edit_manifest(bundle: Path, **changes: object) -> None:
    doc = json.loads((bundle / MANIFEST).read_text())
    doc.update(changes)
    (bundle / MANIFEST).write_text(json.dumps(doc))


@pytest.mark.parametrize("kind", ("torch", *EXPORTED))
@pytest.mark.parametrize("missing", (MODEL_PTE, TRAIN_STEP_ONNX, MANIFEST))
def test_missing_file(mlp_copy: Path, kind: str, missing: str) -> None:
    (mlp_copy / missing).unlink()
    with pytest.raises(MissingFile):
        load_runtime(kind, mlp_copy)


@pytest.mark.parametrize("kind", ("torch", *EXPORTED))
@pytest.mark.parametrize("corrupt", (MODEL_PTE, MODEL_ONNX, TRAIN_STEP_ONNX))
def test_hash_mismatch(mlp_copy: Path, kind: str, corrupt: str) -> None:
    data = bytearray((mlp_copy / corrupt).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (mlp_copy / corrupt).write_bytes(bytes(data))
    with pytest.raises(HashMismatch):
        load_runtime(kind, mlp_copy)


@pytest.mark.parametrize("kind", ("torch", *EXPORTED))
def test_unknown_format_version(mlp_copy: Path, kind: str) -> None:
    edit_manifest(mlp_copy, format_version=2)
    with pytest.raises(UnknownFormatVersion):
        load_runtime(kind, mlp_copy)


@pytest.mark.parametrize("verify", (True, False))
@pytest.mark.parametrize("kind", ("torch", *EXPORTED))
@pytest.mark.parametrize("change", ("rename", "reshape"))
def test_parameter_mismatch(mlp_copy: Path, kind: str, change: str, verify: bool) -> None:
    """With verify=False the ONNX graphs are not inspected up front: each runtime checks its own artifact."""
    doc = json.loads((mlp_copy / MANIFEST).read_text())
    param = doc["parameters"][2]  # fc2.weight
    if change == "rename":
        param["name"] = "fc3.weight"
    else:
        param["shape"] = [param["shape"][0], param["shape"][1] + 1]
    edit_manifest(mlp_copy, parameters=doc["parameters"])
    with pytest.raises(ParameterMismatch):
        load_runtime(kind, mlp_copy, verify=verify)
