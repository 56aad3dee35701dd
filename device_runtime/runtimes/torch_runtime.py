"""Eager PyTorch: the reference runtime every exported backend is checked against."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from fedfleet.device_runtime.runtimes.base import EvalResult, TrainConfig, TrainResult, iterate_batches
from fedfleet.device_runtime.stateful import (
    dropout_generator,
    dropout_layers,
    generator_masks,
    masked_dropout,
    set_state,
)
from fedfleet.export.model_state import get_state, state_names
from fedfleet.export.task_loss import LossFn


class TorchRuntime:
    name = "torch"

    def __init__(self, model: nn.Module, loss: LossFn | None = None) -> None:
        self.model = model
        self.loss = loss  # the task's own (export/task_loss.py); None: cross-entropy
        self._trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        model.train()
        self._state_names = state_names(model)
        self._initial_state = get_state(model, self._state_names)  # what a phone with no state of its own uses

    def param_names(self) -> list[str]:
        return list(self._trainable)

    def get_params(self) -> dict[str, np.ndarray]:
        return {n: p.detach().numpy().copy() for n, p in self._trainable.items()}

    def set_params(self, params: Mapping[str, np.ndarray]) -> None:
        with torch.no_grad():
            for n, p in self._trainable.items():
                p.copy_(torch.from_numpy(np.asarray(params[n], dtype=np.float32)))

    def get_state(self) -> dict[str, np.ndarray]:
        """Batch norm running statistics (``stateful.state_names``); empty for a model without."""
        return get_state(self.model, self._state_names)

    def set_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Load ``state``; a buffer it lacks goes back to the model's initial value."""
        set_state(self.model, {n: state.get(n, self._initial_state[n]) for n in self._state_names})

    def train(self, x: np.ndarray, y: np.ndarray, cfg: TrainConfig, rng: np.random.Generator) -> TrainResult:
        """Plain SGD over ``iterate_batches``; dropout masks come from a generator seeded by ``rng``
        (drawn before the batches), batch norm updates the running statistics as it always does."""
        self.model.train()
        layers = dropout_layers(self.model)
        if not layers:
            return self._train(x, y, cfg, rng)
        with masked_dropout(layers, generator_masks(dropout_generator(rng))):
            return self._train(x, y, cfg, rng)

    def _train(self, x: np.ndarray, y: np.ndarray, cfg: TrainConfig, rng: np.random.Generator) -> TrainResult:
        xt, yt = torch.from_numpy(x), torch.from_numpy(targets(y))
        params = list(self._trainable.values())
        anchor = [p.detach().clone() for p in params] if cfg.prox_mu > 0 else []
        # Plain SGD by hand, exactly torch.optim.SGD(lr)'s step (param.add_(grad, alpha=-lr)): the
        # first torch.optim optimizer in a process imports torch._dynamo (~1.4 s, 900 modules),
        # which stalled the first round of a fleet whose server runs in another process.
        total, steps = 0.0, 0
        for idx in iterate_batches(len(x), cfg, rng):
            ti = torch.from_numpy(idx)
            loss = (self.loss or nn.functional.cross_entropy)(self.model(xt[ti]), yt[ti])
            total += float(loss.detach())
            if anchor:  # FedProx: mu/2 * ||w - w_global||^2
                loss = loss + 0.5 * cfg.prox_mu * sum(((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True))
            for p in params:
                p.grad = None
            loss.backward()
            with torch.no_grad():
                for p in params:
                    if p.grad is not None:
                        p.add_(p.grad, alpha=-cfg.lr)
            steps += 1
        return TrainResult(loss=total / max(steps, 1), num_examples=len(x), steps=steps)

    @torch.no_grad()
    def evaluate(self, x: np.ndarray, y: np.ndarray, batch_size: int = 256) -> EvalResult:
        return evaluate_module(self.model, x, y, batch_size)


@torch.no_grad()
def evaluate_module(model: nn.Module, x: np.ndarray, y: np.ndarray, batch_size: int = 256) -> EvalResult:
    model.eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, len(x), batch_size):
        xb = torch.from_numpy(x[start : start + batch_size])
        yb = torch.from_numpy(y[start : start + batch_size].astype(np.int64))
        logits = model(xb)
        loss_sum += float(nn.functional.cross_entropy(logits, yb, reduction="sum"))
        correct += int((logits.argmax(1) == yb).sum())
    n = max(len(x), 1)
    return EvalResult(loss=loss_sum / n, accuracy=correct / n, num_examples=len(x))


def targets(y: np.ndarray) -> np.ndarray:
    """Class labels as int64; a regression's float targets as they are (device_runtime/task_data.py)."""
    return y if y.dtype.kind == "f" else y.astype(np.int64)


def torch_runtime_for_task(task: dict) -> TorchRuntime:
    """The eager model a server's task describes (model name, input shape, classes), trained with its
    loss (export/task_loss.py; cross-entropy when the task names none)."""
    from fedfleet.export.models import ModelSpec, build_model
    from fedfleet.export.task_loss import resolve_loss

    spec = ModelSpec(str(task["model"]), tuple(task["input_shape"]), int(task["num_classes"]))  # type: ignore[arg-type]
    return TorchRuntime(build_model(spec), loss=resolve_loss(task.get("loss")))
