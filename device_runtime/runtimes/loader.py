"""Build a ``TrainingRuntime`` of a given kind from a bundle directory.

The bundle is verified (hashes, format version, parameters) before any backend is
imported, so a bad download fails with a named ``export.manifest.BundleError``.
"""

from __future__ import annotations

from pathlib import Path

from fedfleet.device_runtime.runtimes import RUNTIME_NAMES
from fedfleet.device_runtime.runtimes.base import TrainingRuntime
from fedfleet.export.bundle import load_manifest, require_artifact, sha256_file, verify_bundle
from fedfleet.export.manifest import (
    MODEL_ONNX,
    MODEL_PTE,
    TRAIN_STEP_ONNX,
    WEIGHTS,
    BundleError,
    Manifest,
    ParameterMismatch,
)


def load_runtime(
    kind: str, bundle_dir: Path, *, verify: bool = True, backbone_weights: Path | None = None
) -> TrainingRuntime:
    """``kind`` is torch | executorch | onnx. ``backbone_weights`` is only needed by the torch
    reference for a model exported with ``--backbone-weights`` (the other runtimes carry them)."""
    if kind not in RUNTIME_NAMES:
        raise ValueError(f"unknown runtime {kind!r}; choose from {', '.join(RUNTIME_NAMES)}")
    bundle_dir = Path(bundle_dir)
    manifest = verify_bundle(bundle_dir) if verify else load_manifest(bundle_dir)
    if kind == "torch":
        return _torch_runtime(manifest, backbone_weights, bundle_dir)
    if kind == "executorch":
        require_artifact(manifest, MODEL_PTE)
        from fedfleet.device_runtime.runtimes.executorch_runtime import ExecuTorchRuntime

        return ExecuTorchRuntime.from_bundle(bundle_dir, manifest)
    require_artifact(manifest, TRAIN_STEP_ONNX)  # kind == "onnx"
    require_artifact(manifest, MODEL_ONNX)
    from fedfleet.device_runtime.runtimes.onnx_runtime import OnnxRuntime

    return OnnxRuntime(bundle_dir, manifest)


def _torch_runtime(manifest: Manifest, backbone_weights: Path | None, bundle_dir: Path) -> TrainingRuntime:
    """The eager reference, rebuilt from the manifest's model name, shapes and seed."""
    from fedfleet.device_runtime.runtimes.torch_runtime import TorchRuntime
    from fedfleet.export.models import ModelSpec, build_model

    if manifest.backbone_weights_sha256 is not None:
        if backbone_weights is None:
            raise BundleError("this bundle was exported with backbone weights; pass backbone_weights")
        if sha256_file(backbone_weights) != manifest.backbone_weights_sha256:
            raise ParameterMismatch(f"{backbone_weights} is not the backbone this bundle was exported with")
    spec = ModelSpec(manifest.model, manifest.input_shape, manifest.num_classes)
    model = build_model(spec, seed=manifest.seed, backbone_weights=backbone_weights)
    if manifest.artifacts.get(WEIGHTS) is not None and manifest.artifacts[WEIGHTS].available:
        from fedfleet.export.weights import fit_weights, load_weights  # safetensors only: nothing unpickled

        fit_weights(model, load_weights(bundle_dir / WEIGHTS, "bundle", allow_torch=False), f"bundle {WEIGHTS}")
    actual = [(n, tuple(p.shape), p.requires_grad) for n, p in model.named_parameters()]
    expected = [(p.name, p.shape, p.trainable) for p in manifest.parameters]
    if actual != expected:
        diff = sorted(set(actual) ^ set(expected), key=str)[:4] or "order"
        raise ParameterMismatch(
            f"eager {manifest.model} parameters (name, shape, trainable) differ from the manifest: {diff}"
        )
    return TorchRuntime(model)
