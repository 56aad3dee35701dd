"""Server-side evaluation of each published version on the held-out split."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from fedfleet.protocol.state import split_state

if TYPE_CHECKING:
    import torch
    from torch import nn

    from fedfleet.export.models import ModelSpec

TaskSpec = tuple[str, tuple[int, ...], int]  # model name, input shape, classes


@dataclass(frozen=True)
class Evaluation:
    loss: float
    accuracy: float | None  # None for a regression (float targets)
    metrics: dict[str, float | None] = field(default_factory=dict)  # the task's own (export/task_loss.py)


class Evaluator:
    """Holds the test split and one eager model; ``evaluate`` loads parameters and scores them.

    The model, and torch with it, is built at the first evaluation (in the publisher's thread),
    so that a server restarting after a crash answers requests without waiting for torch.

    ``device`` (resolved: "cpu" or "cuda", export.accelerator.resolve_device): where the model and the
    test split live from the first evaluation on; on CUDA a batch is as many examples as fit in the
    free memory, and the loss and the count of correct answers come back to the host once.

    ``loss``, ``metrics``: the task's own (``MODULE:ATTR``, export/task_loss.py), each called once on the
    model's outputs over the whole test split (collected batch by batch), so a loss or metric that is not
    a mean of per-example terms (RMSE, F1) is still exact; None: cross-entropy, and no metrics."""

    def __init__(self, spec: ModelSpec | TaskSpec, x_test: np.ndarray, y_test: np.ndarray, seed: int = 0,
                 init_weights: str | None = None, device: str = "cpu", loss: str | None = None,
                 metrics: str | None = None) -> None:
        if len(x_test) != len(y_test) or len(x_test) == 0:
            raise ValueError("the test split needs as many labels as examples, and at least one")
        self.spec, self.seed, self.init_weights, self.device = spec, seed, init_weights, device
        self.loss_spec, self.metrics_spec = loss, metrics
        self.x = np.ascontiguousarray(x_test, dtype=np.float32)
        self.y = np.asarray(y_test) if np.asarray(y_test).dtype.kind == "f" else np.asarray(y_test, dtype=np.int64)
        self._model: nn.Module | None = None
        self._split: tuple[torch.Tensor, torch.Tensor] | None = None  # the test split on the device
        self._channels_last = False  # the model and the split in channels-last memory (set when built)
        # a frozen backbone (export/frozen_prefix.py): the model after it, its features of the test split
        # (computed once: the frozen weights are the initial ones in every version), and their names
        self._cut: tuple[nn.Module, torch.Tensor, set[str]] | None = None

    def _built(self) -> nn.Module:
        if self._model is None:
            import torch

            from fedfleet.export.models import ModelSpec
            from fedfleet.export.task_model import task_model

            spec = self.spec if isinstance(self.spec, ModelSpec) else ModelSpec(*self.spec)
            # the parameters phones do not train (a frozen backbone) are the initial weights' too
            model = task_model(spec.name, spec.input_shape, spec.num_classes, self.seed,
                               self.init_weights).to(self.device)
            # Images through convolutions on the CPU: channels-last memory, where oneDNN's convolutions and
            # the pooling kernel work without reordering each batch (the built-in CNN on mnist5k's 1,000
            # test images: 157 ms NCHW, 65 ms channels-last, one thread, 2026-12-07).
            self._channels_last = (self.device == "cpu" and self.x.ndim == 4
                                   and any(isinstance(m, torch.nn.Conv2d) for m in model.modules()))
            self._model = model.to(memory_format=torch.channels_last) if self._channels_last else model
        return self._model

    def evaluate(self, params: Mapping[str, np.ndarray], batch_size: int = 512) -> Evaluation:
        import torch

        from fedfleet.export.accelerator import activation_bytes, rows_that_fit

        model = self._built()
        if self._split is None:
            xs = torch.from_numpy(self.x).to(self.device)
            if self._channels_last:
                xs = xs.contiguous(memory_format=torch.channels_last)
            self._split = xs, torch.from_numpy(self.y).to(self.device)
            self._cut = self._backbone(model, xs, batch_size)
        x, y = self._split
        params, state = split_state(params)
        if self._cut is not None and not set(params).isdisjoint(self._cut[2]):
            self._cut = None  # a version carrying the frozen weights: the whole model, from now on
        if self._cut is not None:  # the rest of the model on the backbone's features
            model, x = self._cut[0], self._cut[1]
        if self.device != "cpu":  # as many rows as the free memory holds, with their activations
            batch_size = rows_that_fit(self.device, activation_bytes(model, x[:1], 4), cap=len(x))
        with torch.no_grad():
            named = dict(model.named_parameters())
            for name, value in params.items():
                named[name].copy_(torch.from_numpy(np.asarray(value, dtype=np.float32)))
            buffers = dict(model.named_buffers())
            for name, value in state.items():  # batch norm statistics: what the phones would use
                buffers[name].copy_(torch.from_numpy(np.asarray(value)).to(buffers[name].dtype))
            model.eval()
            if self.loss_spec is not None or self.metrics_spec is not None:
                return self._task_evaluation(model, x, y, batch_size)
            # Per batch, summed on the host in float64 (on the CPU the same floats as one float() per batch).
            losses, hits = [], []
            for start in range(0, len(x), batch_size):
                logits = model(x[start : start + batch_size])
                yb = y[start : start + batch_size]
                losses.append(torch.nn.functional.cross_entropy(logits, yb, reduction="sum"))
                hits.append((logits.argmax(1) == yb).sum())
            loss_sum = sum(torch.stack(losses).cpu().tolist(), 0.0)
            correct = int(torch.stack(hits).sum().cpu())
        return Evaluation(loss=loss_sum / len(x), accuracy=correct / len(x))

    def _backbone(self, model: nn.Module, x: torch.Tensor,
                  batch_size: int) -> tuple[nn.Module, torch.Tensor, set[str]] | None:
        """(the model after its frozen prefix, the test split's features, the frozen tensors' names) where
        ``frozen_prefix`` cuts the model in eval mode; else None."""
        import torch

        from fedfleet.export.frozen_prefix import find
        from fedfleet.export.model_state import state_names

        state = state_names(model.train())  # the buffers versions carry
        model.eval()
        cut = find(model, [self.x], state)
        model.eval()  # split leaves a model in train mode
        if cut is None:
            return None
        with torch.no_grad():
            features = torch.cat([cut.features(x[a:a + batch_size]) for a in range(0, len(x), batch_size)])
        return cut.rest, features, set(cut.frozen_tensors())

    def _task_evaluation(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> Evaluation:
        """The task's loss and metrics on every test output at once (export/task_loss.py)."""
        import torch

        from fedfleet.export.task_loss import loss_or_default, metric_values, resolve_metrics

        out = torch.cat([model(x[start : start + batch_size]) for start in range(0, len(x), batch_size)])
        loss = float(loss_or_default(self.loss_spec)(out, y))
        # classification: outputs are logits [N, classes]; a regression (float targets) has no accuracy
        accuracy = None if y.is_floating_point() else int((out.argmax(1) == y).sum()) / len(y)
        metrics_fn = resolve_metrics(self.metrics_spec)
        metrics = {} if metrics_fn is None else metric_values(metrics_fn(out, y), f"--metrics {self.metrics_spec}",
                                                                finite=False)
        return Evaluation(loss=loss, accuracy=accuracy, metrics=metrics)
