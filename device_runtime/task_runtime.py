"""The eager runtime of a phone for the server's task, built from the phone's own model code.

A phone imports only model code it is given locally (``--model``, or the task's built-in name): the
server's task names its model, and a ``MODULE:ATTR`` there is used only when the phone side was
started with the same spec (``fedfleet simulate``, where phones and server are one user's process).
Weights a phone loads are safetensors, never unpickled."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fedfleet.device_runtime.runtimes.torch_runtime import TorchRuntime


def task_runtime_factory(model: str | None = None, weights: str | None = None,
                         loss: str | None = None) -> Callable[[dict[str, Any]], TorchRuntime]:
    """A runtime factory for ``run_fleet``: ``model`` (default: the task's) with the task's input shape
    and classes, ``weights`` (a safetensors file) loaded over its seeded initialisation, trained with
    ``loss`` (``MODULE:ATTR``, the phone's own import of it; None: cross-entropy)."""

    def factory(task: dict[str, Any]) -> TorchRuntime:
        from fedfleet.export.task_loss import resolve_loss
        from fedfleet.export.task_model import task_model

        return TorchRuntime(task_model(model or str(task["model"]), tuple(task["input_shape"]),
                                       int(task["num_classes"]), weights=weights, allow_torch_weights=False),
                            loss=resolve_loss(loss))

    return factory
