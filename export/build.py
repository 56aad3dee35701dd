"""Export one model into a bundle directory and describe it in ``manifest.json``.

Each artifact is produced independently: if one cannot be exported for a model, the
manifest records the op and the reason and the other artifacts are still written.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from torch import nn

from fedfleet.export.bundle import artifact_info, sha256_file, verify_bundle, write_manifest
from fedfleet.export.manifest import (
    MODEL_ONNX,
    MODEL_PTE,
    PTE_PREFIX,
    STATE_IN,
    STATE_OUT,
    TRAIN_STEP_ONNX,
    WEIGHTS,
    ArtifactInfo,
    Manifest,
    ParamSpec,
    UnsupportedExport,
    train_step_signature,
)
from fedfleet.export.models import ModelSpec, build_model, trainable_names
from fedfleet.export.pte_evaluate import evaluate_signature
from fedfleet.export.state_outputs import inference_state_names, program_state_names
from fedfleet.export.task_loss import resolve_loss
from fedfleet.export.task_model import model_fingerprint
from fedfleet.export.weights import fit_weights, load_weights, save_weights
from fedfleet.protocol.plan import TrainPlan

VERSIONED = ("torch", "executorch", "onnx", "onnxruntime", "onnxscript")


@dataclass(frozen=True)
class ExportConfig:
    """What ``fedfleet export`` turns into a bundle; defaults are the training plan's (``TrainPlan``)."""

    model: str  # mlp | cnn | mobilenet | MODULE:ATTR
    dataset: str
    input_shape: tuple[int, ...]  # one example of the dataset: C, H, W, or T, F, or F
    num_classes: int
    seed: int = 0  # build_model seed: the initial weights every runtime starts from
    batch_size: int = TrainPlan.batch_size  # default task batch size, recorded in the manifest (protocol/plan.py)
    lr: float = TrainPlan.lr  # default task learning rate, recorded in the manifest (protocol/plan.py)
    max_batch: int = 64  # largest batch model.pte accepts (ExecuTorch plans memory for it)
    backbone_weights: Path | None = None  # torchvision MobileNetV3-small state dict
    weights: Path | None = None  # the model's weights (e.g. a run's final_weights.safetensors); default: seeded
    loss: str | None = None  # the task's loss, MODULE:ATTR, traced into the training programs (default: cross-entropy)

    def __post_init__(self) -> None:
        if not 1 <= self.batch_size <= self.max_batch:
            raise ValueError(f"batch_size must be in 1..max_batch ({self.max_batch}), got {self.batch_size}")
        if not self.lr > 0:
            raise ValueError("lr must be positive")


def export_model(cfg: ExportConfig) -> nn.Module:
    """The model ``cfg`` names, with its weights: seeded, or ``cfg.weights`` (ValueError naming --weights
    when they do not fit: the user's mistake, found before any artifact is written)."""
    model = build_model(ModelSpec(cfg.model, cfg.input_shape, cfg.num_classes), seed=cfg.seed,
                        backbone_weights=cfg.backbone_weights)
    if cfg.weights is not None:
        fit_weights(model, load_weights(cfg.weights, "--weights"), f"--weights {cfg.weights}")
    return model


def export_bundle(cfg: ExportConfig, out_dir: Path, model: nn.Module | None = None) -> Manifest:
    """Write every artifact ``model`` (default: ``export_model(cfg)``) supports, then verify the bundle."""
    from fedfleet.export.executorch_export import export_executorch
    from fedfleet.export.onnx_export import export_inference_onnx, export_train_step_onnx

    if model is None:
        model = export_model(cfg)
    loss = resolve_loss(cfg.loss)
    out_dir = Path(out_dir)  # made once the model and its weights are known good
    out_dir.mkdir(parents=True, exist_ok=True)
    opsets: list[int] = []
    backends: dict[str, str] = {}

    def write_pte(path: Path) -> None:
        program, backends[MODEL_PTE] = export_executorch(model, cfg.input_shape, cfg.max_batch, loss)
        path.write_bytes(program)

    def write_onnx(
        exporter: Callable[[nn.Module, tuple[int, ...], Path], int],
    ) -> Callable[[Path], None]:
        return lambda path: opsets.append(exporter(model, cfg.input_shape, path))

    def write_weights(path: Path) -> None:  # first: the state every other artifact starts from
        save_weights(path, model)

    writers: dict[str, Callable[[Path], None]] = {
        WEIGHTS: write_weights,
        MODEL_PTE: write_pte,
        MODEL_ONNX: write_onnx(export_inference_onnx),
        TRAIN_STEP_ONNX: write_onnx(lambda m, shape, path: export_train_step_onnx(m, shape, path, loss)),
    }
    artifacts = {
        name: replace(_produce(out_dir / name, writer), backend=backends.get(name))
        for name, writer in writers.items()
    }
    manifest = Manifest(
        model=cfg.model,
        dataset=cfg.dataset,
        input_shape=cfg.input_shape,
        num_classes=cfg.num_classes,
        seed=cfg.seed,
        parameters=tuple(
            ParamSpec(n, tuple(p.shape), "float32", p.requires_grad) for n, p in model.named_parameters()
        ),
        max_batch=cfg.max_batch,
        hyperparameters={"lr": float(cfg.lr), "batch_size": int(cfg.batch_size)},
        artifacts=artifacts,
        versions=_versions(),
        backbone_weights_sha256=sha256_file(cfg.backbone_weights) if cfg.backbone_weights else None,
        onnx_opset=min(opsets) if opsets else None,
        inputs={
            "x": {"dtype": "float32", "shape": ["batch", *cfg.input_shape]},
            "y": {"dtype": "int64", "shape": ["batch"]},
            "lr": {"dtype": "float32", "shape": []},
            "mu": {"dtype": "float32", "shape": []},
        },
        signatures=_signatures(trainable_names(model), program_state_names(model)),
        model_fingerprint=model_fingerprint(model, cfg.loss),
    )
    write_manifest(out_dir, manifest)
    return verify_bundle(out_dir)


def _signatures(names: list[str], state: list[str]) -> dict[str, dict[str, list[str]]]:
    step_inputs, step_outputs = train_step_signature(names, state)
    eval_inputs, eval_outputs = evaluate_signature(names, state)
    return {
        MODEL_PTE: {
            "inputs": ["x", "y", *[STATE_IN + n for n in state]],
            "outputs": ["loss", "logits", *[STATE_OUT + n for n in state]],
            "parameters": [PTE_PREFIX + n for n in names],
            # the evaluation method (export/pte_evaluate.py): eval mode, with the weights and statistics fed
            "evaluate_inputs": eval_inputs,
            "evaluate_outputs": eval_outputs,
        },
        MODEL_ONNX: {"inputs": ["x", *names, *inference_state_names(state)], "outputs": ["logits"]},
        TRAIN_STEP_ONNX: {"inputs": step_inputs, "outputs": step_outputs},
    }


def _produce(path: Path, writer: Callable[[Path], None]) -> ArtifactInfo:
    path.unlink(missing_ok=True)  # never leave a stale artifact from an earlier export
    try:
        writer(path)
    except UnsupportedExport as exc:
        path.unlink(missing_ok=True)
        return ArtifactInfo(available=False, op=exc.op, reason=exc.reason)
    return artifact_info(path)


def _versions() -> dict[str, str]:
    out = {}
    for dist in VERSIONED:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "absent"
    return out
