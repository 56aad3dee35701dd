"""ONNX Runtime backend: ``train_step.onnx`` for training, ``model.onnx`` for evaluation.

Stock onnxruntime, no training extension: the step graph maps
``(params..., x, y, lr, mu, anchor.<param>...)`` to ``(loss, new.<param>...)`` and the
parameters live here as numpy arrays between steps. ``model.onnx`` exposes the trainable
weights as overridable initializers, so evaluation feeds the current weights. A model with batch
norm also feeds its running statistics (``state.<buffer>``, last) and takes them back updated
(``new_state.<buffer>``, last; ``program_state``); evaluation feeds them as well.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from fedfleet.device_runtime.runtimes.base import (
    EvalResult,
    TrainConfig,
    TrainResult,
    iterate_batches,
    score_logits,
)
from fedfleet.device_runtime.runtimes.program_state import ProgramState
from fedfleet.export.manifest import (
    ANCHOR_PREFIX,
    MODEL_ONNX,
    STATE_IN,
    TRAIN_STEP_ONNX,
    Manifest,
    ParameterMismatch,
)


def session_options() -> object:
    """One phone: one intra-op thread, sequential execution, no spinning threads."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3  # errors only
    return opts


class OnnxRuntime:
    name = "onnx"

    def __init__(self, bundle_dir: Path, manifest: Manifest) -> None:
        import onnxruntime as ort

        bundle_dir = Path(bundle_dir)
        opts = session_options()
        providers = ["CPUExecutionProvider"]
        self._step = ort.InferenceSession(str(bundle_dir / TRAIN_STEP_ONNX), opts, providers=providers)
        self._infer = ort.InferenceSession(str(bundle_dir / MODEL_ONNX), opts, providers=providers)
        self._names = manifest.trainable_names()
        self._shapes = {p.name: p.shape for p in manifest.trainable()}
        self._outputs = [o.name for o in self._step.get_outputs()]
        self._params = _initial_params(bundle_dir / MODEL_ONNX, self._names)
        self._state = ProgramState.from_bundle(bundle_dir, manifest, TRAIN_STEP_ONNX)
        inference_inputs = set(manifest.signatures.get(MODEL_ONNX, {}).get("inputs", []))
        self._eval_state = [n for n in self._state.names if n in inference_inputs]  # fed at evaluation
        for name, value in self._params.items():
            if value.shape != self._shapes[name]:
                raise ParameterMismatch(
                    f"{MODEL_ONNX}: {name} has shape {value.shape}, manifest {self._shapes[name]}"
                )

    def param_names(self) -> list[str]:
        return list(self._names)

    def get_params(self) -> dict[str, np.ndarray]:
        return {n: v.copy() for n, v in self._params.items()}

    def set_params(self, params: Mapping[str, np.ndarray]) -> None:
        self._params = {
            n: np.ascontiguousarray(params[n], dtype=np.float32).reshape(self._shapes[n]).copy()
            for n in self._names
        }

    def get_state(self) -> dict[str, np.ndarray]:
        """Batch norm running statistics; empty for a model without."""
        return self._state.get()

    def set_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Load ``state``; a buffer it lacks goes back to the bundle's initial value."""
        self._state.set(state)

    def train(self, x: np.ndarray, y: np.ndarray, cfg: TrainConfig, rng: np.random.Generator) -> TrainResult:
        x = np.ascontiguousarray(x, dtype=np.float32)
        y = y.astype(np.int64)
        # FedAvg passes the weights themselves as the anchor: mu = 0 makes the term vanish
        anchors = {ANCHOR_PREFIX + n: v.copy() for n, v in self._params.items()}
        scalars = {"lr": np.array(cfg.lr, np.float32), "mu": np.array(cfg.prox_mu, np.float32)}
        total, steps = 0.0, 0
        k = len(self._names)
        for idx in iterate_batches(len(x), cfg, rng):
            state = {STATE_IN + n: v for n, v in zip(self._state.names, self._state.values(), strict=True)}
            feed = {**self._params, **anchors, **scalars, "x": x[idx], "y": y[idx], **state}
            loss, *new = self._step.run(self._outputs, feed)
            self._params = dict(zip(self._names, new[:k], strict=True))
            if self._state.names:
                self._state.update(new[k:])
            total += float(loss)
            steps += 1
        return TrainResult(loss=total / max(steps, 1), num_examples=len(x), steps=steps)

    def evaluate(self, x: np.ndarray, y: np.ndarray, batch_size: int = 256) -> EvalResult:
        loss_sum, correct = 0.0, 0
        for start in range(0, len(x), batch_size):
            xb = np.ascontiguousarray(x[start : start + batch_size], dtype=np.float32)
            yb = y[start : start + batch_size].astype(np.int64)
            state = {n: v for n, v in self._state.get().items() if n in self._eval_state}
            (logits,) = self._infer.run(["logits"], {"x": xb, **self._params, **state})
            batch_loss, batch_correct = score_logits(logits, yb)
            loss_sum += batch_loss
            correct += batch_correct
        n = max(len(x), 1)
        return EvalResult(loss=loss_sum / n, accuracy=correct / n, num_examples=len(x))


def _initial_params(path: Path, names: list[str]) -> dict[str, np.ndarray]:
    """The exported weights: the trainable initializers of ``model.onnx``."""
    import onnx
    from onnx import numpy_helper

    inits = {t.name: t for t in onnx.load(str(path)).graph.initializer}
    missing = [n for n in names if n not in inits]
    if missing:
        raise ParameterMismatch(f"{path.name} has no initializer for {missing}")
    return {n: numpy_helper.to_array(inits[n]).astype(np.float32, copy=True) for n in names}
