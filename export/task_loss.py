"""A task's loss and metrics: cross-entropy and accuracy by default, or the user's own as ``MODULE:ATTR``,
resolved the same way on the server, on phones and by export.

- **loss** ``(outputs [B, ...], targets [B, ...]) -> scalar tensor``: the mean over the batch, differentiable
  in ``outputs``. Every trainer applies it to one phone's batch (the batched trainer per phone, under
  ``vmap``), export traces it into ``model.pte`` and ``train_step.onnx``, and the server evaluates with it
  (once, on the model's outputs over the whole test split).
- **metrics** ``(outputs [N, ...], targets [N, ...]) -> {name: float}``: called once per evaluation with the
  outputs of the whole test split, collected batch by batch and concatenated, so any metric (RMSE, F1,
  AUC) is exact and none has to be written as per-batch sums.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from fedfleet.export.refs import resolve_ref

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
MetricsFn = Callable[[torch.Tensor, torch.Tensor], Mapping[str, Any]]
DEFAULT_LOSS = "cross_entropy"
# Names a metric cannot take: the round record's own, beside which fedfleet report shows the metrics.
RESERVED_METRICS = ("round", "version", "accuracy", "loss", "train_loss", "updates", "time_s")


def cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The built-in loss: mean cross-entropy of logits ``[B, classes]`` against class indices ``[B]``."""
    return nn.functional.cross_entropy(outputs, targets)


def is_default_loss(spec: str | None) -> bool:
    return spec is None or spec == DEFAULT_LOSS


def resolve_loss(spec: str | None, flag: str = "--loss") -> LossFn | None:
    """The user's loss ``spec`` names (``MODULE:ATTR``), or None for the built-in cross-entropy (the
    trainers keep their own fused path for it)."""
    if is_default_loss(spec):
        return None
    assert spec is not None
    return resolve_ref(spec, flag)


def loss_or_default(spec: str | None, flag: str = "--loss") -> LossFn:
    return resolve_loss(spec, flag) or cross_entropy


def resolve_metrics(spec: str | None, flag: str = "--metrics") -> MetricsFn | None:
    return None if spec is None else resolve_ref(spec, flag)


def check_task(model: nn.Module, x_train: Any, y_train: Any, loss: str | None, metrics: str | None) -> list[str]:
    """``loss`` and ``metrics`` checked on ``model``'s outputs for the first training examples (numpy
    arrays), before anything starts: ValueError naming --loss or --metrics. Returns the metric names."""
    import numpy as np

    x = torch.from_numpy(np.ascontiguousarray(x_train[:8], dtype=np.float32))
    regression = np.asarray(y_train).dtype.kind == "f"
    y = torch.from_numpy(np.asarray(y_train[:8], dtype=np.float32 if regression else np.int64))
    if regression and is_default_loss(loss):
        raise ValueError("--loss: the dataset's targets are floats, a regression task; give its loss, a "
                         "MODULE:ATTR such as examples.custom_task:mse (cross-entropy takes class labels)")
    check_loss(loss, model, x, y)
    return check_metrics(metrics, model, x, y)


def check_loss(spec: str | None, model: nn.Module, x: torch.Tensor, y: torch.Tensor, flag: str = "--loss") -> None:
    """ValueError naming ``flag`` unless the loss, on a copy of ``model``'s outputs for a few training
    examples ``x``, ``y``, returns a finite floating-point scalar tensor that depends on the outputs."""
    fn = resolve_loss(spec, flag)
    if fn is None:
        return
    model = copy.deepcopy(model).train()  # a training-mode forward moves batch norm statistics
    with torch.random.fork_rng(devices=[]):  # dropout draws: torch's global generator is left as it was
        torch.manual_seed(0)
        value = _applied(fn, model(x), y, flag, spec)
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{flag} {spec}: returned a {type(value).__name__}, not a torch.Tensor (the mean loss "
                         "over the batch, a scalar tensor)")
    if value.dim() != 0:
        raise ValueError(f"{flag} {spec}: returned a tensor of shape {list(value.shape)}; the loss must be a "
                         "scalar (the mean over the batch)")
    if not value.is_floating_point():
        raise ValueError(f"{flag} {spec}: returned a {str(value.dtype).removeprefix('torch.')} tensor; the loss "
                         "must be floating point")
    if not value.requires_grad:
        raise ValueError(f"{flag} {spec}: its value does not depend on the model's outputs (no gradient)")
    if not math.isfinite(float(value.detach())):
        raise ValueError(f"{flag} {spec}: returned {float(value.detach())} on the model's outputs for the "
                         "first training examples; the loss must be finite")


def _applied(fn: Callable[[torch.Tensor, torch.Tensor], object], out: torch.Tensor, y: torch.Tensor, flag: str,
             spec: str | None) -> Any:
    """``fn(out, y)``; ValueError naming ``flag`` and the shapes when it raises (the user's function)."""
    try:
        return fn(out, y)
    except Exception as exc:
        raise ValueError(f"{flag} {spec}: fails on the model's outputs {list(out.shape)} and targets "
                         f"{list(y.shape)}: {type(exc).__name__}: {_first_line(exc)}") from exc


def check_metrics(spec: str | None, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                  flag: str = "--metrics") -> list[str]:
    """The metric names ``spec`` gives on ``model``'s outputs for ``x``, ``y``; ValueError naming ``flag``
    when it fails, returns anything but ``{name: float}`` or uses a name the round record has."""
    fn = resolve_metrics(spec, flag)
    if fn is None:
        return []
    model = copy.deepcopy(model).eval()
    with torch.no_grad():
        values = _applied(fn, model(x), y, flag, spec)
    return list(metric_values(values, f"{flag} {spec}"))


def metric_values(values: object, where: str, finite: bool = True) -> dict[str, float | None]:
    """``values`` as ``{name: float}``; ValueError starting with ``where`` for anything else: not a
    mapping, a name that is not a non-empty string or is reserved, a value that is not a real number (a
    Python or numpy number, or a one-element tensor) or, with ``finite``, is not finite. Without it (a
    model that diverged in some round) a value that is not finite is None, as JSON has no NaN."""
    if not isinstance(values, Mapping):
        raise ValueError(f"{where}: returned a {type(values).__name__}, not a dict of {{name: float}}")
    out: dict[str, float | None] = {}
    for name, value in values.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"{where}: metric names must be non-empty strings, got {name!r}")
        if name in RESERVED_METRICS:
            raise ValueError(f"{where}: {name!r} is a name the round record has; call the metric something else")
        number = _as_float(value, f"{where}: metric {name!r}")
        if not math.isfinite(number):
            if finite:
                raise ValueError(f"{where}: metric {name!r} is {number}, not a finite float")
            out[name] = None
        else:
            out[name] = number
    return out


def _as_float(value: object, where: str) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype.is_complex and value.dtype != torch.bool:
        value = value.item()
    if isinstance(value, bool) or not hasattr(value, "__float__") or isinstance(value, torch.Tensor | complex | str):
        raise ValueError(f"{where} is a {type(value).__name__}, not a float")
    return float(value)  # type: ignore[arg-type]


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else ""
